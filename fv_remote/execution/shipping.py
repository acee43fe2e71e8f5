"""What may travel to NDIF: `fv_remote.traces` shipped by source, and a client-side check of a body's inputs."""

from __future__ import annotations

import functools
import importlib
import pkgutil
import types
from typing import Any

from fv_remote.errors import UserError

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
        _REGISTERED = True
    return names


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

