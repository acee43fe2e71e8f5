"""A loopback NDIF server for offline tests: nnsight 0.8.1's client protocol on 127.0.0.1, standard library only.

It speaks what `nnsight.intervention.backends.remote.RemoteBackend` expects:

- `GET /subscribe` (websocket): first text frame `{"session_id": ...}`, then one frame per status update of the
  jobs posted with that session id (JSON text frames; COMPLETED as a binary `ResponseModel.pickle()` frame
  carrying the result bytes, or as JSON with a download URL when the result is large);
- `POST /request` (multipart: `data` = the `RequestModel` JSON envelope, `blob` = the payload) -> RECEIVED JSON;
- `GET /response/{id}` (non-blocking polling) -> the latest status JSON, 404 before the first;
- `GET /result/{id}` -> the result bytes; `GET /status`, `GET /env` (for `nnsight.status()` / `nnsight.compare()`).

Each request is executed the way NDIF does it: `RequestModel.deserialize(blob, model._remoteable_persistent_objects())`
against a model it hosts (looked up by the repo id in the model key), then `tracer.execute(...)` inside a trace
scope, returning the values the block saved as `torch.save` bytes (zstd when the request asked for compression).
Like NDIF it freezes the weights, rejects pickled references to modules the server does not have (anything outside
torch/numpy/transformers/nnsight and the sandbox whitelist, e.g. this project's own package) and lets request code
import only the sandbox whitelist. It counts requests, records payload and result sizes and the variables a session
body left bound to objects it created (`Job.left_locals`: any of them could come back on NDIF, which matches saved
values by object id), and can simulate a server-side error, a job that never answers, a dropped connection and an
execution timeout.

The server runs in daemon threads of the test process; every socket has a timeout, jobs run one at a time, and
`stop()` (or leaving the `with` block) shuts everything down. Executing in-process means nnsight's per-file source
caches (`linecache`, `SOURCES`, `BLOCKS`) are shared with the client: they are set aside for the request's file while
a job runs and restored afterwards, as a separate server process would never see them.

Whose import rule is whose: the whitelist here (`SANDBOX_MODULES`) is the *old* NDIF server's list (early 2026).
ndif 0.1.2 has no import whitelist at all (trusted requests run in the model actor, untrusted ones in a runner
process with no further hardening). `fv_remote.traces` keeps the stricter rule (torch, math, typing, collections,
numpy), which fits both. The loopback applies its whitelist to trusted and sandboxed jobs alike.

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

import base64
import builtins
import contextlib
import hashlib
import io
import json
import linecache
import pickle
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# What request code may import (NDIF's sandbox list) and what may appear in a payload's pickle stream besides.
SANDBOX_MODULES = ("torch", "numpy", "collections", "math", "einops", "typing", "enum", "operator", "pandas",
                   "sympy", "time", "nnsight")
SERVER_PACKAGES = SANDBOX_MODULES + ("transformers", "cloudpickle", "builtins", "copyreg", "_codecs", "tokenizers",
                                     "types", "pickle", "_collections_abc")
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455


def _root(name: str) -> str:
    return name.split(".", 1)[0]


class SandboxViolation(ImportError):
    """Request code reached for a module the sandbox does not allow."""


@dataclass
class Job:
    id: str
    model_key: str
    session_id: str
    compress: bool
    env: dict
    payload_bytes: int
    blob: bytes = field(repr=False, default=b"")
    status: str = "RECEIVED"
    error: str = ""
    result_bytes: int = 0
    result: bytes | None = field(repr=False, default=None)
    # Variables the session body left bound to objects made while it ran (name -> type; None and plain scalars
    # aside): the server returns those whose object id is in the saved set, and ids of freed saved objects get reused.
    left_locals: dict = field(default_factory=dict)
    seconds: float = 0.0
    cancelled: bool = False
    last: str | None = field(repr=False, default=None)  # latest status as JSON, for GET /response/{id}
    sandboxed: bool = False  # ran in the emulated process sandbox ("trusted": false, or a sandbox=True server)


class _Session:
    """One open /subscribe websocket: the handler thread drains `outbox` onto the socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.outbox: list[tuple[int, bytes] | None] = []
        self.cond = threading.Condition()
        self.closed = False

    def put(self, item: tuple[int, bytes] | None) -> None:
        with self.cond:
            self.outbox.append(item)
            self.cond.notify()


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + payload


class LoopbackNDIF:
    """An NDIF stand-in hosting `models` ({repo_id: nnsight model}) on an ephemeral 127.0.0.1 port.

    Simulations, set before a request: `fail = "error"` (the job fails server-side), `"hang"` (the job is accepted
    and never answers; bounded by `hang_s`), `"drop"` (the websocket is closed while the job runs), and
    `exec_timeout` / `delay_s` (a job running longer than the timeout ends with NDIF's timeout error).
    `sandbox=True` runs every job in the emulated process sandbox (see the module docstring); otherwise only jobs
    whose envelope says `"trusted": false` do.
    """

    def __init__(self, models: dict[str, Any], *, api_key: str | None = None, exec_timeout: float = 60.0,
                 inline_limit: int = 1 << 20, hang_s: float = 20.0, env_override: dict | None = None,
                 autocast_dtype: Any = None, sandbox: bool = False):
        self.models = dict(models)
        self.sandbox = sandbox
        self.api_key = api_key
        self.exec_timeout = exec_timeout
        self.inline_limit = inline_limit
        self.hang_s = hang_s
        self.status_style = "ndif-0.1.2"  # what /status looks like (see status_json)
        self.env_override = dict(env_override or {})
        self.autocast_dtype = autocast_dtype
        self.fail: str | None = None
        self.delay_s = 0.0
        self.jobs: list[Job] = []
        self.by_id: dict[str, Job] = {}
        self.sessions: dict[str, _Session] = {}
        self.log: list[str] = []
        self._lock = threading.Lock()
        self._queue: list[Job] = []
        self._queue_cond = threading.Condition()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._env: dict | None = None
        self._threads: list[threading.Thread] = []
        for lm in self.models.values():  # NDIF serves frozen weights
            lm._module.requires_grad_(False)

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def n_requests(self) -> int:
        return len(self.jobs)

    def start(self) -> "LoopbackNDIF":
        server = self

        class Handler(_Handler):
            ndif = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.timeout = 1.0
        for target in (self._httpd.serve_forever, self._worker):
            thread = threading.Thread(target=target, daemon=True, name=f"loopback-ndif-{target.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._queue_cond:
            self._queue_cond.notify_all()
        for session in list(self.sessions.values()):
            session.put(None)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> "LoopbackNDIF":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget counted jobs and simulations (between tests sharing one server)."""
        with self._lock:
            self.jobs.clear()
            self.fail, self.delay_s = None, 0.0

    # -- status frames -----------------------------------------------------------------------------------------

    def _publish(self, job: Job, status: str, description: str = "", data: Any = None,
                 meta: dict | None = None) -> None:
        from nnsight.schema.response import ResponseModel

        job.status = status
        response = ResponseModel(id=job.id, status=status, description=description, data=data, meta=meta)
        url_response = response
        if isinstance(data, bytes):  # JSON cannot carry bytes: pollers get a URL to download from
            url_response = ResponseModel(id=job.id, status=status, description=description,
                                         data=f"{self.host}/result/{job.id}", meta=meta)
        job.last = url_response.model_dump_json()
        session = self.sessions.get(job.session_id)
        if session is None:
            return
        if isinstance(data, bytes) and len(data) <= self.inline_limit:
            session.put((0x2, response.pickle()))
        else:
            session.put((0x1, job.last.encode()))

    # -- execution ---------------------------------------------------------------------------------------------

    def _worker(self) -> None:
        while not self._stop.is_set():
            with self._queue_cond:
                while not self._queue and not self._stop.is_set():
                    self._queue_cond.wait(timeout=0.5)
                if self._stop.is_set():
                    return
                job = self._queue.pop(0)
            try:
                self._run(job)
            except Exception:  # never let the worker die: a bug here is reported to the client as an ERROR
                self._publish(job, "ERROR", "loopback server bug:\n" + traceback.format_exc())

    def _run(self, job: Job) -> None:
        self._publish(job, "QUEUED")
        self._publish(job, "RUNNING")
        if self.fail == "error":
            job.error = "simulated server error (CUDA out of memory)"
            self._publish(job, "ERROR", job.error)
            return
        if self.fail == "hang":
            self._stop.wait(self.hang_s)
            return
        if self.fail == "drop":
            session = self.sessions.get(job.session_id)
            if session is not None:
                session.put(None)  # the handler closes the socket without a close frame
            return
        start = time.perf_counter()
        box: dict[str, Any] = {}
        runner = threading.Thread(target=self._execute_into, args=(job, box), daemon=True,
                                  name=f"loopback-ndif-job-{job.id[:8]}")
        runner.start()
        runner.join(self.exec_timeout)
        job.seconds = time.perf_counter() - start
        if runner.is_alive():
            job.cancelled = True
            job.error = f"Job exceeded the execution timeout of {self.exec_timeout:g} s and was cancelled."
            self._publish(job, "ERROR", job.error)
            runner.join(self.hang_s)  # one job at a time: let a cancelled one wind down before the next starts
            return
        if "error" in box:
            job.error = box["error"]
            self._publish(job, "ERROR", job.error, meta={"seconds": job.seconds})
            return
        job.result = box["result"]
        job.result_bytes = len(job.result)
        self._publish(job, "COMPLETED", data=job.result, meta={"seconds": job.seconds})

    def _execute_into(self, job: Job, box: dict) -> None:
        try:
            if self.delay_s:
                self._stop.wait(self.delay_s)
            if job.cancelled or self._stop.is_set():
                return
            box["result"] = self.execute(job)
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the client as an ERROR
            box["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self.log.append(traceback.format_exc())

    def _model_for(self, model_key: str) -> Any:
        try:
            suffix = json.loads(model_key.split(":", 1)[1])
            repo_id = suffix["repo_id"]
        except (IndexError, ValueError, KeyError, TypeError):
            raise ValueError(f"malformed model key {model_key!r}") from None
        if repo_id not in self.models:
            raise ValueError(f"Model {repo_id!r} is not deployed on this server (hosted: {', '.join(self.models)})")
        return self.models[repo_id]

    def execute(self, job: Job) -> bytes:
        """Deserialize and run one request against the hosted model; return the result blob."""
        import torch
        from nnsight.schema.request import RequestModel
        from nnsight.tracing import globals as ng
        from nnsight.tracing.tracer import _saves, dec, inc

        model = self._model_for(job.model_key)
        model._remoteable_set_env(job.env)
        persistent = model._remoteable_persistent_objects()

        # In-process only: keep the client's view of the request's source file intact (see module docstring).
        saved_linecache = dict(linecache.cache)
        saved_sources = dict(ng.SOURCES)
        saved_blocks = dict(ng.BLOCKS)
        guard = _ImportGuard()
        sandbox = _SandboxEmulation() if job.sandboxed else contextlib.nullcontext()
        try:
            with guard, sandbox:
                tracer = RequestModel.deserialize(job.blob, persistent, compress=job.compress,
                                                  unpickler=_SandboxUnpickler)
                filename = tracer.info.frame.f_code.co_filename
                ng.SOURCES.pop(filename, None)
                for key in [k for k in ng.BLOCKS if k[0] == filename]:
                    ng.BLOCKS.pop(key)
                guard.request_files.add(filename)
                arrived = _reachable(tracer.info.frame.f_locals)  # what the body reads, kept alive till the end
                scopes: list[dict] = []
                inc()
                try:
                    with _ScopeRecorder.into(scopes):
                        if self.autocast_dtype is not None:
                            with torch.autocast("cpu", dtype=self.autocast_dtype):
                                tracer.execute(tracer.info.code)
                        else:
                            tracer.execute(tracer.info.code)
                    saves = _saves()
                    result = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saves}
                    final = scopes[-1] if scopes else {}
                    job.left_locals = {k: type(v).__name__ for k, v in final.items()
                                       if k != "__builtins__" and not _inert(v) and id(v) not in arrived}
                finally:
                    dec()
        finally:
            linecache.cache.clear()
            linecache.cache.update(saved_linecache)
            ng.SOURCES.clear()
            ng.SOURCES.update(saved_sources)
            ng.BLOCKS.clear()
            ng.BLOCKS.update(saved_blocks)
        result = _to_cpu(result)
        buffer = io.BytesIO()
        torch.save(result, buffer)
        data = buffer.getvalue()
        if job.compress:
            import zstandard as zstd

            data = zstd.ZstdCompressor(level=6).compress(data)
        return data

    # -- request intake ------------------------------------------------------------------------------------------

    def submit(self, metadata: dict, blob: bytes) -> Job:
        job = Job(id=str(uuid.uuid4()), model_key=metadata.get("model_key", ""),
                  session_id=metadata.get("session_id", "") or "", compress=bool(metadata.get("compress")),
                  env=metadata.get("env") or {}, payload_bytes=len(blob), blob=blob,
                  sandboxed=self.sandbox or metadata.get("trusted") is False)
        with self._lock:
            self.jobs.append(job)
            self.by_id[job.id] = job
        self._publish(job, "RECEIVED", "Your job has been received and is waiting to be queued.")
        with self._queue_cond:
            self._queue.append(job)
            self._queue_cond.notify()
        return job

    def status_json(self) -> dict:
        """`/status` as ndif 0.1.2 with nnsight 0.8.1 answers it (`status_style="ndif-0.1.2"`, the default): each
        model at level COLD without details, plus one `<replica>:<actor>:<model key>` entry whose
        `application_state` is RUNNING; or with complete details (`status_style="complete"`, older servers)."""
        deployments = {}
        for i, repo_id in enumerate(self.models):
            key = "nnsight.modeling.transformers.TransformersModel:" + json.dumps(
                {"repo_id": repo_id, "revision": None, "task": "text-generation"})
            if self.status_style == "complete":
                deployments[repo_id] = {"model_key": key, "repo_id": repo_id, "revision": "main",
                                        "task": "text-generation", "deployment_level": "HOT",
                                        "application_state": "RUNNING"}
                continue
            deployments[f"{i:05x}:ModelActor:{key}"] = {"application_state": "RUNNING"}
            deployments[repo_id] = {"deployment_level": "COLD", "repo_id": repo_id}
        return {"deployments": deployments}

    def env_json(self) -> dict:
        from nnsight.ndif import get_local_env

        if self._env is None:  # scanning the installed distributions takes ~0.4 s
            self._env = get_local_env()
        env = self._env
        packages = {k: v for k, v in env["packages"].items() if v != "local"}
        packages.update(self.env_override)
        return {"python_version": env["python_version"], "packages": packages}


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


class _Handler(BaseHTTPRequestHandler):
    ndif: LoopbackNDIF
    protocol_version = "HTTP/1.1"
    timeout = 30  # socket timeout for every request

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output clean
        self.ndif.log.append(format % args)

    def _send_json(self, code: int, body: Any) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.ndif.api_key is not None and self.headers.get("ndif-api-key") != self.ndif.api_key:
            self._send_json(401, {"detail": "Missing or invalid NDIF API key."})
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0]
        if path == "/subscribe":
            return self._subscribe()
        if path == "/status":
            return self._send_json(200, self.ndif.status_json())
        if path == "/env":
            return self._send_json(200, self.ndif.env_json())
        if path.startswith("/response/"):
            if not self._authorised():
                return
            job = self.ndif.by_id.get(path.rsplit("/", 1)[1])
            if job is None or job.last is None:
                return self._send_json(404, {"detail": "no such job"})
            return self._send_json(200, job.last)
        if path.startswith("/result/"):
            job = self.ndif.by_id.get(path.rsplit("/", 1)[1])
            if job is None or job.result is None:
                return self._send_json(404, {"detail": "no result"})
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(job.result)))
            self.end_headers()
            self.wfile.write(job.result)
            return
        self._send_json(404, {"detail": f"unknown path {path}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != "/request":
            return self._send_json(404, {"detail": "unknown path"})
        if not self._authorised():
            return
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
        fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                  for part in message.iter_parts()}
        if "data" not in fields or "blob" not in fields:
            return self._send_json(400, {"detail": "multipart fields 'data' and 'blob' are required"})
        try:
            metadata = json.loads(fields["data"])
        except ValueError:
            return self._send_json(400, {"detail": "request metadata is not JSON"})
        job = self.ndif.submit(metadata, fields["blob"])
        self._send_json(200, job.last)

    def _subscribe(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key")
        if not key or self.headers.get("Upgrade", "").lower() != "websocket":
            return self._send_json(400, {"detail": "websocket upgrade required"})
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        sock = self.connection
        session_id = str(uuid.uuid4())
        session = _Session(sock)
        self.ndif.sessions[session_id] = session
        reader = threading.Thread(target=self._read_client, args=(session,), daemon=True)
        try:
            sock.sendall(_ws_frame(0x1, json.dumps({"session_id": session_id}).encode()))
            reader.start()
            while not session.closed and not self.ndif._stop.is_set():
                with session.cond:
                    if not session.outbox:
                        session.cond.wait(timeout=0.5)
                    items, session.outbox = session.outbox, []
                for item in items:
                    if item is None:  # dropped: close the TCP connection without a websocket close frame
                        session.closed = True
                        break
                    sock.sendall(_ws_frame(*item))
        except OSError:
            pass
        finally:
            session.closed = True
            self.ndif.sessions.pop(session_id, None)
            self.close_connection = True
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _read_client(session: _Session) -> None:
        """Consume client frames (the client only sends a close frame); mark the session closed on EOF."""
        sock = session.sock
        try:
            while not session.closed:
                try:
                    head = sock.recv(2)
                except TimeoutError:
                    continue  # an idle client waiting for a long job
                if len(head) < 2:
                    break
                opcode, n = head[0] & 0x0F, head[1] & 0x7F
                if n == 126:
                    n = struct.unpack(">H", sock.recv(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", sock.recv(8))[0]
                remaining = n + (4 if head[1] & 0x80 else 0)
                while remaining > 0:
                    chunk = sock.recv(min(remaining, 1 << 16))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                if opcode == 0x8:
                    break
        except OSError:
            pass
        session.closed = True
        with session.cond:
            session.cond.notify()
