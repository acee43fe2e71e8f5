"""What may travel to NDIF: `fv_remote.traces` shipped by source, and a client-side check of a body's inputs."""

from __future__ import annotations

import functools
import importlib
import pkgutil
import types
from typing import Any

from fv_remote.core.errors import UserError

_REGISTERED = False


def register_traces() -> list[str]:
    """Register every `fv_remote.traces` module with `nnsight.register`, so their functions ship by source.

    Without this they are pickled by reference (`fv_remote.traces.heads.read_heads`) and NDIF, which does not have
    fv_remote installed, fails to unpickle the request. Idempotent.
    """
    global _REGISTERED
    import nnsight

    import fv_remote.traces as package

    names = [package.__name__] + [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    if not _REGISTERED:
        for name in names:
            nnsight.register(importlib.import_module(name))
        _order_payload()
        _REGISTERED = True
    return names


def _order_payload() -> None:
    """Make a request's bytes the same in every process, and the smaller of the two sizes they took.

    nnsight 0.8.1 collects the names a body reads in a set, so the order its variables are pickled in follows
    Python's per-process hash seed; when >= 256 objects come before the model's envoy tree, each reference back
    into the tree takes 5 bytes instead of 2 (~470 B per layer; RESULTS.md, cost planner). Here the envoys go
    first, then the rest by name."""
    from nnsight.intervention import serialization
    from nnsight.intervention.envoy import Envoy

    reduce = serialization.code_reduce

    def tree_first(item: tuple[str, Any]) -> tuple[bool, str]:
        name, value = item
        first = value[0] if isinstance(value, (list, tuple)) and value else value
        return not isinstance(first, Envoy), name

    def ordered(source: str, globals: dict, locals: dict, function: bool = False) -> tuple:
        code, used_globals, used_locals = reduce(source, globals, locals, function)
        return code, dict(sorted(used_globals.items())), dict(sorted(used_locals.items(), key=tree_first))

    serialization.code_reduce = ordered


def check_shippable(**values: Any) -> None:
    """Refuse, on the client, values a stage session would read that NDIF cannot unpickle.

    Call it with the variables the session body reads (`R.check_shippable(plan=plan, means=means)`) before entering
    `stage_session`. Plain values (numbers, strings, tensors, lists/tuples/dicts of them), envoys and functions from
    `fv_remote.traces` are fine; an object of a `fv_remote` class (LoadedModel, Adapter, Steer, FunctionVector,
    settings dataclasses...) or a function from elsewhere in `fv_remote` would be pickled by reference, which NDIF
    cannot resolve and which nnsight's dry run (remote="local") does not notice. Raises a UserError naming the path.
    """

    def visit(value: Any, path: str, depth: int) -> None:
        if depth > 6 or value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            return
        if isinstance(value, (list, tuple, set, frozenset)):
            for i, item in enumerate(value):
                visit(item, f"{path}[{i}]", depth + 1)
            return
        if isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{path}[{key!r}]", depth + 1)
            return
        plain_callable = isinstance(value, (type, types.FunctionType, types.MethodType, functools.partial))
        kind = (value.func if isinstance(value, functools.partial) else value) if plain_callable else type(value)
        module = getattr(kind, "__module__", "") or ""
        if module.startswith("fv_remote") and not module.startswith("fv_remote.traces"):
            what = getattr(kind, "__qualname__", repr(kind))
            raise UserError(f"{path} is a {module}.{what}, which cannot travel to NDIF (it would be pickled by "
                            "reference): pass plain values, envoys or fv_remote.traces helpers instead")

    for name, value in values.items():
        visit(value, name, 0)

