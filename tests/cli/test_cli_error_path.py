"""One error path: each input that used to end in a traceback (exit 1), a NaN table or lost results now ends with
one `error:` line naming the file and the fix (exit 2); outputs are atomic; Ctrl-C says what was kept (exit 130)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fv_remote.core.errors import UserError

from support.cli_harness import invoke, one_error_line, save_tiny_model

WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
PAIRS = [(a, b) for a in WORDS for b in WORDS if a < b][:60]
HEADER = "pair1_word1,pair1_word2,pair2_word1,pair2_word2,mean_rating\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from fv_remote.fv.vectors import FunctionVector

    root = tmp_path_factory.mktemp("errpath")
    folder = str(save_tiny_model(root / "tiny"))
    data = root / "toy.json"
    data.write_text(json.dumps([{"input": a, "output": b} for a, b in PAIRS]))
    d_model = 64
    good = root / "good.fv.safetensors"
    FunctionVector(torch.randn(d_model), model=folder, task=str(data), layer=1).save(good)
    nan = root / "nan.fv.safetensors"
    FunctionVector(torch.full((d_model,), float("nan")), model=folder, task=str(data), layer=1).save(nan)
    return {"root": root, "folder": folder, "data": str(data), "good": str(good), "nan": str(nan)}


def test_out_of_range_positions(env, tmp_path):
    store = str(tmp_path / "p.zarr")
    base = ("extract", "-t", env["data"], "-s", store, "-m", env["folder"], "--n-prompts", "4", "--n-shots", "2")
    one_error_line(invoke(*base, "--positions", "-999"), "-999", "shortest prompt")
    one_error_line(invoke(*base, "--positions", "3"), "from the end")
    one_error_line(invoke(*base, "--positions", "-1,-1"), "twice")
    one_error_line(invoke(*base, "--positions", ""), "--positions")


def test_empty_prompt(env):
    one_error_line(invoke("steer", "--fv", env["good"], "-m", env["folder"], "--prompt", ""), "--prompt is empty")
    one_error_line(invoke("steer", "--fv", env["good"], "-m", env["folder"], "--prompt", "  \n"), "--prompt is empty")
    one_error_line(invoke("generate", "--fv", env["good"], "-m", env["folder"], "--prompt", ""), "--prompt is empty")


def test_vector_full_of_nan_is_refused_before_steering(env):
    for cmd in (("steer", "--prompt", "Q: hot\nA:"), ("generate", "--prompt", "Q: hot\nA:"),
                ("evaluate", "-t", env["data"], "--n-test", "2", "--n-shots", "2")):
        one_error_line(invoke(cmd[0], "--fv", env["nan"], "-m", env["folder"], *cmd[1:]), "nan.fv.safetensors",
                       "NaN/inf")
    one_error_line(invoke("decode", env["nan"], "-m", env["folder"]), "NaN/inf")
    one_error_line(invoke("steer", "--fv", env["good"], "-m", env["folder"], "--prompt", "x", "--scale", "nan"),
                   "--scale")


def test_json_naming_a_folder(env, tmp_path):
    args = ("evaluate", "--fv", env["good"], "-m", env["folder"], "-t", env["data"], "--n-test", "2", "--n-shots",
            "2")
    one_error_line(invoke(*args, "--json", tmp_path), "--json", "is a folder")  # refused before any work


def test_json_write_failing_at_the_end_keeps_the_results(env, tmp_path, monkeypatch):
    """When the write fails after the work (a folder appeared there, the disk filled up), the results are saved
    elsewhere and the one error line says where."""
    import fv_remote.cli.pipeline_cmd as pc

    monkeypatch.setattr(pc, "check_output_path", lambda path, flag: path)  # as if the folder appeared later
    target = tmp_path / "results.json"
    target.mkdir()
    result = invoke("evaluate", "--fv", env["good"], "-m", env["folder"], "-t", env["data"], "--n-test", "2",
                    "--n-shots", "2", "--json", target, cwd=tmp_path)
    line = one_error_line(result, "--json", "saved to")
    saved = Path(line.split("saved to ")[1].split(" instead")[0])
    assert saved.is_file() and json.loads(saved.read_text())["results"][0]["n_test"] == 2


def test_write_json_is_atomic_and_never_writes_nan(tmp_path):
    from fv_remote.fv.pipeline import write_json

    path = tmp_path / "r.json"
    write_json({"a": 1}, path)
    write_json({"rho": float("nan"), "ci": [float("inf"), 0.5]}, path)
    data = json.loads(path.read_text())  # strict JSON: no NaN token
    assert data["rho"] is None and data["ci"] == [None, 0.5]
    assert data["non_finite"]["fields"] == ["rho", "ci[0]"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left behind


def test_atomic_save_keeps_the_old_file_when_the_writer_dies(tmp_path):
    from fv_remote.core.checks import atomic_save

    path = tmp_path / "v.safetensors"
    path.write_bytes(b"old")

    def dies(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save(dies, path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]
    with pytest.raises(UserError, match="permission denied"):
        atomic_save(lambda tmp: (_ for _ in ()).throw(PermissionError(13, "Permission denied")), path)


def test_garbage_gguf(env, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"garbage" * 100)
    one_error_line(invoke("steer", "--fv", env["good"], "-m", bad, "--prompt", "x"), "model.gguf",
                   "not a usable GGUF")


def test_broken_model_folder(env, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    one_error_line(invoke("steer", "--fv", env["good"], "-m", folder, "--prompt", "x"), str(folder))


def test_bad_csv_files(env, tmp_path):
    non_utf8 = tmp_path / "latin1.csv"
    non_utf8.write_bytes(HEADER.encode() + "caf\xe9,b,c,d,1\n".encode("latin-1"))
    one_error_line(invoke("align", "--ratings", non_utf8, "-m", env["folder"]), "latin1.csv", "UTF-8")
    huge = tmp_path / "huge.csv"
    huge.write_text(HEADER + '"' + "a" * 200_000 + '",b,c,d,1\n')
    one_error_line(invoke("align", "--ratings", huge, "-m", env["folder"]), "huge.csv:", "not valid CSV")
    huge4 = tmp_path / "huge4.csv"
    huge4.write_text('"' + "a" * 200_000 + '",b,c,d,e\n')
    one_error_line(invoke("analogy", "--csv", huge4, "-m", env["folder"]), "huge4.csv:", "not valid CSV")
    latin = tmp_path / "latin4.csv"
    latin.write_bytes("caf\xe9,b,c,d,e\n".encode("latin-1"))
    one_error_line(invoke("analogy", "--csv", latin, "-m", env["folder"]), "latin4.csv", "UTF-8")


def test_nan_ratings_are_refused(env, tmp_path):
    ratings = tmp_path / "r.csv"
    ratings.write_text(HEADER + "hot,cold,up,down,1\nbig,small,the,fox,nan\nlazy,dog,over,up,2\n")
    one_error_line(invoke("align", "--ratings", ratings, "-m", env["folder"]), "r.csv:3", "not a finite number")


def test_spearman_of_constant_values_is_explained_not_nan():
    from fv_remote.relational.align import spearman_ci

    rho, ci = spearman_ci([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0], n_boot=50)
    assert rho != rho and ci[0] != ci[0]  # undefined, and the CLI says why (align raises a UserError)
    rho, ci = spearman_ci([1.0, 1.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0], n_boot=20, seed=1)
    assert rho == rho


def test_output_under_a_file(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_error_line(invoke("evaluate", "--fv", env["good"], "-m", env["folder"], "--json", blocker / "r.json"),
                   "is a file")
    one_error_line(invoke("run", env["data"], "-m", env["folder"], "-o", blocker), "is a file")


def test_sigint_says_what_was_kept(env, tmp_path):
    store = tmp_path / "int.zarr"
    code = "from fv_remote.cli.app import main; main()"
    args = ["extract", "-t", env["data"], "-s", str(store), "-m", env["folder"], "--n-prompts", "500",
            "--n-shots", "2", "--batch-size", "1"]
    # a shell's background job (`make test &`) ignores SIGINT and its children inherit that: give the CLI the default
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    from fv_remote.store.activations import ActivationStore

    s = ActivationStore(str(store))
    deadline = time.time() + 120
    while time.time() < deadline and (not (store / "toy" / "zarr.json").exists() or s.n_complete("toy") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    n = s.n_complete("toy")
    assert last.startswith("interrupted: kept ") and f"{n} committed prompts of 'toy'" in last, last
    assert "resume" in last


def test_bank_build_never_stores_a_diverged_vector(tmp_path):
    from fv_remote.relational.bank import RelationBank
    from fv_remote.relational.bank_build import _add
    from fv_remote.fv.vectors import FunctionVector

    bank, seen = RelationBank("m"), []
    path = tmp_path / "bank.safetensors"
    nan = FunctionVector(torch.full((8,), float("nan")), model="m", task="t", layer=1, kind="ffv")
    _add(bank, path, {"name": "t", "category": "", "relation_words": [], "source": ""}, nan, None,
         lambda name, status: seen.append(status), None, 0, 1)
    assert len(bank) == 0 and not path.exists() and seen[0].startswith("skipped: training diverged")


def test_each_steering_command_runs_end_to_end(env, tmp_path):
    """Every way of scoring or generating with a vector runs to its table (test-ndif found `steer --task` calling
    the scorer with an argument it no longer takes: only a run of the command catches that)."""
    fv, m = ("--fv", env["good"]), ("-m", env["folder"])
    runs = {"steer --prompt": ("steer", *fv, *m, "--prompt", "Q: hot\nA:"),
            "steer --task": ("steer", *fv, *m, "--task", env["data"]),
            "generate": ("generate", *fv, *m, "--prompt", "Q: hot\nA:", "--max-new-tokens", "3"),
            "evaluate --sweep": ("evaluate", *fv, *m, "-t", env["data"], "--n-test", "3", "--n-shots", "2", "--sweep",
                                 "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "s.png"))}
    for name, args in runs.items():
        result = invoke(*args)
        assert result.code == 0 and not result.traceback, f"{name}: {result.describe()}"
    data = json.loads((tmp_path / "e.json").read_text())
    assert set(data["sweep"]) == {"0", "1", "2"} and (tmp_path / "s.png").is_file()
