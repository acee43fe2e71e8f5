"""The real NDIF stack for the tests in this folder (marker `ndif`; `make test-ndif` runs them, `make test` does not).

One stack per test session: started, the tiny Llama and SmolLM2-135M deployed with NDIF's sandbox actor (CPU), and
stopped at the end (also after a failure or Ctrl-C). Needs `.venv-ndif` (tests/ndif_stack/setup_env.sh); without it
every test here is skipped with the command to run, and so is every test here outside `make test-ndif`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "ndif_stack"))

# Set by `make test-ndif`: a plain `pytest` (or `make test`) never starts the real stack, even where .venv-ndif exists.
VENV_ENV = os.environ.get("FV_REMOTE_NDIF_VENV")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.ndif)


@pytest.fixture(scope="session")
def stack():
    if not VENV_ENV:
        pytest.skip("the real NDIF stack runs under `make test-ndif` only (FV_REMOTE_NDIF_VENV unset)")
    venv = Path(VENV_ENV)
    if not (venv / ".ndif-installed").exists():
        pytest.skip(f"no NDIF environment at {venv}: run `make test-ndif` (it sets one up)")
    from models import deploy_all
    from stack import NDIFStack

    ndif = NDIFStack(venv)
    with ndif:
        ndif.keys = deploy_all(ndif)
        yield ndif
    # stopped: nothing of it may be left running or listening
    from stack import marked_processes

    left = marked_processes(ndif.token)
    listening = [port for port in ndif.ports.values() if ndif._tcp(port)]
    print(f"\nNDIF stack stopped: {len(left)} process(es) left, ports still listening: {listening or 'none'}")
    assert not left and not listening, (left, listening)
