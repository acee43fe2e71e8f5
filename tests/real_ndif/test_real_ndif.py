"""Every `--remote` stage through the CLI against the real NDIF server (ndif 0.1.2), trusted and sandboxed.

Each stage runs three times as a user would run it (`fv-remote ...` in a subprocess): locally, on NDIF trusted (the
request runs inside the model actor) and on NDIF sandboxed (`FV_REMOTE_SANDBOX=1`: NDIF's runner process with a
weightless model). Remote results must equal the local ones (floats within 1e-4) and each stage must be ONE request,
counted from the server's own record of what its model actors executed (tests/ndif_stack/cpu_actor.py). A stage that
cannot run sandboxed must exit non-zero with one clear line naming the job: never exit 0 with a vector that did not
move. Then `--no-wait` + `jobs status|fetch`, and faults on the real stack. A report table (stage, requests, bytes,
seconds, equal?) is written to out/ndif/report.md and printed (pytest -s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from models import TINY_REPO

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4
WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
PAIRS = [(a, b) for a in WORDS for b in WORDS if a != b][:60]
MODES = ("trusted", "sandboxed")
REPORT: dict[tuple[str, str], dict] = {}
PEAK_MB = [0.0]


# -- running the CLI --------------------------------------------------------------------------------------------------

class Ran:
    def __init__(self, proc: subprocess.CompletedProcess, requests: list[dict], seconds: float):
        self.proc, self.requests, self.seconds = proc, requests, seconds
        self.rc, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr

    def ok(self) -> "Ran":
        assert self.rc == 0, f"exit {self.rc}\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}"
        return self

    def last_line(self) -> str:
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ndif-work")
    (folder / "toy.json").write_text(json.dumps([{"input": a, "output": b} for a, b in PAIRS]))
    (folder / "rev.json").write_text(json.dumps([{"input": b, "output": a} for a, b in PAIRS]))
    items = [{"stem": ["hot", "cold"], "choice": [["up", "down"], ["big", "the"], ["fox", "dog"]], "answer": 0},
             {"stem": ["cold", "hot"], "choice": [["small", "big"], ["lazy", "over"], ["up", "fox"]], "answer": 0},
             {"stem": ["big", "small"], "choice": [["quick", "brown"], ["hot", "cold"], ["dog", "up"]], "answer": 1}]
    (folder / "mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    return folder


@pytest.fixture(scope="module")
def cli(stack, work):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NDIF_", "FV_REMOTE_"))}
    base.update({"NDIF_HOST": stack.host, "HF_HOME": str(stack.root / "hf"), "HF_HUB_OFFLINE": "1",
                 "OMP_NUM_THREADS": "1", "COLUMNS": "200", "FV_REMOTE_JOBS": str(work / "jobs"),
                 "MPLBACKEND": "Agg"})

    def run(*args: str, mode: str = "local", timeout: float = 900, env: dict | None = None) -> Ran:
        environ = {**base, **(env or {})}
        if mode == "sandboxed":
            environ["FV_REMOTE_SANDBOX"] = "1"
        argv = [str(ROOT / ".venv" / "bin" / "fv-remote"), *args]
        if mode != "local" and "--remote" not in args and args[0] not in ("jobs", "remote"):
            argv.append("--remote")
        before = len(stack.requests())
        start = time.monotonic()
        proc = subprocess.run(argv, env=environ, capture_output=True, text=True, timeout=timeout, cwd=work)
        seconds = time.monotonic() - start
        PEAK_MB[0] = max(PEAK_MB[0], stack.memory_rss_mb())
        return Ran(proc, stack.requests()[before:], seconds)

    return run


def record(stage: str, mode: str, ran: Ran, equal: bool | str, n_expected: int = 1) -> None:
    """Check the server's count for a remote run and keep its row for the report."""
    trusted = mode == "trusted"
    assert len(ran.requests) == n_expected, f"{stage} {mode}: {len(ran.requests)} requests on the server"
    assert all(r["trusted"] == trusted for r in ran.requests), ran.requests
    REPORT[(stage, mode)] = {"requests": len(ran.requests),
                             "payload": sum(r["payload_bytes"] for r in ran.requests),
                             "result": sum(r.get("result_bytes", 0) for r in ran.requests),
                             "seconds": round(ran.seconds, 1), "equal": equal}


def close(a, b, tol: float = TOL) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, atol=tol, rtol=0, equal_nan=True))


def numbers(obj) -> list[float]:
    """Every number in a JSON value, in order (for comparing results files field by field)."""
    if isinstance(obj, bool) or obj is None:
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for k in sorted(obj) if k not in ("command", "created", "seconds", "version") for x in numbers(obj[k])]
    if isinstance(obj, list):
        return [x for item in obj for x in numbers(item)]
    return []


def json_equal(a: Path, b: Path) -> bool:
    x, y = numbers(json.loads(a.read_text())), numbers(json.loads(b.read_text()))
    return len(x) == len(y) and close(x, y)


def table_lines(text: str) -> list[str]:
    """The lines of a printed result table (progress and job lines dropped)."""
    return [line.rstrip() for line in text.splitlines()
            if line.strip() and not any(s in line for s in ("RECEIVED", "QUEUED", "DISPATCHED", "RUNNING", "COMPLETED",
                                                              "job ", "[K", "submitted", "NDIF"))]


def tensors_equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(close(x[k].float(), y[k].float()) for k in x)


def store_equal(a: Path, b: Path, group: str, name: str) -> bool:
    x, y = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    return close(x[group][name][:], y[group][name][:])


TASK = "toy.json"
T = ("-m", TINY_REPO)
S = ("-m", "smollm2-135m")


# -- the service ---------------------------------------------------------------------------------------------------------

def test_remote_status_and_check(cli):
    """ndif 0.1.2 + nnsight 0.8.1 report the served models as COLD without details: still listed as running."""
    deadline = time.monotonic() + 60
    while True:  # the API caches /status (NDIF_STATUS_TTL_S): right after a deploy it may not list it yet
        ran = cli("remote", "status", "--model", TINY_REPO, mode="trusted")
        if ran.rc == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    ran.ok()
    assert f"{TINY_REPO}: running" in ran.stdout and "without details" in ran.stdout, ran.stdout
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in ran.stdout
    ran = cli("remote", "status", "--model", "meta-llama/Llama-3.1-70B", mode="trusted")
    assert ran.rc == 1 and "not running" in ran.stdout
    ran = cli("remote", "check", mode="trusted").ok()
    assert "ok:" in ran.stdout and "0.8.1" in ran.stdout, ran.stdout


# -- the FV pipeline on the tiny model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_fv(stack, work):
    """An FV for the tiny model from random head means and scores (a random model answers nothing, so CMA has no
    correct prompts to average): the input of the stages that apply a vector."""
    from fv_remote.models.loading import load_model
    from fv_remote.fv.vectors import build_function_vector

    snapshot = next((stack.hub / ("models--" + TINY_REPO.replace("/", "--")) / "snapshots").iterdir())
    model = load_model(str(snapshot))
    ad = model.adapter
    gen = torch.Generator().manual_seed(1)
    means = torch.randn(ad.n_layers, ad.n_heads, ad.head_dim, generator=gen)
    aie = torch.rand(ad.n_layers, ad.n_heads, generator=gen).numpy()
    fv = build_function_vector(model, "toy", means, aie, k=3, layer=1)
    fv.model = TINY_REPO  # the name the CLI loads it by, locally (from the Hub cache) and remotely
    return fv.save(work / "toy.fv.safetensors")


@pytest.mark.parametrize("mode", MODES)
def test_extract(cli, work, mode):
    args = ("extract", *T, "-t", TASK, "--n-prompts", "8", "--n-shots", "3", "--positions", "-1,-2")
    if not (work / "local.zarr").exists():
        cli(*args, "-s", str(work / "local.zarr")).ok()
    ran = cli(*args, "-s", str(work / f"{mode}.zarr"), mode=mode).ok()
    equal = store_equal(work / "local.zarr", work / f"{mode}.zarr", "toy", "head_out")
    record("extract", mode, ran, equal)
    assert equal


@pytest.mark.parametrize("mode", MODES)
def test_evaluate_steer_generate(cli, work, tiny_fv, mode):
    fv = str(tiny_fv)
    args = ("evaluate", *T, "--fv", fv, "-t", TASK, "--n-shots", "3", "--sweep", "--scale", "4")
    if not (work / "local-eval.json").exists():
        cli(*args, "--json", "local-eval.json", "--plot", "local-sweep.png").ok()
    ran = cli(*args, "--json", f"{mode}-eval.json", "--plot", f"{mode}-sweep.png", mode=mode).ok()
    equal = json_equal(work / "local-eval.json", work / f"{mode}-eval.json")
    record("evaluate --sweep", mode, ran, equal)
    assert equal, ran.stdout
    for stage, extra in (("steer --prompt", ("--prompt", "Q: hot\\nA:")), ("steer --task", ("--task", TASK)),
                         ("steer --distributed", ("--task", TASK, "--distributed"))):
        args = ("steer", *T, "--fv", fv, "--scale", "4", *extra)
        ref, ran = cli(*args).ok(), cli(*args, mode=mode).ok()
        equal = table_lines(ref.stdout) == table_lines(ran.stdout)
        record(stage, mode, ran, equal)
        assert equal, (ref.stdout, ran.stdout)
    args = ("generate", *T, "--fv", fv, "--scale", "4", "--prompt", "Q: hot\\nA:", "--max-new-tokens", "6")
    ref, ran = cli(*args).ok(), cli(*args, mode=mode).ok()
    equal = table_lines(ref.stdout) == table_lines(ran.stdout)
    record("generate", mode, ran, equal)
    assert equal, (ref.stdout, ran.stdout)


FT = ("--n-train", "12", "--n-valid", "8", "--steps", "6", "--batch-size", "4", "--patience", "4", "--lr", "0.2",
      "--allow-unchanged")  # tiny models seldom beat their start: remote == local is tested (issue 26)


def test_finetune_and_bank_trusted(cli, work, tiny_fv):
    fv = str(tiny_fv)
    args = ("finetune", *T, "-t", TASK, "--fv", fv, *FT, "--no-evaluate")
    cli(*args, "-o", "local.ffv.safetensors").ok()
    ran = cli(*args, "-o", "trusted.ffv.safetensors", mode="trusted").ok()
    equal = tensors_equal(work / "local.ffv.safetensors", work / "trusted.ffv.safetensors")
    record("finetune", "trusted", ran, equal)
    assert equal
    args = ("bank", "build", *T, "--data", "toy.json", "--data", "rev.json", "--layer", "1", *FT[:8], "--allow-unchanged", "--fresh")
    cli(*args, "-o", "local.bank.safetensors").ok()
    ran = cli(*args, "-o", "trusted.bank.safetensors", mode="trusted").ok()
    equal = tensors_equal(work / "local.bank.safetensors", work / "trusted.bank.safetensors")
    record("bank build", "trusted", ran, equal)
    assert equal


def test_finetune_and_bank_sandboxed_never_save_an_unmoved_vector(cli, work, tiny_fv):
    """NDIF's runner gets no gradients: the stage either trains exactly as trusted or stops with one clear line."""
    fv = str(tiny_fv)
    for stage, args, out in (
            ("finetune", ("finetune", *T, "-t", TASK, "--fv", fv, *FT, "--no-evaluate"), "sandboxed.ffv.safetensors"),
            ("finetune --init zero", ("finetune", *T, "-t", TASK, "--init", "zero", "--layer", "1", *FT,
                                      "--no-evaluate"), "sandboxed-zero.ffv.safetensors"),
            ("bank build", ("bank", "build", *T, "--data", "toy.json", "--data", "rev.json", "--layer", "1",
                            *FT[:8], "--allow-unchanged", "--fresh"),
             "sandboxed.bank.safetensors")):
        ran = cli(*args, "-o", out, mode="sandboxed")
        if ran.rc == 0:
            reference = "trusted.bank.safetensors" if stage == "bank build" else "trusted.ffv.safetensors"
            equal = stage.startswith("finetune --init") or tensors_equal(work / reference, work / out)
            record(stage, "sandboxed", ran, equal)
            assert equal
            continue
        assert ran.rc == 2, ran.stderr[-2000:]
        assert "Traceback" not in ran.stderr, ran.stderr[-3000:]
        line = ran.last_line()
        assert line.startswith("error:") and "job" in line and "gradient" in line, ran.stderr[-2000:]
        assert not (work / out).exists(), f"{stage}: saved a vector although it failed"
        record(stage, "sandboxed", ran, "refused: " + line.removeprefix("error: ")[:90])


@pytest.mark.parametrize("mode", MODES)
def test_decode_analogy(cli, work, tiny_fv, mode):
    bank = "trusted.bank.safetensors"
    if not (work / bank).exists():
        pytest.skip("needs the trusted bank (test_finetune_and_bank_trusted)")
    fv = str(tiny_fv)
    args = ("decode", *T, f"{bank}:toy", fv, "--words", "hot,cold", "--top-k", "5")
    cli(*args, "--json", "local-decode.json").ok()
    ran = cli(*args, "--json", f"{mode}-decode.json", mode=mode).ok()
    equal = json_equal(work / "local-decode.json", work / f"{mode}-decode.json")
    record("decode", mode, ran, equal)
    assert equal
    args = ("analogy", *T, "--mc", "mc.jsonl", "--bank", bank, "--n-boot", "50")
    cli(*args, "--json", "local-analogy.json").ok()
    ran = cli(*args, "--json", f"{mode}-analogy.json", mode=mode).ok()
    equal = json_equal(work / "local-analogy.json", work / f"{mode}-analogy.json")
    record("analogy", mode, ran, equal)
    assert equal


@pytest.mark.parametrize("mode", MODES)
def test_residuals_and_other_vectors(cli, work, mode):
    """Issue 25's stages on the real server: the residual-stream reads, then each method's fit (validation grid in
    one session) from the local reads; one request each, the numbers of the local run."""
    args = ("residuals", *T, "-t", TASK, "--n-prompts", "8", "--n-shots", "3", "--batch-size", "4")
    if not (work / "local-res.zarr").exists():
        cli(*args, "-s", str(work / "local-res.zarr")).ok()
    ran = cli(*args, "-s", str(work / f"{mode}-res.zarr"), mode=mode).ok()
    equal = all(store_equal(work / "local-res.zarr", work / f"{mode}-res.zarr", "toy/residual", var)
                for var in ("icl", "zero_shot"))
    record("residuals", mode, ran, equal)
    assert equal
    for method in ("task-vector", "icv", "mean-diff", "pca"):
        fit = ("fit", *T, "-t", TASK, "--method", method, "-s", str(work / "local-res.zarr"),
               *(() if method == "task-vector" else ("--scales", "1,2")))
        local = work / f"local-{method}.safetensors"
        if not local.exists():
            cli(*fit, "-o", str(local), "--plot", str(work / f"local-{method}.png")).ok()
        out = work / f"{mode}-{method}.safetensors"
        ran = cli(*fit, "-o", str(out), "--plot", str(work / f"{mode}-{method}.png"), mode=mode).ok()
        equal = tensors_equal(local, out)
        record(f"fit --method {method}", mode, ran, equal)
        assert equal, ran.stdout


@pytest.mark.parametrize("mode", MODES)
def test_run(cli, work, mode):
    """`run` on SmolLM2 (a model that answers): extract, CMA, fit + layer sweep, evaluate: 4 requests."""
    args = ("run", *S, "present-past", "--n-prompts", "12", "--n-cma-prompts", "3", "--k", "5", "--n-test", "20")
    if not (work / "run-local.json").exists():
        cli(*args, "-o", "run-local", "--json", "run-local.json").ok()
    ran = cli(*args, "-o", f"run-{mode}", "--json", f"run-{mode}.json", mode=mode).ok()
    equal = json_equal(work / "run-local.json", work / f"run-{mode}.json")
    record("run (smollm2)", mode, ran, equal, n_expected=4)
    assert equal


# -- SmolLM2-135M: the stages that need a model that answers ---------------------------------------------------------



@pytest.mark.parametrize("mode", ("local",) + MODES)
def test_smollm2_pipeline(cli, work, mode):
    out = work / f"smol-{mode}"
    out.mkdir()
    task = ("-t", "present-past")
    runs = {}
    runs["extract"] = cli("extract", *S, *task, "-s", str(out / "s.zarr"), "--n-prompts", "12", mode=mode).ok()
    runs["cma"] = cli("cma", *S, *task, "-s", str(out / "s.zarr"), "--n-prompts", "3", "--plot",
                      str(out / "aie.png"), mode=mode).ok()
    runs["fit"] = cli("fit", *S, *task, "-s", str(out / "s.zarr"), "--layer", "15", "--no-sweep", "-o",
                      str(out / "pp.fv.safetensors"), mode=mode).ok()
    runs["finetune"] = cli("finetune", *S, *task, "--fv", str(out / "pp.fv.safetensors"), "--n-train", "12",
                           "--n-valid", "8", "--steps", "4", "--batch-size", "6", "--no-evaluate",
                           "-o", str(out / "pp.ffv.safetensors"), mode=mode)
    if mode == "local":
        return
    ref = work / "smol-local"
    checks = {"extract": lambda: store_equal(ref / "s.zarr", out / "s.zarr", "present-past", "head_out"),
              "cma": lambda: store_equal(ref / "s.zarr", out / "s.zarr", "present-past/cma", "indirect_effect"),
              "fit": lambda: tensors_equal(ref / "pp.fv.safetensors", out / "pp.fv.safetensors")}
    for stage, check in checks.items():
        equal = check()
        record(f"smollm2 {stage}", mode, runs[stage], equal)
        assert equal, stage
    ran = runs["finetune"]
    if ran.rc == 0:
        equal = tensors_equal(ref / "pp.ffv.safetensors", out / "pp.ffv.safetensors")
        record("smollm2 finetune", mode, ran, equal)
        assert equal
    else:
        assert mode == "sandboxed" and ran.rc == 2 and "gradient" in ran.last_line(), ran.stderr[-2000:]
        record("smollm2 finetune", mode, ran, "refused: " + ran.last_line().removeprefix("error: ")[:90])


# -- --no-wait + jobs status | fetch ---------------------------------------------------------------------------------

def _job_id(ran: Ran) -> str:
    for line in ran.stdout.splitlines():
        if line.startswith("job "):
            return line.split()[1]
    raise AssertionError(f"no job id printed:\n{ran.stdout}\n{ran.stderr}")


@pytest.mark.parametrize("mode", MODES)
def test_no_wait(cli, work, tiny_fv, mode):
    fv = str(tiny_fv)
    out = work / f"nowait-{mode}"
    out.mkdir()
    smol = work / "smol-local"
    stages = [
        ("extract", ("extract", *T, "-t", TASK, "-s", str(out / "s.zarr"), "--n-prompts", "8", "--n-shots", "3",
                     "--positions", "-1,-2"),
         lambda: store_equal(work / "local.zarr", out / "s.zarr", "toy", "head_out")),
        ("evaluate", ("evaluate", *T, "--fv", fv, "-t", TASK, "--n-shots", "3", "--sweep", "--scale", "4",
                      "--json", str(out / "eval.json"), "--plot", str(out / "sweep.png")),
         lambda: json_equal(work / "local-eval.json", out / "eval.json")),
        ("cma (smollm2)", ("cma", *S, "-t", "present-past", "-s", str(out / "smol.zarr"), "--n-prompts", "3",
                           "--plot", str(out / "aie.png")),
         lambda: store_equal(smol / "s.zarr", out / "smol.zarr", "present-past/cma", "indirect_effect")),
    ]
    cli("extract", *S, "-t", "present-past", "-s", str(out / "smol.zarr"), "--n-prompts", "12").ok()  # as smol-local
    if mode == "trusted":
        stages += [
            ("finetune", ("finetune", *T, "-t", TASK, "--fv", fv, *FT, "-o", str(out / "ffv.safetensors")),
             lambda: tensors_equal(work / "trusted.ffv.safetensors", out / "ffv.safetensors")),
            ("bank build", ("bank", "build", *T, "--data", "toy.json", "--data", "rev.json", "--layer", "1",
                            *FT[:8], "--allow-unchanged", "--fresh", "-o", str(out / "bank.safetensors")),
             lambda: tensors_equal(work / "trusted.bank.safetensors", out / "bank.safetensors"))]
    if mode == "sandboxed":  # a job that cannot run sandboxed: its fetch says why, names the job, stores nothing
        submitted = cli("finetune", *T, "-t", TASK, "--fv", fv, *FT, "-o", str(out / "ffv.safetensors"),
                        "--no-wait", mode=mode).ok()
        job = _job_id(submitted)
        fetched = cli("jobs", "fetch", job, "--wait", "--interval", "0.5", mode=mode)
        assert fetched.rc == 2 and "Traceback" not in fetched.stderr, fetched.stderr[-2000:]
        line = fetched.last_line()
        assert job in line and "gradient" in line, line
        assert not (out / "ffv.safetensors").exists()
        REPORT[("finetune --no-wait + fetch", mode)] = {
            "requests": len(submitted.requests + fetched.requests), "payload": "-", "result": "-",
            "seconds": round(submitted.seconds + fetched.seconds, 1),
            "equal": "refused: " + line.removeprefix("error: ")[:90]}
    for stage, args, check in stages:
        submitted = cli(*args, "--no-wait", mode=mode).ok()
        job = _job_id(submitted)
        status = cli("jobs", "status", job, mode=mode)
        assert status.rc in (0, 1) and job in status.stdout, status.stdout + status.stderr
        fetched = cli("jobs", "fetch", job, "--wait", "--interval", "0.5", mode=mode).ok()
        equal = check()
        requests = submitted.requests + status.requests + fetched.requests
        assert len(requests) == 1, f"{stage}: {len(requests)} requests"
        REPORT[(f"{stage} --no-wait + fetch", mode)] = {
            "requests": 1, "payload": requests[0]["payload_bytes"], "result": requests[0].get("result_bytes", 0),
            "seconds": round(submitted.seconds + fetched.seconds, 1), "equal": equal}
        assert equal, stage
        again = cli("jobs", "fetch", job, mode=mode).ok()
        assert "already" in again.stdout + again.stderr


# -- faults on the real stack ------------------------------------------------------------------------------------------

def test_server_error_names_the_job(stack, monkeypatch):
    """A request that raises on the server: one UserError line naming the job id the server ran."""
    import nnsight

    from fv_remote import execution as R
    from fv_remote.core.errors import UserError

    monkeypatch.setenv("NDIF_HOST", stack.host)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    model = R.load_remote_model(TINY_REPO, cache_dir=str(stack.hub))
    before = len(stack.requests())
    with pytest.raises(UserError) as info:
        with R.stage_session(model.using(R.NDIF())):
            with model.lm.trace("Q: hot\nA:"):
                hidden = model.lm.model.layers[0].output
                broken = nnsight.save(hidden[:, :, 10_000])  # the server's tensor has 64 features
    message = str(info.value)
    runs = stack.requests()[before:]
    assert len(runs) == 1 and runs[0]["outcome"] == "error", runs
    assert runs[0]["id"] in message and "failed on the server" in message and "\n" not in message, message


def test_client_timeout_names_the_job(cli, stack, work):
    ran = cli("finetune", *S, "-t", "present-past", "--init", "zero", "--layer", "12", "--n-train", "12",
              "--n-valid", "0", "--steps", "25", "--batch-size", "12", "--no-evaluate",
              "-o", "timeout.ffv.safetensors", mode="trusted", env={"FV_REMOTE_TIMEOUT": "3"})
    assert ran.rc == 2, ran.stderr[-2000:]
    line = ran.last_line()
    assert "within 3 s" in line and "job" in line, line
    assert not (work / "timeout.ffv.safetensors").exists()
    _wait_idle(stack)


def _wait_idle(stack, timeout: float = 600) -> None:
    """Until every request a model actor started has finished (a later test must not queue behind it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(stack.started()) > len(stack.requests()):
        time.sleep(0.5)


def _wait_started(stack, n_before: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(stack.started()) <= n_before:
        time.sleep(0.2)
    assert len(stack.started()) > n_before, "the job never started on the server"


def _interrupted_extract(cli, stack, work, name: str, fault) -> Ran:
    """An `extract --remote` appending to a store that already holds 8 prompts, hit by `fault` while it runs: the
    client must end with one line naming the job, and the 8 stored prompts must be untouched."""
    store = work / f"{name}.zarr"
    args = ("extract", *S, "-t", "present-past", "-s", str(store), "--batch-size", "2")
    cli(*args, "--n-prompts", "8", mode="trusted").ok()
    before = zarr.open_group(str(store), mode="r")["present-past"]["head_out"][:]
    result: dict = {}
    n_started = len(stack.started())
    thread = threading.Thread(target=lambda: result.setdefault(
        "ran", cli(*args, "--n-prompts", "200", mode="trusted", env={"FV_REMOTE_TIMEOUT": "900"})))
    thread.start()
    _wait_started(stack, n_started)
    time.sleep(2)
    fault()
    thread.join(timeout=900)
    ran = result["ran"]
    assert ran.rc == 2, (ran.stdout[-2000:], ran.stderr[-2000:])
    assert "Traceback" not in ran.stderr, ran.stderr[-3000:]
    line = ran.last_line()
    assert line.startswith("error:") and "job" in line, line
    job = stack.started()[n_started]["id"]
    assert job in line, (job, line)
    after = zarr.open_group(str(store), mode="r")["present-past"]["head_out"][:]
    assert after.shape == before.shape and np.array_equal(after, before)
    return ran


def test_model_actor_killed_mid_job(cli, stack, work):
    killed: list[int] = []
    ran = _interrupted_extract(cli, stack, work, "killed", lambda: killed.extend(stack.kill_actor("CPUSandboxModel")))
    assert killed, "no model actor process found"
    REPORT[("fault: model actor killed mid-job", "trusted")] = {
        "requests": "-", "payload": "-", "result": "-", "seconds": round(ran.seconds, 1),
        "equal": "store kept; " + ran.last_line()[:200]}


def test_api_gone_mid_job(cli, stack, work):
    """Last (the API stays down): the API is killed while the client waits for its job."""
    alive = cli("extract", *T, "-t", TASK, "-s", str(work / "alive.zarr"), "--n-prompts", "2", "--n-shots", "3",
                mode="trusted", timeout=900)
    assert alive.rc == 0, alive.stderr[-2000:]  # the actors are back after the previous test
    ran = _interrupted_extract(cli, stack, work, "api-gone", lambda: stack.kill_service("api"))
    REPORT[("fault: API killed mid-job", "trusted")] = {
        "requests": "-", "payload": "-", "result": "-", "seconds": round(ran.seconds, 1),
        "equal": "store kept; " + ran.last_line()[:200]}


# -- the report --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def report(stack):
    yield
    venv_mb = sum(f.stat().st_size for f in (ROOT / ".venv-ndif").rglob("*") if f.is_file()) / 2**20
    lines = ["| stage | mode | requests (server) | payload bytes | result bytes | wall s (CLI) | equal to local? |",
             "|---|---|---|---|---|---|---|"]
    for (stage, mode), row in REPORT.items():
        payload = f"{row['payload']:,}" if isinstance(row["payload"], int) else row["payload"]
        result = f"{row['result']:,}" if isinstance(row["result"], int) else row["result"]
        lines.append(f"| {stage} | {mode} | {row['requests']} | {payload} | {result} | {row['seconds']} | "
                     f"{row['equal']} |")
    lines += ["", f"stack start-up {stack.timings.get('start_s', 0):.0f} s, deploy {stack.timings.get('deploy_s', 0):.0f} s; "
              f"peak resident memory of the stack's processes {PEAK_MB[0]:,.0f} MB; .venv-ndif {venv_mb / 1024:.1f} GB"]
    text = "\n".join(lines)
    folder = ROOT / "out" / "ndif"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(text + "\n")
    print("\n" + text)
