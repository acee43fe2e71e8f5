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

Sandbox mode (ndif 0.1.2's process sandbox): see `ndif_sandbox`, which this server switches on per job.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import linecache
import socket
import struct
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .ndif_sandbox import (_ImportGuard, _inert, _reachable, _SandboxEmulation, _SandboxUnpickler, _ScopeRecorder,
                           _to_cpu)

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455


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
