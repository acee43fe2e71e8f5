"""The real NDIF server (PyPI `ndif` 0.1.2) on this machine, for `make test-ndif`: start, deploy, stop.

Everything listens on 127.0.0.1 and lives in one temporary folder (Ray's session files, Redis's and the S3 stand-in's
data, HOME, TMPDIR, the Hub-style model cache, logs). Every process started gets a marker variable in its
environment; `stop()` ends every process that carries it, or descends from one that does (NDIF's sandbox runners
start with a cut-down environment), SIGTERM first, SIGKILL after a grace period, and then removes the folder.

Services, in start order: Redis (Debian `redis-server`), `moto_server` (S3 stand-in for results), a Ray head (a
declared, not real, GPU: NDIF's controller only schedules on nodes that report one), NDIF's controller, NDIF's API
under gunicorn. Models are deployed with NDIF's own `deploy()` and our CPU actor classes (`cpu_actor.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MARKER = "FV_REMOTE_NDIF_STACK"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Any, what: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None,
             every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {process.returncode}\n{tail}")
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        time.sleep(every)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s ({last!r})\n{tail}")


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def marked_processes(token: str) -> set[int]:
    """PIDs whose environment carries `MARKER=token`, plus all their descendants."""
    needle = f"{MARKER}={token}".encode()
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    own = {os.getpid()}
    marked = {p for p in pids if p not in own and needle in _environ(p).split(b"\0")}
    parents = {p: _ppid(p) for p in pids}
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in marked and pid not in marked and pid not in own:
                marked.add(pid)
                changed = True
    return marked


class NDIFStack:
    """One real NDIF deployment on 127.0.0.1. Use as a context manager (stops on any exit, Ctrl-C included)."""

    def __init__(self, venv: str | Path, keep: bool = False):
        self.venv = Path(venv).resolve()
        self.python = self.venv / "bin" / "python"
        if not self.python.exists():
            raise FileNotFoundError(f"{self.python} missing: run tests/ndif_stack/setup_env.sh first")
        self.token = uuid.uuid4().hex[:12]
        self.root = Path(tempfile.mkdtemp(prefix="fvndif-", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.keep = keep
        self.logs = self.root / "logs"
        self.hub = self.root / "hf" / "hub"
        for sub in ("logs", "home", "tmp", "ray", "redis", "hf/hub"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in ("redis", "s3", "ray", "ray_client", "api", "dashboard",
                                                     "dashboard_grpc", "dashboard_agent", "metrics", "object_manager",
                                                     "node_manager", "runtime_env_agent")}
        self.request_log = self.root / "requests.jsonl"
        self.processes: dict[str, subprocess.Popen] = {}
        self.created = time.time()
        self.timings: dict[str, float] = {}

    # -- environment ------------------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    def env(self) -> dict[str, str]:
        keep = ("PATH", "LANG", "LC_ALL", "TERM")
        env = {k: v for k, v in os.environ.items() if k in keep}
        p = self.ports
        env.update({
            MARKER: self.token,
            "PATH": f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.root / "home"), "TMPDIR": str(self.root / "tmp"),
            "HF_HOME": str(self.root / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "NDIF_REDIS_URL": f"redis://127.0.0.1:{p['redis']}",
            "NDIF_OBJECT_STORE_URL": f"http://127.0.0.1:{p['s3']}",
            "NDIF_OBJECT_STORE_ACCESS_KEY": "testing", "NDIF_OBJECT_STORE_SECRET_KEY": "testing",
            "NDIF_RAY_ADDRESS": f"ray://127.0.0.1:{p['ray_client']}", "NDIF_RAY_HEAD_PORT": str(p["ray"]),
            "NDIF_API_PORT": str(p["api"]), "NDIF_API_URL": self.host,
            "NDIF_SANDBOX_POOL_SIZE": "1", "NDIF_INFLUX_ENABLED": "false",
            "NDIF_STATUS_TTL_S": "2",  # /status is cached in Redis (60 s by default): see deployments promptly
            "NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS": os.environ.get("FV_REMOTE_NDIF_EXEC_TIMEOUT", "600"),
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP = loopback
            "GRPC_ENABLE_FORK_SUPPORT": "0", "RAY_DEDUP_LOGS": "0",
            "FV_REMOTE_NDIF_LOG": str(self.request_log),
        })
        return env

    def _spawn(self, name: str, argv: list[str], **extra_env: str) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        handle = open(log, "ab")
        process = subprocess.Popen(argv, env={**self.env(), **extra_env}, stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=self.root, start_new_session=True)
        handle.close()
        self.processes[name] = process
        return process

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    # -- start ------------------------------------------------------------------------------------------------------

    def start(self) -> "NDIFStack":
        t0 = time.monotonic()
        p = self.ports
        redis = shutil.which("redis-server")
        if not redis:
            raise FileNotFoundError("redis-server is missing (apt-get install redis-server)")
        proc = self._spawn("redis", [redis, "--bind", "127.0.0.1", "--port", str(p["redis"]), "--save", "",
                                     "--appendonly", "no", "--dir", str(self.root / "redis")])
        wait_for(lambda: self._redis_ping(), "redis", 30, proc, self.log("redis"))
        proc = self._spawn("s3", [str(self.venv / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(p["s3"])])
        wait_for(lambda: self._tcp(p["s3"]), "moto_server", 60, proc, self.log("s3"))
        resources = json.dumps({"cuda_memory_bytes": 8 * 2**30, "cpu_memory_bytes": 8 * 2**30, "head": 10})
        proc = self._spawn("ray", [str(self.venv / "bin" / "ray"), "start", "--head", "--block",
                                   "--node-ip-address=127.0.0.1", f"--port={p['ray']}",
                                   f"--ray-client-server-port={p['ray_client']}", "--num-cpus=2", "--num-gpus=1",
                                   f"--resources={resources}", "--include-dashboard=true",
                                   # NDIF's controller lists nodes through the dashboard's state API
                                   "--dashboard-host=127.0.0.1", f"--dashboard-port={p['dashboard']}",
                                   f"--dashboard-agent-grpc-port={p['dashboard_grpc']}",
                                   f"--dashboard-agent-listen-port={p['dashboard_agent']}",
                                   f"--metrics-export-port={p['metrics']}",
                                   f"--object-manager-port={p['object_manager']}",
                                   f"--node-manager-port={p['node_manager']}",
                                   f"--runtime-env-agent-port={p['runtime_env_agent']}",
                                   f"--temp-dir={self.root / 'ray'}", "--disable-usage-stats"])
        wait_for(lambda: self._tcp(p["ray_client"]), "ray head", 120, proc, self.log("ray"))
        self.timings["ray_s"] = time.monotonic() - t0
        proc = self._spawn("controller", [str(self.python), "-m", "ndif.services.ray.deployments.controller.controller"],
                           RAY_ADDRESS=f"127.0.0.1:{p['ray']}")
        proc = self._spawn("api", [str(self.venv / "bin" / "gunicorn"), "--config",
                                   "python:ndif.services.api.gunicorn_conf", "--bind", f"127.0.0.1:{p['api']}",
                                   "ndif.services.api.app:app"])
        wait_for(self._api_ready, "NDIF API", 240, proc, self.log("api"), every=1.0)
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def _tcp(self, port: int) -> bool:
        with contextlib.closing(socket.socket()) as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def _redis_ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.ports["redis"]), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def _api_ready(self) -> bool:
        import httpx

        response = httpx.get(f"{self.host}/status", timeout=10)
        return response.status_code == 200

    # -- models -----------------------------------------------------------------------------------------------------

    def hub_snapshot(self, repo: str, files: dict[str, Path] | None = None, save: Any = None) -> Path:
        """A Hub-style cache entry for `repo` under this stack's HF_HOME: `files` (name -> path, symlinked) and/or
        `save(folder)` writing into the snapshot. The client reads config and tokenizer from it, the server all."""
        repo_dir = self.hub / ("models--" + repo.replace("/", "--"))
        commit = uuid.uuid5(uuid.NAMESPACE_URL, repo).hex + "00000000"
        snapshot = repo_dir / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
        for name, path in (files or {}).items():
            target = snapshot / name
            if not target.exists():
                target.symlink_to(Path(path).resolve())
        if save is not None:
            save(snapshot)
        return snapshot

    def deploy(self, specs: list[dict], timeout: float = 600) -> dict:
        """NDIF's own `deploy()` for `specs` ({checkpoint, model_key, actor_class, ...}); waits until each serves."""
        t0 = time.monotonic()
        script = ("import json, sys\nfrom ndif.cli.lib.deploy import deploy\n"
                  "result = deploy(json.loads(sys.argv[1]), on_message=lambda m: print(m, flush=True))\n"
                  "print('RESULT ' + json.dumps(result, default=str))\n")
        full = [{"dtype": "float32", "size_bytes": 2**30, "replicas": 1, **spec} for spec in specs]
        log = self.log("deploy")
        with open(log, "ab") as handle:
            done = subprocess.run([str(self.python), "-c", script, json.dumps(full)], env=self.env(), stdout=handle,
                                  stderr=subprocess.STDOUT, timeout=timeout, cwd=self.root)
        text = log.read_text(errors="replace")
        if done.returncode != 0:
            raise RuntimeError(f"deploy failed ({done.returncode}):\n{text[-4000:]}")
        result = json.loads(text.rsplit("RESULT ", 1)[1].splitlines()[0])
        self.timings["deploy_s"] = time.monotonic() - t0
        return result

    # -- what the server did ----------------------------------------------------------------------------------------

    def requests(self) -> list[dict]:
        """Every request the model actors executed (their own record, one JSON line each), oldest first."""
        return [entry for entry in self._records() if entry["outcome"] != "started"]

    def started(self) -> list[dict]:
        """Every request a model actor began executing (finished or not)."""
        return [entry for entry in self._records() if entry["outcome"] == "started"]

    def _records(self) -> list[dict]:
        if not self.request_log.exists():
            return []
        return [json.loads(line) for line in self.request_log.read_text().splitlines() if line.strip()]

    def memory_rss_mb(self) -> float:
        total = 0
        for pid in marked_processes(self.token):
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total / 1024

    def kill_actor(self, pattern: str = "CPUSandboxModelActor") -> list[int]:
        """SIGKILL the model actor process(es) whose command line names `pattern` (fault injection)."""
        killed = []
        for pid in marked_processes(self.token):
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if pattern in cmd:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        return killed

    def kill_service(self, name: str) -> list[int]:
        """SIGKILL one service started here (e.g. "api") with all its descendants (fault injection)."""
        process = self.processes[name]
        tree = {process.pid}
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        changed = True
        while changed:
            changed = False
            for pid in pids:
                if pid not in tree and _ppid(pid) in tree:
                    tree.add(pid)
                    changed = True
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)
        return sorted(tree)

    # -- stop -------------------------------------------------------------------------------------------------------

    def stop(self, grace: float = 8.0) -> list[int]:
        """End every process of this stack (by PID); returns the PIDs that needed SIGKILL."""
        pids = marked_processes(self.token) | {p.pid for p in self.processes.values() if p.poll() is None}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
            for proc in self.processes.values():
                proc.poll()  # reap our direct children
        stubborn = [p for p in pids | marked_processes(self.token) if _alive(p)]
        for pid in stubborn:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and marked_processes(self.token):
            time.sleep(0.2)
        # NDIF's sandbox pool puts its runners' sockets in /tmp whatever TMPDIR says (sandbox/host.py)
        for sock in Path("/tmp").glob("sbx-*.sock"):
            with contextlib.suppress(OSError):
                if sock.stat().st_mtime >= self.created - 1:
                    sock.unlink()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        return stubborn

    def __enter__(self) -> "NDIFStack":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def running(venv: str | Path) -> Iterator[NDIFStack]:
    stack = NDIFStack(venv)
    with stack:
        yield stack


if __name__ == "__main__":  # manual use: python tests/ndif_stack/stack.py .venv-ndif  (Ctrl-C stops it)
    with running(sys.argv[1] if len(sys.argv) > 1 else ".venv-ndif") as s:
        print(f"NDIF API at {s.host}; root {s.root}; started in {s.timings['start_s']:.0f} s", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1)
