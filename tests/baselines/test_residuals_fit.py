"""The residuals stage and the fit-vector stage on tiny random models of several families: what is stored is the
block output (checked against transformers' own hidden states), resumable; patch vs add; the sweep's grid, the
files, evaluation and export of every method."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model

from fv_remote.baselines.fit import EVERY_LAYER, choose, fit_vector
from fv_remote.baselines.residuals import load_residuals, read_residual_stream
from fv_remote.core.errors import UserError
from fv_remote.data import RelationTask
from fv_remote.data.tasks import prepare_task
from fv_remote.export.llamacpp import from_vector
from fv_remote.fv.evaluate import evaluate_task
from fv_remote.fv.steering import Steer, last_logits
from fv_remote.fv.vectors import FunctionVector
from fv_remote.store.activations import ActivationStore

WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
TASK = RelationTask("toy", [(a, b) for a in WORDS for b in WORDS if a != b][:60])
FAMILIES = ("llama", "gpt2", "gptj", "gemma3", "qwen3", "olmo2")


@pytest.fixture(params=FAMILIES)
def family_model(request, tiny_tokenizer):
    return make_tiny_model(request.param, tiny_tokenizer)


def test_reads_are_the_block_outputs_and_resume(family_model, tmp_path):
    model = family_model
    store = ActivationStore(str(tmp_path / "s.zarr"))
    first = read_residual_stream(model, TASK, store, n_prompts=3, n_shots=2, batch_size=2)
    again = read_residual_stream(model, TASK, store, n_prompts=5, n_shots=2, batch_size=2)
    assert (first.n_new, again.n_new, again.n_complete) == (3, 2, 5)
    reads = load_residuals(store, "toy")
    ad = model.adapter
    assert reads.icl.shape == reads.zero_shot.shape == (5, ad.n_layers, ad.d_model)
    # known answer: transformers' hidden_states[L + 1] is block L's output (the last one is after the final norm)
    tok = model.tokenizer
    for row in (0, 4):
        for kind in ("icl", "zero_shot"):
            text = _prompt_text(model, kind, row)
            ids = tok(text, return_tensors="pt").input_ids
            with torch.no_grad():
                hidden = model.hf(ids, output_hidden_states=True).hidden_states
            got = getattr(reads, kind)[row]
            for layer in range(ad.n_layers - 1):
                torch.testing.assert_close(got[layer], hidden[layer + 1][0, -1].float(), atol=1e-4, rtol=1e-4)
    assert list(store.open("toy/residual")["query"].values) == [p.query for p in _prompts(model, "icl")]
    info = store.summary()["tasks"]  # `store info` shows the reads; `store verify` scans them like any group
    assert list(info) == ["toy/residual"] and info["toy/residual"]["variables"]["icl"]["shape"][0] == 5
    from fv_remote.store.integrity import scan

    assert not scan(store.url, full=True).damage


def _prompts(model, kind: str):
    prepared = prepare_task(model.tokenizer, TASK, seed=0, min_pairs=3)
    if kind == "icl":
        return prepared.prompts("train", 5, kind="clean", n_shots=2)
    return prepared.prompts("train", 5, kind="zero_shot", n_shots=0)


def _prompt_text(model, kind: str, row: int) -> str:
    return _prompts(model, kind)[row].text


def test_patch_replaces_and_add_adds(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    ad = model.adapter
    last = ad.n_layers - 1
    vec = torch.randn(ad.d_model)
    prompts = ["Q: hot\nA:", "the quick brown fox jumps"]
    patched = FunctionVector(vec, model.model_id, "t", last, kind="task-vector", meta={"apply": "replace"})
    added = FunctionVector(vec, model.model_id, "t", last, kind="mean-diff", meta={"apply": "add"})
    plain = last_logits(model, prompts)
    with_patch = last_logits(model, prompts, Steer(patched))
    with_add = last_logits(model, prompts, Steer(added))
    # replaced at the last block: the logits depend on the vector alone, not on the prompt
    torch.testing.assert_close(with_patch[0], with_patch[1], atol=1e-5, rtol=0)
    final = model.hf.model.norm(vec.view(1, 1, -1))
    torch.testing.assert_close(with_patch[0], model.hf.lm_head(final)[0, 0].float(), atol=1e-4, rtol=1e-4)
    # added: the prompt still matters, and the logits moved
    assert (with_add[0] - with_add[1]).abs().max() > 1e-3
    assert (with_add - plain).abs().max() > 1e-3
    with pytest.raises(UserError, match="positions all"):
        last_logits(model, prompts, Steer(patched, positions="all"))
    with pytest.raises(UserError, match="scale"):
        last_logits(model, prompts, Steer(patched, scale=2.0))


def _reads_for(family: str, tokenizer, folder):
    model = make_tiny_model(family, tokenizer)
    store = ActivationStore(str(folder / f"{family}.zarr"))
    read_residual_stream(model, TASK, store, n_prompts=6, n_shots=2, batch_size=4)
    return model, prepare_task(tokenizer, TASK, seed=0, min_pairs=3), load_residuals(store, "toy")


@pytest.fixture(params=("gpt2", "llama", "gemma3"))
def tiny_reads(request, tiny_tokenizer, tmp_path):
    return _reads_for(request.param, tiny_tokenizer, tmp_path)


@pytest.mark.parametrize("method", ["task-vector", "mean-diff", "pca", "icv"])
def test_fit_each_method_evaluates_and_exports(tiny_reads, method, tmp_path):
    model, prepared, reads = tiny_reads
    n_layers = model.adapter.n_layers
    vec, sweep = fit_vector(model, prepared, reads, method, n_prompts=6)
    scales = {"task-vector": 1, "mean-diff": 4, "pca": 4, "icv": 5}[method]
    assert len(sweep) == (scales if method == "icv" else n_layers * scales)
    assert vec.kind == method and vec.meta["method"] == method and vec.meta["sweep"] == sweep
    assert vec.apply == ("replace" if method == "task-vector" else "add")
    if method == "icv":  # every layer from 1, one shared scale
        assert vec.layer == 1 and sorted(map(int, vec.meta["directions"])) == list(range(2, n_layers))
    if method == "task-vector":  # the chosen layer's mean n-shot residual, and the zero-shot mean recorded
        torch.testing.assert_close(vec.vector, reads.icl[:, vec.layer].mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(vec.base, reads.zero_shot[:, vec.layer].mean(0), atol=1e-5, rtol=0)
    path = vec.save(tmp_path / "v.safetensors")
    back = FunctionVector.load(path)
    assert back.kind == method and back.apply == vec.apply and back.layer == vec.layer
    row = evaluate_task(model, prepared, back, n_test=4, n_shots=2)
    assert row.n_test == 4 and 0 <= row.zero_shot_fv <= 1
    if vec.layer >= 1:
        exported = from_vector(back, str(path))
        if method == "task-vector":  # what the patch adds on average: the mean difference
            torch.testing.assert_close(exported.directions[vec.layer], vec.vector - vec.base)
            assert "additive equivalent" in exported.approximation


def test_fit_refuses_mistakes(tiny_tokenizer, tmp_path):
    model, prepared, reads = _reads_for("gpt2", tiny_tokenizer, tmp_path)
    with pytest.raises(UserError, match="no scale"):
        fit_vector(model, prepared, reads, "task-vector", scales=[2.0])
    with pytest.raises(UserError, match="only an ICV"):
        fit_vector(model, prepared, reads, "mean-diff", every_layer=True)
    with pytest.raises(UserError, match="unknown vector method"):
        fit_vector(model, prepared, reads, "caa")
    other = make_tiny_model("gemma3", tiny_tokenizer)
    if other.adapter.d_model != model.adapter.d_model or other.adapter.n_layers != model.adapter.n_layers:
        with pytest.raises(UserError, match="another model"):
            fit_vector(other, prepared, reads, "mean-diff")
    one, _ = fit_vector(model, prepared, reads, "icv", layer=2, n_prompts=4)
    assert one.layer == 2 and "directions" not in one.meta


def test_choose_prefers_accuracy_then_small_scale_then_middle_layer():
    grid = [(0, 1.0), (1, 1.0), (2, 1.0), (1, 0.5), (2, 0.5), (3, 0.5)]
    assert choose(grid, [0.9, 0.5, 0.5, 0.2, 0.2, 0.2]) == (0, 1.0)
    assert choose(grid, [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]) == (2, 0.5)
    assert choose([(EVERY_LAYER, 0.1), (EVERY_LAYER, 0.05)], [0.3, 0.3]) == (EVERY_LAYER, 0.05)


def test_missing_reads_name_the_command(tmp_path):
    store = ActivationStore(str(tmp_path / "s.zarr"))
    with pytest.raises(UserError, match="no activation store|fv-remote residuals"):
        load_residuals(store, "toy")
