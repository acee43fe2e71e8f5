"""Running stages on NDIF: configuration, one request per stage, weightless remote models, service checks.

How a stage runs remotely (nnsight 0.8.1):
- the stage's traces and loops sit in one `with stage_session(model, remote):` block; with `remote=True` the whole
  block is one NDIF request (a `model.session` whose backend ships it), with `remote="local"` nnsight serialises and
  deserialises it in-process (a serverless dry run), with `remote=False` it is plain local code (no session);
- the block's *source text* travels, with only the variables it reads; modules, the tokenizer and the interleaver go
  as ids the server resolves against its own copy of the model. Helpers called inside it must come from
  `fv_remote.traces` (registered here to ship by value) and plain values (ints, lists, tensors) — never objects of
  `fv_remote` classes (adapters, LoadedModel): those are pickled by reference and the server does not have them;
- only values marked with `nnsight.save` come back, pushed into the caller's frame when the block ends. The server
  matches them by object id against *every* variable of the block, so a value saved only to leave a trace (a KV
  cache, logits) comes back too while a variable still holds it, and ids of freed saved objects get reused: a block
  ends by setting every variable it created except its results to None (tests/test_remote_results.py checks this
  per stage; benchmarks/REMOTE_SIZES.md has the sizes).

Configuration: API key from `NDIF_API_KEY` or nnsight's config (`nnsight login`), host from `NDIF_HOST` or
nnsight's `CONFIG.API.HOST`, client wait limit from `FV_REMOTE_TIMEOUT` (seconds).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import json
import os
import pkgutil
import time
import types
from dataclasses import dataclass, field
from typing import Any

from fv_remote.errors import UserError

DEFAULT_TIMEOUT_S = 3600.0
# Status and /env checks are quick; don't hang a CLI on a dead host.
_HTTP_TIMEOUT = (5.0, 30.0)
# nnsight versions this client can talk to (0.8 changed the wire protocol: websocket + HTTP instead of socket.io).
SUPPORTED_SERVER = "0.8"


# -- configuration ----------------------------------------------------------------------------------------------

def api_key() -> str | None:
    """NDIF_API_KEY, else the key in nnsight's config (`nnsight login` / CONFIG.set_default_api_key)."""
    from nnsight import CONFIG

    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or None


def host() -> str:
    """NDIF_HOST, else nnsight's CONFIG.API.HOST (read at call time, so tests can point it elsewhere)."""
    from nnsight import CONFIG

    value = (os.environ.get("NDIF_HOST") or CONFIG.API.HOST or "").rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise UserError(f"NDIF host {value!r} must start with http:// or https:// (set NDIF_HOST)")
    return value


def timeout_s() -> float:
    raw = os.environ.get("FV_REMOTE_TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"FV_REMOTE_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise UserError(f"FV_REMOTE_TIMEOUT must be positive, got {raw!r}")
    return value


def sandboxed() -> bool:
    """FV_REMOTE_SANDBOX=1: ask NDIF to run requests in its process sandbox (`"trusted": false` in the envelope).

    Public NDIF runs ordinary users' requests there (a runner process with a weightless model; no gradients cross
    to it); a server with auth off runs requests trusted unless asked. Set it to check a stage the way public NDIF
    will run it. A server with auth on decides by the API key and ignores this.
    """
    raw = os.environ.get("FV_REMOTE_SANDBOX", "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise UserError(f"FV_REMOTE_SANDBOX must be 1 or 0, got {raw!r}")


def remote_mode(remote: Any) -> str | None:
    """Normalise a `remote` argument: False/None -> None (local), True/"ndif" -> "ndif", "local" -> "local"."""
    if remote is None or remote is False:
        return None
    if remote is True or remote == "ndif":
        return "ndif"
    if remote == "local":
        return "local"
    raise UserError(f"remote must be False, True (NDIF) or 'local' (serialise in-process), got {remote!r}")


# -- shipping helpers by value ----------------------------------------------------------------------------------

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


# -- the remote backend -----------------------------------------------------------------------------------------

@dataclass
class JobRecord:
    """What the last remote request did (for progress lines and size reports)."""

    job_id: str | None = None
    host: str = ""
    status: str = ""
    payload_bytes: int = 0
    result_bytes: int = 0
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)


last_job = JobRecord()


class JobSubmitted(Exception):
    """Raised out of a stage run under `no_wait()` as soon as its request is submitted.

    Nothing was computed locally and nothing was stored. `record` has the job id; stages add to `details` what is
    needed to store the results later exactly as a blocking run would (see fv_remote.jobs).
    """

    def __init__(self, record: JobRecord, compress: bool = True, model_key: str = ""):
        self.record = record
        self.compress = compress
        self.model_key = model_key
        self.details: dict = {}
        super().__init__(f"submitted NDIF job {record.job_id}")


def saved_result(saved: dict, details: dict, default_key: str, what: str) -> Any:
    """The value a no-wait stage's session saved for its results (`details["result_key"]`), or a clear error."""
    key = details.get("result_key", default_key)
    if key not in saved:
        raise UserError(f"{what} result has no {key!r} (saved: {', '.join(saved) or 'nothing'})")
    return saved[key]


_NO_WAIT: contextvars.ContextVar[bool] = contextvars.ContextVar("fv_remote_no_wait", default=False)


@contextlib.contextmanager
def no_wait():
    """Within this block a remote stage submits its one request and raises `JobSubmitted` instead of waiting.

    Only NDIF requests (remote=True) are affected; local runs and dry runs (remote="local") run as usual.
    """
    token = _NO_WAIT.set(True)
    try:
        yield
    finally:
        _NO_WAIT.reset(token)


def _summary(description: str) -> str:
    """The last meaningful line of a server traceback ("ValueError: ..."), for one-line errors."""
    lines = [line.strip() for line in (description or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no description"


def _detail(body: Any) -> str:
    """The `detail` of a FastAPI-style JSON error body, else the body as text."""
    if not body:
        return ""
    text = body.decode(errors="replace") if isinstance(body, (bytes, bytearray)) else str(body)
    try:
        parsed = json.loads(text)
    except ValueError:
        return text.strip()[:200]
    return str(parsed.get("detail", parsed)) if isinstance(parsed, dict) else str(parsed)


def _backend_class() -> type:
    from nnsight.intervention.backends.remote import RemoteBackend

    class StageBackend(RemoteBackend):
        """nnsight's blocking RemoteBackend with a client-side time limit and one-line errors naming the job id."""

        def __init__(self, *args: Any, timeout: float | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.timeout = timeout or timeout_s()
            self.record = JobRecord(host=self.host)

        def __call__(self, tracer: Any = None) -> Any:
            if self.blocking:
                return super().__call__(tracer)
            global last_job
            from nnsight.intervention.backends.remote import RemoteError

            last_job = self.record
            start = time.monotonic()
            self.display.enabled = False  # its unterminated status line would run into the job id printed next
            try:
                self.submit(tracer)
            except RemoteError as exc:
                text = str(exc).removeprefix("Failed to send request: ")
                raise UserError(f"NDIF ({self.host}) refused the request: {_summary(text)}") from None
            finally:
                self.record.seconds = time.monotonic() - start
            self.record.job_id = self.job_id
            self.record.status = getattr(self.status, "value", str(self.status or ""))
            raise JobSubmitted(self.record, compress=self.compress, model_key=self.model_key)

        def _post(self, request: Any, blob: bytes) -> Any:
            if sandboxed():  # the envelope gains `"trusted": false` (NDIF's opt-in to its sandbox)
                envelope = json.dumps({**json.loads(request.metadata()), "trusted": False})
                request = types.SimpleNamespace(metadata=lambda: envelope)
            return super()._post(request, blob)

        def send(self, request: Any, blob: bytes) -> Any:
            response = self._post(request, blob)
            self.job_id = self.record.job_id = response.id
            return self.handle(response)

        def finalize(self, content: bytes) -> Any:
            self.record.result_bytes = len(content)
            return super().finalize(content)

        def note(self, response: Any) -> bool:
            self.record.status = response.status.value
            return super().note(response)

        def _serialize(self, tracer: Any) -> bytes:
            blob = super()._serialize(tracer)
            self.record.payload_bytes = len(blob)
            return blob

        def request(self, request: Any, tracer: Any) -> Any:
            global last_job
            import websocket
            from nnsight.intervention.backends.remote import RemoteError
            from nnsight.schema.response import Status

            last_job = self.record
            start = time.monotonic()
            blob = self._serialize(tracer)
            header = {"ndif-api-key": self.api_key} if self.api_key else None
            try:
                connection = websocket.create_connection(f"{self.ws_host}/subscribe", header=header, timeout=10)
            except websocket.WebSocketBadStatusException as exc:
                detail = _detail(getattr(exc, "resp_body", None)) or str(exc).split(" -+-+- ")[0]
                raise UserError(f"NDIF ({self.host}) refused the connection (HTTP {exc.status_code}): {detail}") \
                    from None
            except (OSError, websocket.WebSocketException) as exc:
                raise UserError(f"cannot reach NDIF at {self.host}: {exc}") from None

            def job() -> str:
                return f"job {self.job_id}" if self.job_id else "the request"

            try:
                request.session_id = json.loads(connection.recv())["session_id"]
                self.send(request, blob)
                deadline = start + self.timeout
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise UserError(
                            f"no result from NDIF ({self.host}) within {self.timeout:g} s for {job()} "
                            f"(last status: {self.record.status or 'none'}); it may still finish on the server: "
                            "raise FV_REMOTE_TIMEOUT or fetch it later by its job id")
                    connection.settimeout(min(remaining, 0.1) if self.display.enabled else remaining)
                    try:
                        message = connection.recv()
                    except websocket.WebSocketTimeoutException:
                        self.display.refresh()
                        continue
                    except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError) as exc:
                        raise UserError(
                            f"connection to NDIF ({self.host}) dropped while waiting for {job()} "
                            f"(last status: {self.record.status or 'none'}): {exc or 'closed'}; the job may still "
                            "finish on the server: fetch it later by its job id, or run the stage again") from None
                    if not message:
                        raise UserError(f"connection to NDIF ({self.host}) closed while waiting for {job()} "
                                        f"(last status: {self.record.status or 'none'}); run the stage again")
                    response = self.parse(message)
                    result = self.handle(response)
                    if response.status == Status.COMPLETED:
                        return result
            except RemoteError as exc:
                text = str(exc)
                if self.job_id is None:  # the POST itself was refused (bad key, server down, ...)
                    text = text.removeprefix("Failed to send request: ")
                    raise UserError(f"NDIF ({self.host}) refused the request: {_summary(text)}") from None
                raise UserError(f"NDIF {job()} failed on the server: {_summary(text)}") from None
            finally:
                self.record.seconds = time.monotonic() - start
                self.record.meta = dict(self.meta or {})
                connection.close()

    return StageBackend


def make_backend(model: Any, timeout: float | None = None, verbose: bool = False) -> Any:
    """A blocking NDIF backend for `model` (a LoadedModel or nnsight model) at the configured host and key."""
    lm = getattr(model, "lm", model)
    try:
        key = lm.to_model_key()
    except Exception:  # noqa: BLE001 - the Hub lookup that canonicalises the repo id failed; use the id as given
        from nnsight.modeling import huggingface

        repo_id = getattr(lm, "repo_id", None)
        if not repo_id:
            raise UserError("this model has no Hugging Face repo id, so NDIF cannot know which model to run; "
                            "load it with fv_remote.remote.load_remote_model(repo_id)") from None
        huggingface._ID_CACHE[repo_id] = repo_id
        key = lm.to_model_key()
    return _backend_class()(key, host=host(), api_key=api_key() or "", env=lm._remoteable_get_env(),
                            timeout=timeout, verbose=verbose, blocking=not _NO_WAIT.get())


def stage_session(model: Any, remote: Any = False, timeout: float | None = None):
    """The context a stage's traces run in: nothing (local), one NDIF request, or nnsight's in-process dry run.

    Use it directly as `with stage_session(model, remote):` — it returns the session tracer itself, because nnsight
    captures the block from the frame that enters it (a wrapper generator would capture the wrong frame).
    """
    mode = remote_mode(remote)
    if mode is None:
        return contextlib.nullcontext()
    register_traces()
    lm = getattr(model, "lm", model)
    if mode == "local":
        return lm.session(remote="local")
    return lm.session(backend=make_backend(model, timeout=timeout))


def trace_options(model: Any, remote: Any = False, timeout: float | None = None) -> dict:
    """Keyword arguments for a single `lm.trace(...)` that should run locally, on NDIF or as a dry run."""
    mode = remote_mode(remote)
    if mode is None:
        return {}
    register_traces()
    if mode == "local":
        return {"remote": "local"}
    return {"backend": make_backend(model, timeout=timeout)}


@dataclass
class PollResult:
    """The state of a submitted job: its last status and, once COMPLETED, the values its session saved."""

    job_id: str
    status: str  # RECEIVED / QUEUED / RUNNING / COMPLETED / ... or UNKNOWN (no status recorded yet)
    result: dict | None = None
    result_bytes: int = 0


def poll_job(job_id: str, compress: bool = True, model_key: str = "", at: str | None = None) -> PollResult:
    """One look at a job submitted with `no_wait()` (GET /response/{id}); the saved values once it is COMPLETED.

    `at` is the host the job went to (default: the configured host). A job that failed on the server raises a
    UserError naming it; so does a host that cannot be reached.
    """
    import httpx
    from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

    class _Poller(RemoteBackend):
        result_bytes = 0

        def finalize(self, content: bytes) -> Any:
            self.result_bytes = len(content)
            return super().finalize(content)

    where = (at or host()).rstrip("/")
    backend = _Poller(model_key or "poll", host=where, api_key=api_key() or "", blocking=False, job_id=job_id)
    backend.compress = compress
    backend.display.enabled = False
    try:
        result = backend.poll()
    except RemoteError as exc:
        raise UserError(f"NDIF job {job_id} failed on the server: {_summary(str(exc))}") from None
    except httpx.HTTPStatusError as exc:
        raise UserError(f"NDIF ({where}) answered the poll of job {job_id} with HTTP "
                        f"{exc.response.status_code}: {_detail(exc.response.content)}") from None
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach NDIF at {where} to poll job {job_id}: {exc or type(exc).__name__}") \
            from None
    status = backend.status.value if backend.status is not None else "UNKNOWN"
    if status == "COMPLETED" and not isinstance(result, dict):
        raise UserError(f"NDIF job {job_id} is COMPLETED but its result could not be read")
    return PollResult(job_id, status, result if status == "COMPLETED" else None, backend.result_bytes)


# -- weightless local copies of hosted models ------------------------------------------------------------------

def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")


def _canonical_repo_id(repo_id: str) -> None:
    """nnsight canonicalises the repo id through the Hub when minting a model key; offline, trust the given id."""
    from nnsight.modeling import huggingface

    if _offline():
        huggingface._ID_CACHE.setdefault(repo_id, repo_id)


def load_remote_model(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
                      config: Any = None, tokenizer: Any = None) -> Any:
    """A LoadedModel for an NDIF-hosted repo: the architecture on the meta device (no weights) plus its tokenizer.

    The config and tokenizer come from the Hugging Face Hub or its local cache (`cache_dir`, HF_HOME); a UserError
    says so when they cannot be obtained (gated repo without a token, offline without a cached copy, typo).
    """
    from nnsight import TransformersModel
    from transformers import AutoConfig, AutoTokenizer

    from fv_remote.adapters import Adapter
    from fv_remote.models import LoadedModel

    if "/" not in repo_id or repo_id.startswith((".", "/")):
        raise UserError(f"remote models are named by their Hugging Face repo id (org/name), got {repo_id!r}")
    hub = {"revision": revision, "cache_dir": cache_dir}
    hub = {k: v for k, v in hub.items() if v}
    where = f" (revision {revision})" if revision else ""
    hint = ("; it is read from the Hugging Face Hub or its cache (HF_HOME): check the name, log in for gated "
            "models (huggingface-cli login / HF_TOKEN), or run once online to cache it")
    if config is None:
        try:
            config = AutoConfig.from_pretrained(repo_id, **hub)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot get the config of {repo_id!r}{where}: {str(exc).splitlines()[0]}{hint}") \
                from None
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(repo_id, **hub)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot get the tokenizer of {repo_id!r}{where}: {str(exc).splitlines()[0]}{hint}") \
                from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _canonical_repo_id(repo_id)
    try:
        lm = TransformersModel(repo_id, config=config, tokenizer=tokenizer, task="text-generation",
                               revision=revision)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot build the architecture of {repo_id!r} on the meta device: "
                        f"{str(exc).splitlines()[0]}") from None
    hf = lm._module
    adapter = Adapter.from_model(hf)
    return LoadedModel(name=repo_id, lm=lm, hf=hf, tokenizer=lm.tokenizer, adapter=adapter, source="ndif",
                       revision=revision or "", info={"hub_repo": repo_id, "remote": True})


def remote_repo_id(name: str) -> str:
    """The Hub repo id NDIF knows a model by: a short name (smollm2-135m) maps to its original repo."""
    from fv_remote.models import RELEASES

    return RELEASES[name].hub_repo if name in RELEASES else name


def load_stage_model(name: str, remote: Any = False) -> Any:
    """The model a stage runs with: a weightless copy of the hosted repo for NDIF (remote=True), else the local
    model (remote=False, or "local" for nnsight's in-process dry run, which needs real weights)."""
    if remote_mode(remote) == "ndif":
        return load_remote_model(remote_repo_id(name))
    from fv_remote.models import load_model

    return load_model(name)


# -- service status and version check --------------------------------------------------------------------------

def _get(path: str) -> Any:
    import httpx

    url = f"{host()}{path}"
    headers = {"ndif-api-key": api_key()} if api_key() else None
    try:
        response = httpx.get(url, timeout=httpx.Timeout(_HTTP_TIMEOUT[0], read=_HTTP_TIMEOUT[1]), headers=headers)
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach NDIF at {host()}: {exc or type(exc).__name__}") from None
    if response.status_code == 404:
        raise UserError(f"NDIF at {host()} has no {path} endpoint: it does not speak nnsight {SUPPORTED_SERVER}'s "
                        "protocol (an older server?)")
    if response.status_code >= 400:
        raise UserError(f"NDIF at {host()} answered {path} with HTTP {response.status_code}: {response.text[:200]}")
    try:
        return response.json()
    except ValueError:
        raise UserError(f"NDIF at {host()} answered {path} with something that is not JSON") from None


@dataclass
class ServiceStatus:
    host: str
    models: list[dict]  # one per hosted repo: repo_id, revision, task, level, state, replicas, note

    def running(self, repo_id: str, revision: str | None = None) -> bool:
        return any(m["repo_id"] == repo_id and (revision is None or m["revision"] == revision)
                   and m["state"] == "RUNNING" for m in self.models)


def _key_fields(text: str) -> dict | None:
    """repo_id/revision/task of an nnsight model key (`module.Class:{json}`) found in `text`, else None."""
    start = text.find(":{")
    if start < 0:
        return None
    try:
        fields = json.loads(text[start + 1:])
    except ValueError:
        return None
    return fields if isinstance(fields, dict) and fields.get("repo_id") else None


def status() -> ServiceStatus:
    """The models NDIF hosts (HOT/WARM deployments, or any with a running replica) and their state.

    ndif 0.1.2 with nnsight 0.8.1 reports a served model as level COLD with no details (its controller cannot
    describe the checkpoint) next to one entry per replica, `<id>:<actor>:<model key>` with the replica's
    `application_state`; such a model is listed from its replicas, with a note saying the level is unknown.
    """
    raw = _get("/status")
    entries = raw.get("deployments") or {}
    replicas: dict[tuple[str, str], list[str]] = {}
    tasks: dict[tuple[str, str], str] = {}
    models: dict[tuple[str, str], dict] = {}
    for name, value in entries.items():
        if not isinstance(value, dict):
            continue
        fields = None if "deployment_level" in value else _key_fields(name)
        if fields is not None:  # one replica of a deployment
            key = (fields["repo_id"], fields.get("revision") or "main")
            replicas.setdefault(key, []).append(str(value.get("application_state", "UNKNOWN")))
            tasks[key] = fields.get("task") or "-"
            continue
        repo = value.get("repo_id", name)
        key = (repo, value.get("revision") or "main")
        models[key] = {"repo_id": repo, "revision": key[1], "task": value.get("task") or "-",
                       "level": value.get("deployment_level") or "?", "state": value.get("application_state"),
                       "replicas": 0, "note": ""}
    for key, states in replicas.items():
        entry = models.setdefault(key, {"repo_id": key[0], "revision": key[1], "task": tasks[key], "level": "?",
                                        "state": None, "replicas": 0, "note": ""})
        entry["replicas"] = len(states)
        if entry["task"] == "-":
            entry["task"] = tasks[key]
        if not entry["state"]:
            entry["state"] = "RUNNING" if "RUNNING" in states else states[0]
            entry["note"] = (f"{states.count('RUNNING')} of {len(states)} replica(s) running; the server reports "
                             f"level {entry['level']} without details (ndif 0.1.2 with nnsight 0.8.x)")
    listed = [m for m in models.values() if m["level"] in ("HOT", "WARM") or m["replicas"]]
    for m in listed:
        m["state"] = m["state"] or "UNHEALTHY"
    listed.sort(key=lambda m: m["repo_id"])
    return ServiceStatus(host=host(), models=listed)


@dataclass
class VersionCheck:
    host: str
    ok: bool
    message: str
    packages: dict  # critical packages: {name: (local, remote)}
    python: tuple[str, str]
    api_key_set: bool


def check() -> VersionCheck:
    """Compare client and server nnsight/torch/transformers versions (nnsight.compare's data); one-line verdict."""
    from importlib.metadata import version

    from nnsight.ndif import EnvComparison, get_local_env

    remote_env = _get("/env")
    if not isinstance(remote_env, dict) or "packages" not in remote_env:
        raise UserError(f"NDIF at {host()} answered /env without a package list; cannot compare versions")
    comparison = EnvComparison(get_local_env(), remote_env)
    critical = {name: (info["local"], info["remote"]) for name, info in comparison.packages.items()
                if info["critical"]}
    local_nn = version("nnsight")
    server_nn = remote_env["packages"].get("nnsight", "unknown")
    problems = []
    if server_nn == "unknown":
        problems.append("the server does not report its nnsight version")
    elif server_nn.split(".")[:2] != local_nn.split(".")[:2]:
        problems.append(f"client nnsight {local_nn} but NDIF runs nnsight {server_nn}: requests will fail "
                        f"(0.8 changed the wire protocol); fv-remote needs a server on nnsight {SUPPORTED_SERVER}.x")
    elif server_nn != local_nn:
        problems.append(f"client nnsight {local_nn}, server {server_nn} (same minor version; usually fine)")
    others = [f"{name} {loc} vs {rem}" for name, (loc, rem) in critical.items()
              if name != "nnsight" and loc != rem]
    if others:
        problems.append("other differences (client vs server): " + ", ".join(others))
    fatal = server_nn == "unknown" or server_nn.split(".")[:2] != local_nn.split(".")[:2]
    if server_nn == local_nn:
        problems.insert(0, f"client and server both run nnsight {local_nn}")
    message = "; ".join(problems)
    return VersionCheck(host=host(), ok=not fatal, message=message, packages=critical,
                        python=(comparison.local_python, comparison.remote_python), api_key_set=bool(api_key()))
