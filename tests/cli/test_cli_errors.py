"""User mistakes end with one clear line and a non-zero exit, never a traceback."""

from conftest import assert_one_line_error, run_cli


def test_unknown_model():
    assert_one_line_error(run_cli("models", "info", "smollm3-135m"), "smollm3-135m", "smollm2-135m")


def test_unknown_task(tmp_path):
    proc = run_cli("extract", "--task", "antonymm", "--store", str(tmp_path / "x.zarr"))
    assert_one_line_error(proc, "antonymm", "antonym")


def test_malformed_dataset_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[\n  {"input": "a", "output": "b"},\n  {"input": "c"}\n]\n')
    proc = run_cli("extract", "--task", str(bad), "--store", str(tmp_path / "x.zarr"))
    assert_one_line_error(proc, "broken.json", ":3")


def test_non_positive_counts(tmp_path):
    for flag, value in (("--n-prompts", "0"), ("--n-prompts", "-2"), ("--batch-size", "0")):
        proc = run_cli("extract", "--task", "antonym", "--store", str(tmp_path / "x.zarr"), flag, value)
        assert_one_line_error(proc, "positive")
    for flag in ("--n-prompts", "--n-shots", "--top"):
        proc = run_cli("cma", "--task", "antonym", "--store", str(tmp_path / "x.zarr"), flag, "0")
        assert_one_line_error(proc, flag, "positive")


def test_missing_store():
    assert_one_line_error(run_cli("store", "info", "/nonexistent/where.zarr"), "fv-remote extract")


def test_bad_vector_file(tmp_path):
    junk = tmp_path / "v.safetensors"
    junk.write_text("nope")
    assert_one_line_error(run_cli("evaluate", "--fv", str(junk)), "not a function-vector file")
    assert_one_line_error(run_cli("generate", "--fv", str(tmp_path / "none.safetensors"), "--prompt", "x"),
                          "not found")


def test_run_without_tasks():
    assert_one_line_error(run_cli("run"), "at least one task")
