"""FV vs the field's other vectors on Todd et al.'s tasks (issue 25): zero-shot and shuffled-label accuracy of FV, FFV,
task vector, ICV, mean-difference, PCA (and the n-shot prompt itself, ICL), with paired bootstrap CIs against the FV,
the cost of building each vector (sequence forwards and seconds) and the layer/scale each chose on validation.

Every vector is built here, from one fresh store, with the library's own stages and defaults:
  FV         extract (100 clean prompts) -> CMA (25, fast) -> fit (top 10 heads + validation layer sweep) = `run`
  FFV        `finetune` from the FV (20 training pairs, 30 validation, the FV's layer)
  residuals  100 paired prompts (10-shot and zero-shot, same queries): shared by the four below, counted in each
  task-vector / icv / mean-diff / pca   `fit --method ...` (validation grid over layers x scales, <= 50 pairs)
Test: the test split (at most 200 queries), one seed, the same queries in every column; each condition's per-item
correctness is kept, so every CI is paired. Forwards are counted by a hook on the model (rows of every forward:
a CMA copy and a training step's forward count, backward passes do not).

  PYTHONPATH=. OMP_NUM_THREADS=2 .venv/bin/python benchmarks/vector_methods.py --model smollm2-135m \
      --data-dir ../shared/data/todd_fv/abstractive --out out/vector_methods/smollm2-135m
  .venv/bin/python benchmarks/vector_methods.py --report out/vector_methods/smollm2-135m   # tables only

Writes <out>/<task>.json per task (a rerun skips finished tasks) and <out>/results.json; markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

TASKS = ["antonym", "capitalize", "country-capital", "english-french", "present-past", "singular-plural"]
VECTORS = ["fv", "ffv", "task-vector", "icv", "mean-diff", "pca"]
OTHERS = ["task-vector", "icv", "mean-diff", "pca"]


class Counter:
    """Rows through the model's forward (a hook on the transformers model)."""

    def __init__(self, hf) -> None:
        self.rows = 0
        hf.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        self.rows += int(x.shape[0]) if hasattr(x, "shape") and x.ndim >= 2 else 1


@contextmanager
def cost(costs: dict, name: str, counter: Counter):
    rows, t0 = counter.rows, time.perf_counter()
    yield
    costs[name] = {"forwards": counter.rows - rows, "seconds": round(time.perf_counter() - t0, 2)}


def run_task(model, counter: Counter, name: str, data_dir: str | None, store, out: Path, n_valid: int | None,
             n_test: int | None, scales: list[float] | None, ffv_lr: float | None = None) -> dict:
    import torch

    from fv_remote.baselines.fit import fit_vector
    from fv_remote.baselines.residuals import load_residuals, read_residual_stream
    from fv_remote.data import load_task
    from fv_remote.data.tasks import prepare_task
    from fv_remote.fv.cma import run_cma
    from fv_remote.fv.evaluate import evaluation_conditions, fit_function_vector
    from fv_remote.fv.extract import extract, mean_heads_tensor
    from fv_remote.fv.steering import answer_ids_of, by_condition, condition_work, last_token_body
    from fv_remote.relational.ffv import FinetuneSettings, train_ffv

    relation = load_task(name, data_dir=data_dir)
    prepared = prepare_task(model.tokenizer, relation, seed=0, min_pairs=12)
    costs: dict = {}
    chosen: dict = {}
    with cost(costs, "fv", counter):
        extract(model, relation, store, n_prompts=100, n_shots=10)
        means = mean_heads_tensor(store, name)
        cma = run_cma(model, prepared, store, means, n_prompts=25, n_shots=10)
        fv, sweep = fit_function_vector(model, prepared, means, cma.aie, k=10, n_prompts=n_valid)
    chosen["fv"] = {"layer": fv.layer, "scale": 1.0, "valid": max(sweep.values()) if sweep else None}
    with cost(costs, "ffv", counter):
        settings = FinetuneSettings(lr=ffv_lr) if ffv_lr else None  # gemma3-270m wants ~10 (residual norm ~8,600)
        ffv = train_ffv(model, prepared, fv, settings=settings).result.ffv
    chosen["ffv"] = {"layer": ffv.layer, "scale": 1.0}
    with cost(costs, "residuals", counter):
        read_residual_stream(model, relation, store, n_prompts=100, n_shots=10)
    reads = load_residuals(store, name)
    vectors = {"ffv": ffv}
    for method in OTHERS:
        with cost(costs, method, counter):
            grid = scales if scales and method in ("mean-diff", "pca") else None
            vec, _ = fit_vector(model, prepared, reads, method, scales=grid, n_prompts=n_valid)
        vectors[method] = vec
        chosen[method] = {"layer": "1-%d" % (model.adapter.n_layers - 1) if "directions" in vec.meta else vec.layer,
                          "scale": vec.meta["scale"], "valid": vec.meta["validation_accuracy"]}
        vec.save(out / f"{name}.{method}.safetensors")
    fv.save(out / f"{name}.fv.safetensors")
    ffv.save(out / f"{name}.ffv.safetensors")
    n, _, conditions = evaluation_conditions(model, prepared, fv, n_shots=10, n_test=n_test, extra_vectors=vectors)
    t0 = time.perf_counter()
    work, owners = condition_work(model, list(conditions.values()))
    tops = by_condition(last_token_body(model, work, top1=True), owners, len(conditions))
    correct = {key: (torch.cat(top) == torch.tensor(ids)).int().tolist()
               for key, top, ids in zip(conditions, tops, answer_ids_of(list(conditions.values())))}
    print(f"{name}: evaluated {len(conditions)} conditions x {n} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return {"task": name, "n_test": n, "correct": correct, "costs": costs, "chosen": chosen}


def column(vec: str, prompt: str) -> str:
    """The evaluation_conditions key of a vector under a prompt kind ("zero_shot" / "shuffled")."""
    return f"{prompt}_fv" if vec == "fv" else f"{prompt}_{vec}"


def paired_ci(a: list[int], b: list[int]) -> list[float]:
    from scipy.stats import bootstrap

    x, y = np.asarray(a, float), np.asarray(b, float)
    if (x == y).all():
        return [0.0, 0.0]
    res = bootstrap((x, y), lambda p, q, axis=-1: (p - q).mean(axis), paired=True, vectorized=True,
                    n_resamples=2000, method="percentile", random_state=0)
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def mean_paired_ci(rows: list[dict], a: str, b: str) -> list[float]:
    """95% paired bootstrap CI of the mean over tasks of (a - b): items resampled together, each weighted 1 / (its
    task's n x the number of tasks), so the statistic is the mean of the per-task differences."""
    from scipy.stats import bootstrap

    x = np.concatenate([np.asarray(r["correct"][a], float) for r in rows])
    y = np.concatenate([np.asarray(r["correct"][b], float) for r in rows])
    w = np.concatenate([np.full(len(r["correct"][a]), 1 / (len(r["correct"][a]) * len(rows))) for r in rows])
    if (x == y).all():
        return [0.0, 0.0]
    res = bootstrap((x, y, w), lambda p, q, v, axis=-1: (v * (p - q)).sum(axis) / v.sum(axis), paired=True,
                    vectorized=True, n_resamples=2000, method="percentile", random_state=0)
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def report(out: Path) -> dict:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "results.json"]
    summary: dict = {"tasks": {}}
    for prompt in ("zero_shot", "shuffled"):
        print(f"\n**{prompt.replace('_', '-')} prompts + vector** (accuracy; [95% paired CI of the difference to "
              f"the FV])\n")
        print("| task | n | no vector | " + " | ".join(VECTORS) + " | ICL |")
        print("|---|---|---|" + "---|" * len(VECTORS) + "---|")
        for r in rows:
            c = r["correct"]
            cells = []
            for vec in VECTORS:
                acc = float(np.mean(c[column(vec, prompt)]))
                if vec == "fv":
                    cells.append(f"{acc:.2f}")
                else:
                    lo, hi = paired_ci(c[column(vec, prompt)], c[column("fv", prompt)])
                    cells.append(f"{acc:.2f} [{lo:+.2f}, {hi:+.2f}]")
                summary["tasks"].setdefault(r["task"], {})[f"{prompt}/{vec}"] = acc
            print(f"| {r['task']} | {r['n_test']} | {np.mean(c[prompt]):.2f} | " + " | ".join(cells)
                  + f" | {np.mean(c['icl']):.2f} |")
        cells = []
        for vec in VECTORS:
            mean = np.mean([np.mean(r["correct"][column(vec, prompt)]) for r in rows])
            summary.setdefault("mean", {})[f"{prompt}/{vec}"] = float(mean)
            if vec == "fv":
                cells.append(f"{mean:.2f}")
            else:
                lo, hi = mean_paired_ci(rows, column(vec, prompt), column("fv", prompt))
                cells.append(f"{mean:.2f} [{lo:+.2f}, {hi:+.2f}]")
        print(f"| mean of {len(rows)} | | {np.mean([np.mean(r['correct'][prompt]) for r in rows]):.2f} | "
              + " | ".join(cells) + f" | {np.mean([np.mean(r['correct']['icl']) for r in rows]):.2f} |")
    print("\n**Which vector wins where** (best accuracy; vs FV: paired 95% CI above 0 = better, below 0 = worse)\n")
    print("| task | zero-shot: best | better than FV | worse than FV | shuffled: best | better than FV "
          "| worse than FV |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for prompt in ("zero_shot", "shuffled"):
            c = r["correct"]
            accs = {v: float(np.mean(c[column(v, prompt)])) for v in VECTORS}
            top = max(accs.values())
            better, worse = [], []
            for vec in VECTORS[1:]:
                lo, hi = paired_ci(c[column(vec, prompt)], c[column("fv", prompt)])
                (better if lo > 0 else worse if hi < 0 else []).append(vec)
            cells += [", ".join(v for v, a in accs.items() if a == top) + f" ({top:.2f})", ", ".join(better) or "-",
                      ", ".join(worse) or "-"]
        print(f"| {r['task']} | " + " | ".join(cells) + " |")
    print("\n**Cost of building each vector** (sequence forwards / seconds; residuals shared by the four below it)\n")
    names = ["fv", "ffv", "residuals", *OTHERS]
    print("| task | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r['task']} | " + " | ".join(f"{r['costs'][k]['forwards']:,} / {r['costs'][k]['seconds']:.0f} s"
                                             for k in names) + " |")
    print("\n**Chosen on validation** (layer, scale; validation accuracy)\n")
    print("| task | " + " | ".join(VECTORS) + " |")
    print("|---|" + "---|" * len(VECTORS))
    for r in rows:
        cells = []
        for vec in VECTORS:
            ch = r["chosen"][vec]
            valid = f"; {ch['valid']:.2f}" if ch.get("valid") is not None else ""
            cells.append(f"L{ch['layer']} x{ch['scale']:g}{valid}")
        print(f"| {r['task']} | " + " | ".join(cells) + " |")
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--out", type=Path, default=Path("out/vector_methods"))
    ap.add_argument("--report", type=Path, default=None, help="only print the tables of a finished run")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (issue 24: the same FV/FFV accuracy)")
    ap.add_argument("--n-valid", type=int, default=None, help="validation prompts of every sweep (FV's too; "
                    "default: the library's, at most 50)")
    ap.add_argument("--n-test", type=int, default=None, help="test queries (default: the split, at most 200)")
    ap.add_argument("--ffv-lr", type=float, default=None, help="FFV learning rate (default: the library's 0.2; "
                    "gemma3-270m needs ~10, as `finetune` warns)")
    ap.add_argument("--scales", default=None, help="mean-diff/pca scale grid, e.g. 1,2,4 (default: the library's)")
    args = ap.parse_args()
    if args.report:
        report(args.report)
        return
    from fv_remote.models.loading import load_model
    from fv_remote.store.activations import ActivationStore

    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, dtype=args.dtype)
    scales = [float(x) for x in args.scales.split(",")] if args.scales else None
    counter = Counter(model.hf)
    store = ActivationStore(str(args.out / "store.zarr"))
    for name in args.tasks.split(","):
        target = args.out / f"{name}.json"
        if target.exists():
            continue
        t0 = time.perf_counter()
        row = run_task(model, counter, name, args.data_dir, store, args.out / "vectors", args.n_valid, args.n_test,
                       scales, args.ffv_lr)
        row["settings"] = {"dtype": args.dtype, "n_valid": args.n_valid, "n_test": args.n_test, "scales": scales,
                           "ffv_lr": args.ffv_lr}
        target.write_text(json.dumps(row))
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    report(args.out)


if __name__ == "__main__":
    main()
