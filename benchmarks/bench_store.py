"""Activation store: write/read throughput, bytes per activation, and the time to fit an FV from the store.

Real head outputs (two traced batches of BENCH_STORE_BATCH=16 ten-shot clean prompts, all 270 heads x 64 dims at
the last token) are appended alternately, BENCH_STORE_BATCHES=8 batches in all, to a fresh Zarr store exactly as `extract` does (one append per
batch, resumable commit). Then the store is read back, and an FV is fitted from it (means over correct prompts +
AIE from 25 stored prompts + top-10 projection; no sweep).

  write_vs_trace        = seconds to append one batch / seconds to trace that batch (the store's share of extract)
  fit_vs_trace          = seconds to fit an FV from the store / seconds to trace one batch
  bytes_per_activation  = on-disk bytes of the head outputs / number of stored float values (raw float32 = 4)
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch

from _common import Timer, emit, load, log, setup, task

from fv_remote.fv import cma
from fv_remote.fv.extract import _batch_dataset, mean_heads_tensor, trace_heads
from fv_remote.store.activations import ActivationStore
from fv_remote.fv.vectors import build_function_vector

TASK = os.environ.get("BENCH_TASK", "present-past")
BATCH = int(os.environ.get("BENCH_STORE_BATCH", "16"))
N_BATCHES = int(os.environ.get("BENCH_STORE_BATCHES", "8"))


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    env = setup()
    model = load()
    ad = model.adapter
    _, prepared = task(model, TASK)
    prompts = prepared.prompts("train", 2 * BATCH, kind="clean", n_shots=10)
    answers = prepared.ids(prompts)
    trace_heads(model, [p.text for p in prompts[:2]], answers[:2])  # warm-up
    # Two distinct traced batches, written alternately: every 32-prompt Zarr chunk holds 32 different prompts, so
    # the compression ratio is not flattered by repeated rows.
    outs = []
    t_trace = Timer()
    for half in (slice(0, BATCH), slice(BATCH, 2 * BATCH)):
        with t_trace:
            outs.append(trace_heads(model, [p.text for p in prompts[half]], answers[half]))
    t_trace.seconds /= 2
    tmp = Path(tempfile.mkdtemp(prefix="fv-bench-store-"))
    try:
        store = ActivationStore(str(tmp / "s.zarr"))
        identity = {"model": model.model_id, "task": prepared.name, "n_layers": ad.n_layers, "n_heads": ad.n_heads,
                    "head_dim": ad.head_dim, "n_shots": 10, "seed": 0, "positions": [-1], "kind": "clean"}
        t_write = Timer()
        for b in range(N_BATCHES):
            half = slice((b % 2) * BATCH, (b % 2 + 1) * BATCH)
            batch = _batch_dataset(b * BATCH, prompts[half], answers[half], outs[b % 2], (-1,), ad)
            with t_write:
                store.append(prepared.name, batch, identity)
        n = N_BATCHES * BATCH
        values = n * ad.n_layers * ad.n_heads * ad.head_dim
        payload = values * 4
        with Timer() as t_read:
            heads = store.open(prepared.name)["head_out"].values
        assert heads.shape == (n, ad.n_layers, ad.n_heads, ad.head_dim)
        on_disk = du(tmp / "s.zarr" / prepared.name / "head_out")
        gen = torch.Generator().manual_seed(0)
        cma.run_head_scores(model, prepared, store, torch.zeros(1), lambda *a: (0.5, torch.randn(
            ad.n_layers * ad.n_heads, generator=gen)), "cma", "synthetic", n_prompts=25)
        with Timer() as t_fit:
            means = mean_heads_tensor(store, prepared.name)
            aie = cma.load_aie(store, prepared.name)
            build_function_vector(model, prepared.name, means, aie, k=10)
        log(f"trace {t_trace.seconds:.2f}s/batch, write {t_write.seconds / N_BATCHES:.3f}s/batch, "
            f"read {t_read.seconds:.3f}s, fit {t_fit.seconds:.3f}s")
        emit({
            "bench": "store",
            "write_vs_trace": round(t_write.seconds / N_BATCHES / t_trace.seconds, 4),
            "fit_vs_trace": round(t_fit.seconds / t_trace.seconds, 4),
            "bytes_per_activation": round(on_disk / values, 3),
            "write_mb_per_s": round(payload / 2**20 / t_write.seconds, 1),
            "read_mb_per_s": round(payload / 2**20 / t_read.seconds, 1),
            "fit_s": round(t_fit.seconds, 3),
            "prompts": n, "batch": BATCH, "trace_s_per_batch": round(t_trace.seconds, 3),
            "model": model.model_id, **env,
        })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
