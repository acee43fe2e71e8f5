"""FFV training: time per task (20 training pairs) and peak memory, with fv_remote.relational.ffv.train_ffv defaults.

Per task (BENCH_TASKS, default present-past,singular-plural) the FV is built from cached means and exact AIE (top
10 heads, layer from a validation sweep; not timed); then `train_ffv(n_train=20, n_valid=30)` is timed.

  train_vs_forward      = training seconds / seconds of one forward over the 20 training prompts (same run)
  peak_mem_vs_weights   = peak resident memory growth during training / the model's weight bytes (CPU: RSS sampled
                          every 10 ms; process_peak_rss_mb is the whole process, model included)
"""

import os
import resource

from _common import PeakRSS, Timer, aie_for, emit, load, log, means_for, setup, task

from fv_remote.fv.evaluate import best_layer, layer_sweep
from fv_remote.relational.ffv import examples, train_ffv
from fv_remote.fv.steering import last_logits
from fv_remote.fv.vectors import build_function_vector

TASKS = os.environ.get("BENCH_TASKS", "present-past,singular-plural").split(",")


def main() -> None:
    env = setup()
    model = load()
    weights = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    per_task = {}
    ratios, mem_ratios = [], []
    for name in TASKS:
        relation, prepared = task(model, name)
        means = means_for(model, relation)
        aie = aie_for(model, relation, prepared, means)
        fv = build_function_vector(model, name, means, aie, k=10)
        fv.layer = best_layer(layer_sweep(model, prepared, fv))
        train = examples(prepared, "train", 20)
        with Timer() as fwd:
            last_logits(model, train.texts, batch_size=len(train))
        with Timer() as t, PeakRSS() as mem:
            run = train_ffv(model, prepared, fv, n_train=20, n_valid=30)
        res = run.result
        steps = len(res.history["step"])
        per_task[name] = {"train_s": round(t.seconds, 2), "steps": steps, "s_per_step": round(t.seconds / steps, 3),
                          "peak_mem_mb": round(mem.peak / 2**20, 1), "layer": int(res.ffv.layer),
                          "best_valid_acc": round(res.best_valid_acc, 3), "stopped_early": res.stopped_early}
        ratios.append(t.seconds / fwd.seconds)
        mem_ratios.append(mem.peak / weights)
        log(f"{name}: {per_task[name]}")
    emit({
        "bench": "ffv",
        "train_vs_forward": round(sum(ratios) / len(ratios), 1),
        "peak_mem_vs_weights": round(max(mem_ratios), 3),
        "train_s_per_task": round(sum(v["train_s"] for v in per_task.values()) / len(per_task), 2),
        "tasks": per_task, "n_train": 20, "n_valid": 30, "weights_mb": round(weights / 2**20, 1),
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model": model.model_id, **env,
    })


if __name__ == "__main__":
    main()
