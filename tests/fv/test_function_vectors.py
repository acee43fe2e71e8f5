"""FV building, saving and steering on tiny models: steering through the adapter equals a plain hook reference."""

import numpy as np
import pytest
import torch

from fv_remote.fv.cma import load_aie, run_cma
from fv_remote.data import RelationTask
from fv_remote.core.errors import UserError
from fv_remote.fv.evaluate import best_layer, evaluate_task, layer_sweep
from fv_remote.fv.extract import extract, mean_heads_tensor
from fv_remote.fv.steering import Steer, generate, last_logits
from fv_remote.store.activations import ActivationStore
from fv_remote.data.tasks import prepare_task
from fv_remote.fv.vectors import FunctionVector, build_function_vector, head_vectors, output_weight, top_heads

from conftest import TINY_FAMILIES, make_tiny_model

WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
TASK = RelationTask("toy", [(a, b) for a in WORDS for b in WORDS if a != b][:80])
PROMPTS = ["Q: hot\nA:", "Q: the quick brown\nA:"]


def _hf_logits(model, texts, hook_module=None, hook=None, pre=False):
    enc = model.tokenizer(texts, return_tensors="pt", padding=True)
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    handle = None
    if hook_module is not None:
        handle = (hook_module.register_forward_pre_hook(hook) if pre else hook_module.register_forward_hook(hook))
    try:
        return model.hf(**enc, position_ids=position_ids).logits[:, -1]
    finally:
        if handle:
            handle.remove()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_residual_steering_matches_plain_hook(tiny_tokenizer, family):
    model = make_tiny_model(family, tiny_tokenizer)
    ad = model.adapter
    vec = torch.randn(ad.d_model, generator=torch.Generator().manual_seed(0)) * 3
    fv = FunctionVector(vector=vec, model=model.model_id, task="t", layer=1)

    def hook(mod, args, output):
        hidden = output[0] if ad.layer_output_is_tuple else output
        hidden = hidden.clone()
        hidden[:, -1] += 0.5 * vec
        return (hidden, *output[1:]) if ad.layer_output_is_tuple else hidden

    ref = _hf_logits(model, PROMPTS, ad.layer(model.hf, 1), hook)
    got = last_logits(model, PROMPTS, Steer(fv, scale=0.5))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert (got - last_logits(model, PROMPTS)).abs().max() > 1e-3


def test_distributed_steering_matches_plain_hooks(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    ad = model.adapter
    heads = [(0, 1), (2, 3), (2, 0)]
    means = torch.randn(len(heads), ad.head_dim)
    fv = FunctionVector(vector=torch.zeros(ad.d_model), model=model.model_id, task="t", layer=0, heads=heads,
                        head_means=means)
    handles = []
    for layer in {h[0] for h in heads}:
        def pre(mod, args, layer=layer):
            z = args[0].clone()
            for i, (l_, h_) in enumerate(heads):
                if l_ == layer:
                    z[:, -1, h_ * ad.head_dim:(h_ + 1) * ad.head_dim] += means[i]
            return (z,)
        handles.append(ad.head_site(model.hf, layer).register_forward_pre_hook(pre))
    try:
        ref = _hf_logits(model, PROMPTS)
    finally:
        for h in handles:
            h.remove()
    got = last_logits(model, PROMPTS, Steer(fv, distributed=True))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_top_heads_selection_and_errors():
    aie = np.array([[0.1, 0.5], [0.3, -0.2]])
    assert [(l_, h) for l_, h, _ in top_heads(aie, k=3)] == [(0, 1), (1, 0), (0, 0)]
    assert len(top_heads(aie, share=0.5)) == 1  # 0.5 of 0.9 total positive AIE
    assert len(top_heads(aie, share=0.6)) == 2
    with pytest.raises(UserError, match="larger than the number of heads"):
        top_heads(aie, k=5)
    with pytest.raises(UserError):
        top_heads(aie, k=0)


def test_fv_is_sum_of_projected_head_means(tiny_tokenizer):
    model = make_tiny_model("gpt2", tiny_tokenizer)  # Conv1D: transposed weight, has a bias we must skip
    ad = model.adapter
    means = torch.randn(ad.n_layers, ad.n_heads, ad.head_dim)
    aie = np.zeros((ad.n_layers, ad.n_heads))
    aie[1, 2], aie[2, 0] = 0.5, 0.4
    fv = build_function_vector(model, "toy", means, aie, k=2, layer=1)
    assert fv.heads == [(1, 2), (2, 0)]
    expected = torch.zeros(ad.d_model)
    for layer, head in fv.heads:
        slot = torch.zeros(ad.head_width)
        slot[head * ad.head_dim:(head + 1) * ad.head_dim] = means[layer, head]
        site = ad.head_site(model.hf, layer)
        expected += site(slot.view(1, 1, -1)).view(-1) - site.bias  # the real module, minus its bias
    torch.testing.assert_close(fv.vector, expected, atol=1e-5, rtol=1e-5)
    assert output_weight(ad.head_site(model.hf, 0)).shape == (ad.d_model, ad.head_width)
    torch.testing.assert_close(head_vectors(model, means, fv.heads).sum(0), fv.vector)


def test_fv_file_round_trip_and_model_check(tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama", tiny_tokenizer)
    fv = FunctionVector(vector=torch.randn(model.adapter.d_model), model=model.model_id, task="toy", layer=2,
                        heads=[(1, 1)], head_means=torch.randn(1, 16), meta={"aie": [0.3]})
    loaded = FunctionVector.load(fv.save(tmp_path / "v.safetensors"))
    assert (loaded.model, loaded.task, loaded.layer, loaded.heads, loaded.meta) == ("tiny-llama", "toy", 2,
                                                                                     [(1, 1)], {"aie": [0.3]})
    torch.testing.assert_close(loaded.vector, fv.vector)
    other = make_tiny_model("qwen2", tiny_tokenizer)
    with pytest.raises(UserError, match="made for model 'tiny-llama'"):
        loaded.check_model(other)
    with pytest.raises(UserError, match="layer 7 out of range"):
        last_logits(model, PROMPTS, Steer(loaded, layer=7))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match="not a function-vector file"):
        FunctionVector.load(tmp_path / "junk.safetensors")


def test_pipeline_stages_on_tiny_model(tiny_tokenizer, tmp_path):
    """extract -> CMA (resumable) -> FV -> sweep -> evaluate: shapes, resumption and consistency."""
    model = make_tiny_model("llama", tiny_tokenizer)
    store = ActivationStore(str(tmp_path / "p.zarr"))
    extract(model, TASK, store, n_prompts=6, n_shots=3)
    means = mean_heads_tensor(store, "toy", only_correct=False)
    prepared = prepare_task(model.tokenizer, TASK)
    first = run_cma(model, prepared, store, means, n_prompts=2, n_shots=3)
    more = run_cma(model, prepared, store, means, n_prompts=3, n_shots=3)
    assert (first.n_new, more.n_new) == (2, 1)
    cma = store.open("toy/cma")
    assert dict(cma["indirect_effect"].sizes) == {"prompt": 3, "layer": 3, "head": 4}
    np.testing.assert_allclose(load_aie(store, "toy").values, cma["indirect_effect"].values.mean(0), atol=1e-7)
    fv = build_function_vector(model, "toy", means, more.aie, k=3)
    sweep = layer_sweep(model, prepared, fv, n_prompts=4)
    assert set(sweep) == {0, 1, 2} and all(0 <= v <= 1 for v in sweep.values())
    fv.layer = best_layer(sweep)
    scores = evaluate_task(model, prepared, fv, n_test=4, n_shots=3)
    row = scores.as_json()
    for key in ("zero_shot", "zero_shot_fv", "shuffled", "shuffled_fv", "icl"):
        assert 0.0 <= row[key] <= 1.0
    assert row["n_test"] == 4 and row["layer"] == fv.layer
    text = generate(model, "Q: hot\nA:", Steer(fv), max_new_tokens=3)
    assert isinstance(text, str)


def test_results_json_layer_is_an_int_with_per_task_layers():
    from types import SimpleNamespace

    from fv_remote.fv.evaluate import TaskScores
    from fv_remote.fv.pipeline import PipelineSettings, TaskRun, results_json

    def run(task, layer):
        return TaskRun(TaskScores(task, 10, 0.0, 0.5, 0.1, 0.6, 0.9, layer), fv=None, fv_path=None, sweep={layer: 0.5})

    model = SimpleNamespace(model_id="tiny")
    mixed = results_json(model, [run("a", 12), run("b", 16), run("c", 16)], PipelineSettings())
    assert mixed["layer"] == 16 and isinstance(mixed["layer"], int) and mixed["layer_is_per_task"]
    assert mixed["layers"] == {"a": 12, "b": 16, "c": 16} and [r["layer"] for r in mixed["results"]] == [12, 16, 16]
    tie = results_json(model, [run("a", 17), run("b", 4)], PipelineSettings())
    assert tie["layer"] == 4
    same = results_json(model, [run("a", 9)], PipelineSettings())
    assert same["layer"] == 9 and not same["layer_is_per_task"]


def test_best_layer_takes_the_middle_of_a_tie_and_flags_flat_sweeps():
    from fv_remote.fv.evaluate import sweep_is_flat

    assert best_layer({0: 0.1, 1: 0.5, 2: 0.2}) == 1
    assert best_layer({3: 0.4, 7: 0.4, 9: 0.4, 2: 0.1}) == 7
    assert best_layer({10: 0.14, 13: 0.14, 4: 0.0}) == 10  # even tie: the lower middle
    flat = {layer: 0.0 for layer in range(30)}
    assert best_layer(flat) == 14 and sweep_is_flat(flat)
    assert not sweep_is_flat({0: 0.0, 1: 0.05})
