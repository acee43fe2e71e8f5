"""Bounded inputs: prompts against the model's context before any work, entries of sane length, counts the data
can supply (or a note that prompts repeat), absurd counts refused at once, unusable bundled relations marked."""

from __future__ import annotations

import json
import time

import pytest

from support.cli_harness import invoke, one_error_line, save_tiny_model

WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
PAIRS = [(a, b) for a in WORDS for b in WORDS if a < b][:60]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model whose context is only 64 positions, and one with the usual 2048."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("bounded")
    short = save_tiny_model(root / "short")
    config = AutoConfig.from_pretrained(short)
    config.max_position_embeddings = 64
    config.save_pretrained(short)
    data = root / "toy.json"
    data.write_text(json.dumps([{"input": a, "output": b} for a, b in PAIRS]))
    small = root / "small.json"
    small.write_text(json.dumps([{"input": a, "output": b} for a, b in PAIRS[:20]]))
    return {"root": root, "short": str(short), "normal": str(save_tiny_model(root / "normal")), "data": str(data),
            "small": str(small)}


def test_prompts_longer_than_the_context_are_refused_before_any_work(env, tmp_path):
    store = tmp_path / "s.zarr"
    result = invoke("extract", "-t", env["data"], "-s", store, "-m", env["short"], "--n-prompts", "4",
                    "--n-shots", "10")
    one_error_line(result, "the longest prompt has", "context of 64", "--n-shots")
    assert not (store / "toy").exists()  # nothing traced, nothing stored
    assert invoke("extract", "-t", env["data"], "-s", store, "-m", env["short"], "--n-prompts", "4",
                  "--n-shots", "1").code == 0


def test_long_prompt_to_steer_is_refused(env, tmp_path):
    import torch

    from fv_remote.fv.vectors import FunctionVector

    fv = tmp_path / "v.fv.safetensors"
    FunctionVector(torch.randn(64), model=env["short"], task="toy", layer=1).save(fv)
    one_error_line(invoke("steer", "--fv", fv, "-m", env["short"], "--prompt", "hot cold " * 100),
                   "context of 64")
    one_error_line(invoke("generate", "--fv", fv, "-m", env["short"], "--prompt", "hot " * 30,
                          "--max-new-tokens", "40"), "+ 40 to generate", "context of 64")


def test_an_entry_of_megabytes_is_refused_with_its_line(tmp_path):
    path = tmp_path / "huge.json"
    pairs = [{"input": a, "output": b} for a, b in PAIRS[:20]]
    pairs[7]["output"] = "x" * 5_000_000
    path.write_text(json.dumps(pairs, indent=1))
    result = invoke("data", "show", path)
    one_error_line(result, "huge.json:", "5000000 characters", "at most 2000")


def test_absurd_counts_are_refused_at_once(env, tmp_path):
    start = time.monotonic()
    result = invoke("extract", "-t", env["data"], "-s", tmp_path / "s.zarr", "-m", env["normal"], "--n-prompts",
                    "10000000")
    one_error_line(result, "--n-prompts 10000000", "at most 100000")
    assert time.monotonic() - start < 30  # was: memory grew until the process died
    from fv_remote.data import RelationTask
    from fv_remote.core.errors import UserError
    from fv_remote.data.tasks import prepare_task
    from conftest import _tiny_tokenizer

    prepared = prepare_task(_tiny_tokenizer(), RelationTask("toy", PAIRS))
    with pytest.raises(UserError, match="at most 100000"):
        prepared.prompts("test", 10_000_000, kind="clean", n_shots=2)


def test_more_prompts_than_queries_says_how_many_are_distinct(env, tmp_path):
    result = invoke("extract", "-t", env["small"], "-s", tmp_path / "s.zarr", "-m", env["normal"], "--n-prompts",
                    "30", "--n-shots", "2", "--batch-size", "15")
    assert result.code == 0, result.describe()
    assert "note: --n-prompts 30 is more than the" in result.stderr and "queries repeat" in result.stderr


def test_data_list_marks_relations_unusable_on_the_model():
    from fv_remote.models.loading import DEFAULT_MODEL, is_cached

    if not is_cached(DEFAULT_MODEL):
        pytest.skip(f"{DEFAULT_MODEL} is not cached (make test fetches it)")
    result = invoke("data", "list")
    assert result.code == 0, result.describe()
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 4}
    assert "no: 0/101" in rows["word-number"] and "yes" in rows["antonym"]
    assert "unusable on smollm2-135m" in result.stdout and "word-number" in result.stdout.splitlines()[-1] + \
        result.stdout


def test_usability_verdicts(tiny_tokenizer):
    from fv_remote.data import RelationTask
    from fv_remote.cli.data_cmd import usability

    assert usability(tiny_tokenizer, RelationTask("ok", PAIRS)) == "yes"
    spaces = RelationTask("bad", [(a, " ") for a in WORDS])
    assert usability(tiny_tokenizer, spaces).startswith("no: 0/")
