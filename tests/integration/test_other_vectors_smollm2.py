"""The other vectors through the CLI on the real offline model: residuals -> fit --method -> evaluate / export."""

import pytest

from fv_remote.fv.vectors import FunctionVector

from conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.integration


def test_residuals_fit_evaluate_export(tmp_path):
    store = str(tmp_path / "s.zarr")
    done = run_cli("residuals", "-t", "present-past", "--store", store, "--n-prompts", "6", "--batch-size", "6")
    assert done.returncode == 0, done.stderr
    assert "6 paired prompts" in done.stdout and "10-shot accuracy" in done.stdout
    tv = tmp_path / "tv.safetensors"
    done = run_cli("fit", "-t", "present-past", "--store", store, "--method", "task-vector", "--layer", "16",
                   "-o", str(tv))
    assert done.returncode == 0, done.stderr
    vec = FunctionVector.load(tv)
    assert (vec.kind, vec.layer, vec.apply) == ("task-vector", 16, "replace") and vec.base is not None
    done = run_cli("evaluate", "-t", "present-past", "--fv", str(tv), "--n-test", "8")
    assert done.returncode == 0, done.stderr
    assert "TASK-VECTOR" in done.stdout
    done = run_cli("export", "--fv", str(tv), "-o", str(tmp_path / "tv.gguf"))
    assert done.returncode == 0, done.stderr + done.stdout
    assert "additive equivalent" in " ".join((done.stdout + done.stderr).split())  # said, not silently added
    # mistakes: one line each, no traceback
    assert_one_line_error(run_cli("fit", "-t", "present-past", "--store", store, "--method", "task-vector",
                                  "--scales", "2"), "no scale")
    assert_one_line_error(run_cli("evaluate", "-t", "present-past", "--fv", str(tv), "--positions", "all"),
                          "positions all")
    assert_one_line_error(run_cli("fit", "-t", "antonym", "--store", store, "--method", "pca"),
                          "fv-remote residuals --task antonym")
