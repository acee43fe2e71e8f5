"""Payload and result bytes of every remote stage, each run once through the loopback NDIF server on the tiny test
model (3 layers x 4 heads, d_model 64, a 306-token vocabulary); prints a Markdown table (the one in REMOTE_SIZES.md).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/remote_sizes.py [--values]

Payload: the request blob the client posts (zstd-compressed pickle of the session's source and the variables it
reads). Result: the blob the server sends back (zstd-compressed `torch.save` of the returned values). `--values` adds
a row per returned value with its own (uncompressed) size. The stages and their settings are
`tests/support/remote_catalog.STAGES`; a few dozen bytes of payload vary from run to run (job and file identifiers).
Not a `bench_*.py`: `make bench` does not run it, and it takes a few seconds on one core.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.remote_catalog import STAGES, harness, measure  # noqa: E402


def main() -> None:
    values = "--values" in sys.argv[1:]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fv-remote-sizes-") as tmp, \
            contextlib.redirect_stdout(io.StringIO()), harness(tmp) as h:  # quiet: nnsight's job status lines
        for stage in STAGES:
            m = measure(h, stage)
            rows.append((stage, m, ", ".join(sorted(set().union(*m.names)))))
    print("| stage | requests | payload bytes | result bytes | returned values | setting |")
    print("|---|---:|---:|---:|---|---|")
    for stage, m, returned in rows:
        print(f"| {stage.name} | {len(m.names)} | {m.payload_bytes:,} | {m.result_bytes:,} | {returned} | "
              f"{stage.setting} |")
    if values:
        print("\n| stage | request | value | type | bytes (uncompressed) |")
        print("|---|---:|---|---|---:|")
        for stage, m, _ in rows:
            for i, per in enumerate(m.values):
                for name, (kind, size) in per.items():
                    print(f"| {stage.name} | {i + 1} | `{name}` | {kind} | {size:,} |")


if __name__ == "__main__":
    main()
