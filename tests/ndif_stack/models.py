"""The models the real-NDIF tests deploy, as Hub-style cache entries under the stack's HF_HOME.

- `TINY_REPO`: the tests' tiny random Llama (3 layers, 4 heads, seed 3) with its tiny tokenizer: fast plumbing.
- `SMOL_REPO`: SmolLM2-135M-Instruct, the same dequantised weights `fv-remote models pull smollm2-135m` caches, so a
  local `-m smollm2-135m` run and a remote run use identical numbers: the stages that need a model that answers.

The client reads only config and tokenizer from the same cache (what a remote user downloads); the server loads the
weights from it. Both are deployed with NDIF's sandbox actor (on the CPU): trusted requests run inside the actor,
requests that ask for `"trusted": false` in a runner process with a weightless model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]

TINY_REPO = "fv-remote-tests/tiny-llama"
SMOL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
ACTOR = "cpu_actor.CPUSandboxModelActor"


def _unit_test_helpers() -> Any:
    """tests/conftest.py under its own module name (tests/ndif has a conftest of its own)."""
    import importlib.util

    name = "fv_remote_unit_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def tiny_snapshot(stack: Any) -> Path:
    helpers = _unit_test_helpers()
    tokenizer = helpers._tiny_tokenizer()
    model = helpers.make_tiny_model("llama", tokenizer, seed=3)

    def save(folder: Path) -> None:
        model.hf.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return stack.hub_snapshot(TINY_REPO, save=save)


def smol_snapshot(stack: Any) -> Path:
    from fv_remote.models.loading import model_dir, pull

    folder = pull("smollm2-135m")  # cached: returns at once
    folder = Path(folder) if folder else model_dir("smollm2-135m")
    files = {p.name: p for p in folder.iterdir() if p.is_file() and p.name != "fv_remote_model.json"}
    return stack.hub_snapshot(SMOL_REPO, files=files)


def model_key(repo: str, hub: Path) -> str:
    """The key the client will send for `repo` (what NDIF's deployment must be registered under)."""
    from fv_remote.execution import load_remote_model

    return load_remote_model(repo, cache_dir=str(hub)).lm.to_model_key()


def deploy_all(stack: Any, repos: tuple[str, ...] = (TINY_REPO, SMOL_REPO)) -> dict[str, str]:
    """Write the cache entries, deploy each repo with the CPU sandbox actor, return {repo: model key}."""
    makers = {TINY_REPO: tiny_snapshot, SMOL_REPO: smol_snapshot}
    keys = {}
    for repo in repos:
        makers[repo](stack)
        keys[repo] = model_key(repo, stack.hub)
    stack.deploy([{"checkpoint": repo, "model_key": key, "actor_class": ACTOR,
                   "size_bytes": 2**28 if repo == TINY_REPO else 2**30} for repo, key in keys.items()])
    return keys
