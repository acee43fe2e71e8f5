"""examples/*.ipynb: committed without outputs, no `remote=` argument (the executor travels with the model),
and (integration, ~2 min on 2 cores) each runs top to bottom offline on smollm2-135m, as `make notebooks` runs them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support.tools import load_tool

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


def _runner():
    return load_tool("run_notebooks")


def _code_cells(path: Path) -> list[str]:
    import nbformat

    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_the_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "relational.ipynb", "remote_70b.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    stored = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stored, f"{path.name}: cells {stored} hold outputs (clear them: tools/run_notebooks.py --strip)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_stage_call_takes_a_remote_argument(path):
    """The executor travels with the model (`model.using(...)`): no notebook passes `remote=` to a stage."""
    uses = re.compile(r"\bremote\s*=(?!=)|[\"']remote[\"']\s*:")
    for source in _code_cells(path):
        for line in source.splitlines():
            assert not uses.search(line.split("#")[0]), f"{path.name}: {line!r}"


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_top_to_bottom(path, tmp_path):
    seconds = _runner().run(path, keep=tmp_path)
    print(f"{path.name}: {seconds:.0f} s")
