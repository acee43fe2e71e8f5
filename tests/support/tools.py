"""Load a development script from `tools/` (not an installed package) as a module, for the tests that check it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load_tool(name: str) -> ModuleType:
    """`tools/<name>.py` as module `fv_remote_<name>` (registered in sys.modules: its dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(f"fv_remote_{name}", TOOLS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
