"""Run notebooks top to bottom with nbclient, offline, from the repository root; report each one's time.

    python tools/run_notebooks.py examples/*.ipynb [--keep DIR]      (`make notebooks`)
    python tools/run_notebooks.py --strip examples/*.ipynb           (clear outputs before committing)

The committed notebooks hold no outputs (tests/test_notebooks.py checks); the executed copies go to `--keep DIR`
(default out/notebooks/).
A cell that raises stops its notebook, and the run exits 1 naming the notebook and the cell.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(path: Path, keep: Path | None, timeout: int = 900) -> float:
    """Execute one notebook in a fresh kernel of this Python; the seconds it took (kernel start included)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, keep / path.name)
    return time.perf_counter() - start


def strip_outputs(path: Path) -> bool:
    """Clear outputs and execution counts in place; True where the file changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after, encoding="utf-8")
    return after != before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--keep", type=Path, default=ROOT / "out" / "notebooks",
                        help="folder for the executed copies (default out/notebooks/)")
    parser.add_argument("--strip", action="store_true", help="only clear the notebooks' outputs, in place")
    args = parser.parse_args(argv)
    if args.strip:
        for path in args.notebooks:
            print(f"{path}: {'outputs cleared' if strip_outputs(path) else 'no outputs'}")
        return 0
    from nbclient.exceptions import CellExecutionError

    total, failed = 0.0, []
    for path in args.notebooks:
        print(f"{path}: running", flush=True)
        try:
            seconds = run(path, args.keep)
        except CellExecutionError as exc:
            failed.append(path)
            print(f"{path}: FAILED\n{exc}", flush=True)
            continue
        total += seconds
        print(f"{path}: ok in {seconds:.0f} s (executed copy: {args.keep / path.name})", flush=True)
    print(f"{len(args.notebooks) - len(failed)} of {len(args.notebooks)} notebooks ran, {total:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
