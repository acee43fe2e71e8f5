"""The loopback NDIF server's sandbox: the import whitelist, the payload unpickler and the emulation of ndif
0.1.2's runner process.

Sandbox mode (ndif 0.1.2's process sandbox, `ndif/services/ray/sandbox/`): a job runs sandboxed when the request
envelope says `"trusted": false` (the client sends that with FV_REMOTE_SANDBOX=1) or the server was made with
`LoopbackNDIF(..., sandbox=True)`; `Job.sandboxed` records which. There NDIF runs the body in a runner process that
holds a weightless (meta) model and drives the host's forward pass over a socket, whose codec is `torch.save` /
`torch.load`. The loopback still runs everything in one thread, but while a sandboxed job runs it imitates the
runner's limits (`_SandboxEmulation`):
- parameters cannot be read: `.weight`, `.bias`, any tensor attribute (parameter or buffer) and `parameters()`,
  `named_parameters()`, `buffers()`, `state_dict()`... of a module, reached through an envoy by request code (the
  body, or a function it shipped), raise `AttributeError: 'Envoy' object (nor its module) has attribute 'weight'`,
  what the real runner raised;
- every value that crosses the socket there crosses here as a `torch.save` / `torch.load` round trip, so it is a
  copy cut from the autograd graph (a tensor that required grad arrives as a new leaf that still does): an
  activation read by the body (the runner gets a copy; after the worker moves on, the copy, edited in place or not,
  is swapped back into the forward pass, as `nns.IPCInterleaver.writeback` does), a value the body swaps or skips
  in, the trace's inputs and the forward's result, and the arguments and output of an ad-hoc module call
  (`envoy(x)` inside a trace, the runner's CALL event, run here with the real weights). So no gradient crosses:
  `loss.backward()` in the body never reaches a vector the body added to the residual stream (its `.grad` stays
  None), as on NDIF;
- an ad-hoc module call by request code outside a trace (in a session body) fails: the runner has no weights to
  run it on and no host to ask (the real one fails with AttributeError: 'NoneType' object has no attribute
  'switch').
Not emulated: the separate process and its socket (the job shares this process, so request code that reaches for
`envoy._module` still finds the real module with its weights, and `envoy.device` the real device); `.grad` locations
raising `OutOfOrderError` (here a backward in the body simply sees the copies); `.source`, `tracer.cache()` and
`tracer.barrier()` served by the host; the runner's 8-variable environment, its fresh process per request and its
PRINT events. Trusted jobs run exactly as before.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import pickle
import sys
import threading
from typing import Any

# What request code may import (NDIF's sandbox list) and what may appear in a payload's pickle stream besides.
SANDBOX_MODULES = ("torch", "numpy", "collections", "math", "einops", "typing", "enum", "operator", "pandas",
                   "sympy", "time", "nnsight")
SERVER_PACKAGES = SANDBOX_MODULES + ("transformers", "cloudpickle", "builtins", "copyreg", "_codecs", "tokenizers",
                                     "types", "pickle", "_collections_abc")


def _root(name: str) -> str:
    return name.split(".", 1)[0]


class SandboxViolation(ImportError):
    """Request code reached for a module the sandbox does not allow."""



class _ScopeRecorder:
    """While a job runs in its thread: copies of the outermost block's variables, taken when nnsight is about to keep
    only the saved ones (`push_result` at depth 1), so a job can report what its body left behind. Installed for
    as long as some job runs; other threads (the client's) pass straight through."""

    lock = threading.Lock()
    users = 0
    original: Any = None
    state = threading.local()

    @classmethod
    @contextlib.contextmanager
    def into(cls, target: list) -> Any:
        import nnsight.tracing.tracer as nt

        with cls.lock:
            if cls.users == 0:
                cls.original = nt.push_result
                nt.push_result = cls._record
            cls.users += 1
        cls.state.target = target
        try:
            yield
        finally:
            cls.state.target = None
            with cls.lock:
                cls.users -= 1
                if cls.users == 0:
                    nt.push_result = cls.original

    @classmethod
    def _record(cls, frame: Any, variables: dict) -> None:
        import nnsight.tracing.tracer as nt

        target = getattr(cls.state, "target", None)
        if target is not None and getattr(nt._local, "depth", 0) == 1:
            target.append(dict(variables))
        return cls.original(frame, variables)


def _reachable(variables: dict) -> dict[int, Any]:
    """Every object reachable from `variables` through lists, tuples, sets and dicts: {id: object} (the objects are
    held, so their ids stay theirs). Such objects existed before the body ran: they cannot share an id with
    anything it saved and freed."""
    seen: dict[int, Any] = {}
    stack = list(variables.values())
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen[id(value)] = value
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
    return seen


def _inert(value: Any) -> bool:
    """None and plain scalars: nothing worth sending back even if their id collided with a saved object's."""
    return value is None or isinstance(value, (bool, int, float, complex, str, bytes))


def _to_cpu(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return type(value)((k, _to_cpu(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class _SandboxUnpickler(pickle.Unpickler):
    """nnsight's CustomCloudUnpickler, refusing classes/functions from modules the server does not have."""

    def __init__(self, file: Any, persistent_objects: dict | None):
        super().__init__(file)
        self.persistent_objects = persistent_objects or {}

    def persistent_load(self, pid: Any) -> Any:
        from nnsight.intervention.serialization import UnknownPersistentIdError

        if pid in self.persistent_objects:
            return self.persistent_objects[pid]
        raise UnknownPersistentIdError(pid)

    def find_class(self, module: str, name: str) -> Any:
        if _root(module) not in SERVER_PACKAGES:
            raise ModuleNotFoundError(f"No module named {module!r} on the NDIF server (pickled by reference; "
                                      "register it with nnsight.register to ship it by value)", name=module)
        return super().find_class(module, name)


_sandbox_state = threading.local()


def _in_sandbox() -> bool:
    return getattr(_sandbox_state, "active", False)


def _cross(value: Any) -> Any:
    """One trip over the runner's socket: ndif's codec (`sandbox/protocol.py`) is `torch.save` / `torch.load`, so
    the value arrives as a copy cut from the autograd graph (a tensor that required grad becomes a new leaf that
    still does)."""
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# Module attributes that hand out parameters or buffers; the runner's module has no weights to give.
_PARAMETER_NAMES = frozenset({"weight", "bias", "parameters", "named_parameters", "buffers", "named_buffers",
                              "state_dict", "get_parameter", "get_buffer"})
_HELD = object()  # marks "no park held back" (a held park may itself be None: the worker finished)


class _SandboxEmulation:
    """While active in this thread: the runner's limits (module docstring). The patches are installed on nnsight's
    classes while some sandboxed job runs and act only in the thread that runs it; other threads (the client's)
    and trusted jobs get the originals."""

    _installed = 0
    _install_lock = threading.Lock()
    _originals: dict[str, Any] = {}

    def __enter__(self) -> "_SandboxEmulation":
        from nnsight.intervention.batching import Batcher
        from nnsight.intervention.envoy import Envoy
        from nnsight.intervention.interleaver import Mediator

        with _SandboxEmulation._install_lock:
            if _SandboxEmulation._installed == 0:
                originals = _SandboxEmulation._originals
                originals.update(switch=Mediator.switch, getattr=Envoy.__getattr__, call=Envoy.__call__,
                                 interleave=Envoy.interleave, assemble=Batcher.assemble)
                Mediator.switch = _sandbox_switch
                Envoy.__getattr__ = _sandbox_getattr
                Envoy.__call__ = _sandbox_call
                Envoy.interleave = _sandbox_interleave
                Batcher.assemble = _sandbox_assemble
            _SandboxEmulation._installed += 1
        _sandbox_state.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        from nnsight.intervention.batching import Batcher
        from nnsight.intervention.envoy import Envoy
        from nnsight.intervention.interleaver import Mediator

        _sandbox_state.active = False
        with _SandboxEmulation._install_lock:
            _SandboxEmulation._installed -= 1
            if _SandboxEmulation._installed == 0:
                originals = _SandboxEmulation._originals
                Mediator.switch = originals["switch"]
                Envoy.__getattr__ = originals["getattr"]
                Envoy.__call__ = originals["call"]
                Envoy.interleave = originals["interleave"]
                Batcher.assemble = originals["assemble"]


def _crossed_park(park: Any) -> Any:
    """A worker's park as the host receives it: a swap's or skip's replacement value crossed the socket."""
    from nnsight.intervention.interleaver import Event

    if park is not None and park.event in (Event.SWAP, Event.SKIP):
        return park._replace(value=_cross(park.value))
    return park


def _sandbox_switch(self: Any, *args: Any) -> Any:
    """`Mediator.switch` (host -> worker -> next park) as the sandbox's host proxy sees it.

    A read hands the worker a copy. When the worker parks again, the runner first swaps that copy (edited in place
    or not) back in at the location it read (`nns.IPCInterleaver.writeback`) and only then sends the new park: here
    the write-back is returned as a SWAP park for `Mediator.handle` to splice in, and the held-back park answers the
    resume that follows it."""
    from nnsight.intervention.interleaver import Event, Pending

    original = _SandboxEmulation._originals["switch"]
    if not _in_sandbox():
        return original(self, *args)
    held = self.__dict__.pop("_loopback_held", _HELD)
    if held is not _HELD:
        return held
    read = self.pending
    if not args or read is None or read.event is not Event.VALUE:
        return _crossed_park(original(self, *args))
    copy = _cross(args[0])
    park = original(self, copy, *args[1:])
    self._loopback_held = _crossed_park(park)
    return Pending(Event.SWAP, read.provider, read.iteration, _cross(copy))


def _runner_side(depth: int = 2) -> bool:
    """Whether the caller `depth` frames up is request code (it would run in the runner), not nnsight's own code
    driving the model (which runs on the host, e.g. `TransformersModel._generate` calling `model.generator`)."""
    guard = getattr(_guard_state, "guard", None)
    return guard is not None and guard.is_request_code(sys._getframe(depth).f_code.co_filename)


def _sandbox_getattr(self: Any, name: str) -> Any:
    """`Envoy.__getattr__` in the runner: the module there is weightless, so its parameters cannot be read."""
    import torch

    value = _SandboxEmulation._originals["getattr"](self, name)
    if (_in_sandbox() and (name in _PARAMETER_NAMES or isinstance(value, torch.Tensor))
            and _runner_side()):
        raise AttributeError(f"{type(self).__name__!r} object (nor its module) has attribute {name!r}")
    return value


def _sandbox_call(self: Any, *args: Any, hook: bool = False, **kwargs: Any) -> Any:
    """`Envoy.__call__` in the runner (`nns.IPCEnvoy.__call__`): inside a trace a CALL event the host serves with the
    real weights (arguments and output cross the socket); outside one there is nothing to serve it."""
    from greenlet import getcurrent

    original = _SandboxEmulation._originals["call"]
    if not _in_sandbox() or not _runner_side():
        return original(self, *args, hook=hook, **kwargs)
    if getattr(getcurrent(), "mediator", None) is None:
        raise AttributeError(f"calling {self.path} outside a trace: NDIF's sandbox runner holds no weights and "
                             "serves ad-hoc module calls only inside a trace (the real runner fails with "
                             "AttributeError: 'NoneType' object has no attribute 'switch')")
    args, kwargs = _cross((args, kwargs))
    return _cross(original(self, *args, hook=hook, **kwargs))


def _sandbox_assemble(self: Any, fn: Any) -> tuple:
    """`Batcher.assemble`: the trace's inputs reach the host over the socket (the INTERLEAVE message)."""
    result = _SandboxEmulation._originals["assemble"](self, fn)
    return _cross(result) if _in_sandbox() else result


def _sandbox_interleave(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`Envoy.interleave`: the forward's result comes back to the runner over the socket (DONE)."""
    result = _SandboxEmulation._originals["interleave"](self, fn, *args, **kwargs)
    return _cross(result) if _in_sandbox() else result


_REAL_IMPORT = builtins.__import__
_guard_state = threading.local()


class _ImportGuard:
    """While active in this thread: request code (the block's file, functions rebuilt from shipped source) may only
    import the sandbox whitelist, and cloudpickle may only re-import whitelisted modules for the payload."""

    _installed = 0
    _install_lock = threading.Lock()

    def __init__(self):
        self.request_files: set[str] = set()

    def __enter__(self) -> "_ImportGuard":
        import cloudpickle.cloudpickle as cp

        with _ImportGuard._install_lock:
            if _ImportGuard._installed == 0:
                builtins.__import__ = _guarded_import
                self._saved_subimport = cp.subimport
                self._saved_dynamic = cp.dynamic_subimport
                cp.subimport = _guarded_subimport(cp.subimport)
                cp.dynamic_subimport = _guarded_subimport(cp.dynamic_subimport)
            _ImportGuard._installed += 1
        _guard_state.guard = self
        return self

    def __exit__(self, *exc: Any) -> None:
        import cloudpickle.cloudpickle as cp

        _guard_state.guard = None
        with _ImportGuard._install_lock:
            _ImportGuard._installed -= 1
            if _ImportGuard._installed == 0:
                builtins.__import__ = _REAL_IMPORT
                cp.subimport = self._saved_subimport
                cp.dynamic_subimport = self._saved_dynamic

    def is_request_code(self, filename: str) -> bool:
        return filename in self.request_files or filename.startswith("[")


def _sandbox_allows(name: str) -> bool:
    return _root(name) in SANDBOX_MODULES


def _guarded_subimport(original: Any) -> Any:
    def subimport(name: str, *args: Any) -> Any:
        if getattr(_guard_state, "guard", None) is not None and not _sandbox_allows(name):
            raise SandboxViolation(f"Module {name} is not whitelisted on the NDIF server")
        return original(name, *args)

    return subimport


def _guarded_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
    guard = getattr(_guard_state, "guard", None)
    if guard is not None and level == 0 and not _sandbox_allows(name):
        caller = sys._getframe(1).f_code.co_filename
        if guard.is_request_code(caller):
            raise SandboxViolation(f"Module {name} is not whitelisted on the NDIF server")
    return _REAL_IMPORT(name, globals, locals, fromlist, level)


