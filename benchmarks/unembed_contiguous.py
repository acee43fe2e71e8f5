"""FFV training with and without the contiguous-unembedding hook (models/loading.contiguous_unembedding_input):
seconds and peak RSS of `train_ffv` alone (gemma3-270m, antonym, random init at layer 8, lr 10), per dtype, each
configuration in its own process.

  PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unembed_contiguous.py --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def one(model_name: str, dtype: str, steps: int, hook: bool, data_dir: str) -> dict:
    import psutil
    import torch

    from fv_remote.data import load_task
    from fv_remote.data.tasks import prepare_task
    from fv_remote.models.loading import load_model
    from fv_remote.relational.ffv import FinetuneSettings, train_ffv

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    proc, peak = psutil.Process(), [0]

    def watch() -> None:
        while True:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    model = load_model(model_name, dtype=dtype)
    if not hook:  # the state before the fix
        model.hf.get_output_embeddings()._forward_pre_hooks.clear()
    prepared = prepare_task(model.tokenizer, load_task("antonym", data_dir=data_dir), seed=0, min_pairs=12)
    time.sleep(0.2)
    start_rss = peak[0] = proc.memory_info().rss
    t0 = time.perf_counter()
    run = train_ffv(model, prepared, None, init="random", layer=8, settings=FinetuneSettings(lr=10, steps=steps))
    seconds = time.perf_counter() - t0
    time.sleep(0.1)
    return {"dtype": dtype, "hook": hook, "seconds": round(seconds, 1), "peak_gib": round(peak[0] / 2**30, 2),
            "rss_before_gib": round(start_rss / 2**30, 2), "layer": run.result.ffv.layer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--data-dir", default="../shared/data/todd_fv/abstractive")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "dtype,hook": run one configuration
    args = ap.parse_args()
    if args.one:
        dtype, hook = args.one.split(",")
        print(json.dumps(one(args.model, dtype, args.steps, hook == "1", args.data_dir)))
        return
    print("| dtype | hook | train_ffv s | peak RSS GiB (RSS before) |\n|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        for hook in ("0", "1"):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                                  "--data-dir", args.data_dir, "--one", f"{dtype},{hook}"], capture_output=True,
                                 text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"| {dtype} | {'contiguous' if r['hook'] else 'strided (before)'} | {r['seconds']} | "
                  f"{r['peak_gib']} ({r['rss_before_gib']}) |", flush=True)


if __name__ == "__main__":
    main()
