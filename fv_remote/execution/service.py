"""NDIF's service: which models it hosts (`/status`) and whether its versions match the client's (`/env`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fv_remote.core.errors import UserError
from fv_remote.execution.config import _HTTP_TIMEOUT, SUPPORTED_SERVER, api_key, host


def _get(path: str) -> Any:
    import httpx

    url = f"{host()}{path}"
    key = api_key()
    headers = {"ndif-api-key": key} if key else None
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
