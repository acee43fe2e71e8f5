"""nnsight's RemoteBackend with a client time limit, one-line errors naming the job, size records and submit-only."""

from __future__ import annotations

import json
import time
import types
from dataclasses import dataclass, field
from typing import Any

from fv_remote.core.errors import UserError
from fv_remote.execution.config import api_key, host, sandboxed, timeout_s
from fv_remote.execution.messages import _detail, _summary


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


class JobSubmitted(Exception):
    """Raised out of a stage run by `NDIF(wait=False)` as soon as its request is submitted.

    Nothing was computed locally and nothing was stored. `record` has the job id; `job` is the handle
    (`fv_remote.execution.jobs.Job`, its job file already written) that `Executor.run` attaches: `job.status()`,
    `job.fetch()`.
    """

    def __init__(self, record: JobRecord, compress: bool = True, model_key: str = ""):
        self.record = record
        self.compress = compress
        self.model_key = model_key
        self.job: Any = None
        super().__init__(f"submitted NDIF job {record.job_id}")


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
            from nnsight.intervention.backends.remote import RemoteError

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
            import websocket
            from nnsight.intervention.backends.remote import RemoteError
            from nnsight.schema.response import Status

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


def make_backend(model: Any, timeout: float | None = None, verbose: bool = False, blocking: bool = True) -> Any:
    """An NDIF backend for `model` (a LoadedModel or nnsight model) at the configured host and key: blocking, or
    submit-only (raises `JobSubmitted`) with `blocking=False`."""
    lm = getattr(model, "lm", model)
    try:
        key = lm.to_model_key()
    except Exception:  # noqa: BLE001 - the Hub lookup that canonicalises the repo id failed; use the id as given
        from nnsight.modeling import huggingface

        repo_id = getattr(lm, "repo_id", None)
        if not repo_id:
            raise UserError("this model has no Hugging Face repo id, so NDIF cannot know which model to run; "
                            "load it with fv_remote.execution.load_remote_model(repo_id)") from None
        huggingface._ID_CACHE[repo_id] = repo_id
        key = lm.to_model_key()
    return _backend_class()(key, host=host(), api_key=api_key() or "", env=lm._remoteable_get_env(),
                            timeout=timeout, verbose=verbose, blocking=blocking)

