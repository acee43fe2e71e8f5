import os

os.environ["HF_HUB_OFFLINE"] = "1"

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from fv_remote.cli.app import _register, app
from fv_remote.data import list_tasks

_register()
FIX = Path(__file__).resolve().parents[1] / "fixtures"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_data_list():
    result = invoke("data", "list")
    assert result.exit_code == 0, result.output
    assert "#pairs" in result.output
    for name in list_tasks():
        assert name in result.output


def test_data_show_file():
    result = invoke("data", "show", str(FIX / "todd_small.json"), "--n", "2", "--n-shots", "2", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "big" in result.output and "small" in result.output
    assert "loud" not in result.output.split("clean prompt")[0]  # only the first 2 pairs in the table
    assert "clean prompt, 2 demonstrations" in result.output
    assert "expected answer" in result.output


def test_data_show_data_dir_shuffled():
    result = invoke("data", "show", "todd_small", "--data-dir", str(FIX), "--prompt-kind", "shuffled")
    assert result.exit_code == 0, result.output
    assert "shuffled prompt, 3 demonstrations" in result.output


def test_data_show_zero_shot():
    result = invoke("data", "show", str(FIX / "relation_small.json"), "--prompt-kind", "zero_shot")
    assert result.exit_code == 0, result.output
    assert "opposites-mini" in result.output and "0 demonstrations" in result.output


def _main(*args: str) -> subprocess.CompletedProcess:
    code = "from fv_remote.cli.app import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_unknown_task_is_one_line_error():
    proc = _main("data", "show", "nonexistent")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nonexistent" in lines[0] and "fv-remote data list" in lines[0]
    assert "Traceback" not in proc.stderr


def test_bad_prompt_kind_and_malformed_file():
    proc = _main("data", "show", str(FIX / "todd_small.json"), "--prompt-kind", "clen")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "did you mean 'clean'" in proc.stderr
    proc = _main("data", "show", str(FIX / "todd_missing_key.json"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "todd_missing_key.json:6:" in proc.stderr


def test_data_list_shows_rows(tmp_path, monkeypatch):
    import fv_remote.data as data

    (tmp_path / "opposites-mini.json").write_text((FIX / "relation_small.json").read_text())
    monkeypatch.setattr(data, "_bundled", lambda: tmp_path)
    result = invoke("data", "list")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "opposites-mini" in line)
    assert "lexical" in row and " 4 " in row and "a word and its opposite" in row
