"""Shared helpers for the benchmarks: model loading, thread settings, task data, a resumable cache store, timing.

Every benchmark prints exactly one JSON line on stdout (progress goes to stderr). Ratios are measured within one
run, both sides under the same machine load; absolute seconds are reported too but only the ratios travel between
machines.

Environment:
  BENCH_MODEL     model (default smollm2-135m)
  BENCH_THREADS   torch CPU threads (default: torch's default). On a shared, oversubscribed CPU, 1 gives steadier
                  ratios.
  BENCH_DATA_DIR  folder of Todd-format task files (default: /work/shared/data/todd_fv/abstractive if present,
                  else the bundled relations)
  BENCH_OUT       where the cache store lives (default: out/bench); it only caches extraction (clean-prompt head
                  outputs for the means), never timed work.
  BENCH_CLEAN     clean prompts behind the mean activations (default 100)
  BENCH_DEVICE, BENCH_DTYPE, or the options --device (cpu, cuda, cuda:1, ...) and --dtype (float32, bfloat16,
                  float16) of every bench_*.py: where and in what precision the model runs (default cpu, float32).
                  benchmarks/gpu.sh runs the benchmarks this way on a GPU.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a Hub lookup hangs offline

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TODD_DIR = Path("/work/shared/data/todd_fv/abstractive")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def options():
    """--device and --dtype from the command line (other arguments are left to the script), else the environment."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", default=os.environ.get("BENCH_DEVICE", "cpu"))
    parser.add_argument("--dtype", default=os.environ.get("BENCH_DTYPE", "float32"), choices=sorted(DTYPES))
    args, _ = parser.parse_known_args()
    return args


def on_gpu() -> bool:
    return options().device.startswith("cuda")


def sync() -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on the CPU)."""
    if on_gpu():
        torch.cuda.synchronize()


def setup() -> dict:
    threads = os.environ.get("BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    opts = options()
    env = {"threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "device": opts.device, "dtype": opts.dtype, "load_avg_start": round(os.getloadavg()[0], 2)}
    if on_gpu():
        env["gpu"] = torch.cuda.get_device_name(torch.device(opts.device))
    return env


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    record = {**record, "load_avg_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(record), flush=True)


def load():
    from fv_remote.models.loading import load_model

    opts = options()
    return load_model(os.environ.get("BENCH_MODEL", "smollm2-135m"), device=opts.device, dtype=DTYPES[opts.dtype])


def data_dir() -> str | None:
    env = os.environ.get("BENCH_DATA_DIR")
    if env:
        return env
    return str(TODD_DIR) if TODD_DIR.is_dir() else None


def task(model, name: str, n_shots: int = 10, seed: int = 0):
    """(RelationTask, PreparedTask) from BENCH_DATA_DIR (Todd files) or the bundled relations."""
    from fv_remote.data import load_task
    from fv_remote.data.tasks import prepare_task

    folder = data_dir()
    relation = load_task(name, data_dir=folder) if folder else load_task(name)
    return relation, prepare_task(model.tokenizer, relation, seed=seed, min_pairs=n_shots + 2)


def store():
    from fv_remote.store.activations import ActivationStore

    out = Path(os.environ.get("BENCH_OUT", ROOT / "out" / "bench"))
    out.mkdir(parents=True, exist_ok=True)
    # one cache per model and dtype: bf16 head outputs are not fp32's
    dtype = "" if options().dtype == "float32" else f"-{options().dtype}"
    return ActivationStore(str(out / f"{os.environ.get('BENCH_MODEL', 'smollm2-135m')}{dtype}.zarr"))


def means_for(model, relation, n_clean: int | None = None, n_shots: int = 10):
    """Mean clean head outputs [L, H, Dh] (extraction cached in the bench store; resumes, never timed)."""
    from fv_remote.fv.extract import extract, mean_heads_tensor

    n_clean = n_clean or int(os.environ.get("BENCH_CLEAN", "100"))
    st = store()
    if st.n_complete(relation.name) < n_clean:
        log(f"extracting {n_clean} clean prompts for {relation.name} (cached in {st.url})")
        extract(model, relation, st, n_prompts=n_clean, n_shots=n_shots)
    return mean_heads_tensor(st, relation.name).to(model.hf.device)


def matmul_flops_per_s(n: int = 2048, reps: int = 5) -> float:
    """This machine's matrix-multiply throughput: the best of `reps` [n, n] @ [n, n] products in the benchmark's
    dtype and device (2 n^3 FLOPs each), measured now, under the same load as the benchmark."""
    opts = options()
    a = torch.randn(n, n, device=opts.device).to(DTYPES[opts.dtype])
    b = torch.randn(n, n, device=opts.device).to(DTYPES[opts.dtype])
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        with Timer() as t:
            a @ b
        best = min(best, t.seconds)
    return 2 * n**3 / best


def count_flops(fn) -> int:
    """Matmul FLOPs of `fn()` by torch's own counter, with eager attention so that attention products count too
    (SDPA computes the same products; its CPU kernel is not counted). Untimed."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class Timer:
    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        sync()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync()
        self.seconds += time.perf_counter() - self._t


def aie_for(model, relation, prepared, means, n_prompts: int | None = None):
    """Exact AIE [L, H] from the bench store (computed once with the fast exact CMA; never timed)."""
    from fv_remote.fv.cma import load_aie, run_cma

    n_prompts = n_prompts or int(os.environ.get("BENCH_PROMPTS", "25"))
    st = store()
    if st.n_complete(f"{relation.name}/cma") < n_prompts:
        log(f"exact CMA on {n_prompts} prompts for {relation.name} (cached in {st.url})")
        run_cma(model, prepared, st, means, n_prompts=n_prompts)
    return load_aie(st, relation.name, n_prompts, source="cma")


class PeakRSS:
    """Peak resident memory (bytes) above the level at entry, sampled every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self.start = interval, 0, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.start)
            self._stop.wait(self.interval)

    def __enter__(self):
        import threading

        self.start = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.start)
