"""The stage registry: every stage once, plans JSON-able, and the docs' stage table generated from it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from fv_remote.execution.stage import Stage
from fv_remote.stages import STAGES, stage_table

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_is_registered_once_with_a_dataclass_plan():
    assert list(STAGES) == ["extract", "cma", "fit", "evaluate", "finetune", "bank", "decode", "analogy", "residuals",
                            "fit-vector"]
    for name, stage in STAGES.items():
        assert isinstance(stage, Stage) and stage.name == name and dataclasses.is_dataclass(stage.plan_type)
    assert {r["stage"] for r in stage_table() if r["no-wait"] == "yes"} == {"extract", "cma", "evaluate", "finetune",
                                                                          "bank", "residuals"}


def test_architecture_stage_table_is_generated_from_the_registry():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "stage_table.py"), "--check"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
