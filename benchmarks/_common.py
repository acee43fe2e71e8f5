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


def setup() -> dict:
    threads = os.environ.get("BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    return {"threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "load_avg_start": round(os.getloadavg()[0], 2)}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    record = {**record, "load_avg_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(record), flush=True)


def load():
    from fv_remote.models import load_model

    return load_model(os.environ.get("BENCH_MODEL", "smollm2-135m"))


def data_dir() -> str | None:
    env = os.environ.get("BENCH_DATA_DIR")
    if env:
        return env
    return str(TODD_DIR) if TODD_DIR.is_dir() else None


def task(model, name: str, n_shots: int = 10, seed: int = 0):
    """(RelationTask, PreparedTask) from BENCH_DATA_DIR (Todd files) or the bundled relations."""
    from fv_remote.data import load_task
    from fv_remote.tasks import prepare_task

    folder = data_dir()
    relation = load_task(name, data_dir=folder) if folder else load_task(name)
    return relation, prepare_task(model.tokenizer, relation, seed=seed, min_pairs=n_shots + 2)


def store():
    from fv_remote.store import ActivationStore

    out = Path(os.environ.get("BENCH_OUT", ROOT / "out" / "bench"))
    out.mkdir(parents=True, exist_ok=True)
    return ActivationStore(str(out / f"{os.environ.get('BENCH_MODEL', 'smollm2-135m')}.zarr"))


def means_for(model, relation, n_clean: int = 100, n_shots: int = 10):
    """Mean clean head outputs [L, H, Dh] (extraction cached in the bench store; resumes, never timed)."""
    from fv_remote.extract import extract, mean_heads_tensor

    st = store()
    if st.n_complete(relation.name) < n_clean:
        log(f"extracting {n_clean} clean prompts for {relation.name} (cached in {st.url})")
        extract(model, relation, st, n_prompts=n_clean, n_shots=n_shots)
    return mean_heads_tensor(st, relation.name)


class Timer:
    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._t


def aie_for(model, relation, prepared, means, n_prompts: int = 25):
    """Exact AIE [L, H] from the bench store (computed once with the fast exact CMA; never timed)."""
    from fv_remote.cma import load_aie, run_cma

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
