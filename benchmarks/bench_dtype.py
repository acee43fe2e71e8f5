"""float32 vs bfloat16 on this device, in one run (issue 24): fast CMA, gradient attribution and FFV steps on the
same prompts, the ratios fp32 seconds / bf16 seconds; and the peak resident memory of loading the model in each
dtype (each load in a fresh process, so one does not inherit the other's pages).

  BENCH_PROMPTS   CMA / attribution prompts (default 3)
  BENCH_FFV_STEPS FFV optimiser steps (default 5)
  --device        as every bench (default cpu); the weights load straight to it in the dtype (`Placement`)

  cma_ratio, attribution_ratio, ffv_ratio = fp32 seconds / bf16 seconds (> 1: bf16 faster)
  load_peak_mib   = {dtype: peak RSS growth while loading, MiB}; head-out agreement: CMA top-10 overlap and
  Spearman rho of the per-head effects, fp32 vs bf16, on the same prompts
"""

import json
import os
import subprocess
import sys

import numpy as np
import torch

from _common import PeakRSS, Timer, emit, log, means_for, options, setup, task

TASK = os.environ.get("BENCH_TASK", "present-past")
N_PROMPTS = int(os.environ.get("BENCH_PROMPTS", "3"))
FFV_STEPS = int(os.environ.get("BENCH_FFV_STEPS", "5"))
DTYPES = ("float32", "bfloat16")


def _load(dtype: str):
    from fv_remote.models.loading import load_model

    return load_model(os.environ.get("BENCH_MODEL", "smollm2-135m"), device=options().device, dtype=dtype)


def load_peak(dtype: str) -> float:
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import bench_dtype as b; from _common import PeakRSS\n"
            f"with PeakRSS() as m: b._load({dtype!r})\nprint(m.peak)")
    proc = subprocess.run([sys.executable, "-c", code, "--device", options().device], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return round(int(proc.stdout.strip().splitlines()[-1]) / 2**20, 1)


def main() -> None:
    from scipy.stats import spearmanr

    from fv_remote.fv import cma
    from fv_remote.fv.attribution import attribution_prompt
    from fv_remote.relational.ffv import FinetuneSettings, examples, finetune

    env = setup()
    seconds: dict[str, dict[str, float]] = {}
    effects: dict[str, torch.Tensor] = {}
    means = None
    for dtype in DTYPES:
        model = _load(dtype)
        relation, prepared = task(model, TASK)
        if means is None:
            means = means_for(model, relation)  # float32 means from the fp32 extraction, shared by both dtypes
        prompts = prepared.prompts("train", N_PROMPTS, kind="shuffled", n_shots=10, seed_offset=1)
        jobs = [(p.text, prepared.answer_token[p.answer]) for p in prompts]
        cma.cma_prompt_fast(model, jobs[0][0], jobs[0][1], means, heads=cma.all_heads(model)[:9])  # warm-up
        t = {k: Timer() for k in ("cma", "attribution", "ffv")}
        found = []
        for text, answer in jobs:
            with t["cma"]:
                found.append(cma.cma_prompt_fast(model, text, answer, means)[1])
            with t["attribution"]:
                attribution_prompt(model, text, answer, means)
        effects[dtype] = torch.stack(found).mean(0).float()
        train = examples(prepared, "train", 16)
        with t["ffv"]:
            finetune(model, train, None, torch.zeros(model.adapter.d_model), model.adapter.n_layers // 2,
                     FinetuneSettings(steps=FFV_STEPS, lr=0.5))
        seconds[dtype] = {k: round(v.seconds, 3) for k, v in t.items()}
        log(f"{dtype}: {seconds[dtype]}")
        del model
    a, b = effects["float32"].numpy(), effects["bfloat16"].numpy()
    top = lambda x: set(np.argsort(-x)[:10].tolist())  # noqa: E731
    record = {"bench": "dtype", **env, "task": TASK, "prompts": N_PROMPTS, "ffv_steps": FFV_STEPS,
              "seconds": seconds,
              **{f"{k}_ratio": round(seconds["float32"][k] / max(seconds["bfloat16"][k], 1e-9), 2)
                 for k in ("cma", "attribution", "ffv")},
              "cma_top10_overlap": len(top(a) & top(b)), "cma_spearman": round(float(spearmanr(a, b)[0]), 3),
              "load_peak_mib": {d: load_peak(d) for d in DTYPES}}
    emit(record)


if __name__ == "__main__":
    main()
