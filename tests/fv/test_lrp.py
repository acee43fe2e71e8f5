"""LRP head scores (fv_remote.fv.lrp): AttnLRP conservation as lxt defines it, exact prefix caching, deterministic
rankings, the model left as it was, and the refusals (other families, remote, no demonstrations)."""

import numpy as np
import pytest
import torch

from fv_remote.fv import cma

from fv_remote.fv import lrp
from fv_remote.data import RelationTask
from fv_remote.core.errors import UserError
from fv_remote.store.activations import ActivationStore
from fv_remote.data.tasks import prepare_task
from fv_remote.fv.vectors import top_heads

from conftest import assert_one_line_error, make_tiny_model, run_cli
from fv_remote.execution import DryRun

TEXT = "Q: hot\nA: cold\n\nQ: up\nA: down\n\nQ: big\nA:"
ANSWER = 5
# float32 sums of ~10^3 terms of size ~0.1: a rule that leaked would be off by >= 1e-3 (the control below).
CONSERVATION_TOL = 1e-5


def _toy_task():
    words = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
    return RelationTask("toy", [(a, b) for a in words for b in words if a != b][:60])


def _relevance_budget(model, rules: bool):
    """(logit, relevance at the input embeddings, relevance the attention softmaxes absorb) over a whole prompt.

    lxt's conservation: every AttnLRP rule passes on exactly the relevance it receives except the softmax, whose
    implicit bias absorbs some (AttnLRP, ICML 2024). In lxt's gradient x input form: the attention output's
    relevance R_o splits into R_o / 2 for the values and R_o / 2 for the attention pattern, of which the queries and
    keys receive R_q + R_k; the softmax keeps R_o / 2 - R_q - R_k. So R(embeddings) + sum of that = the logit.
    """
    ad, hf = model.adapter, model.hf
    caught, hooks = {}, []
    for layer in range(ad.n_layers):
        attn = ad.layer(hf, layer).self_attn
        for name in ("q_proj", "k_proj", "v_proj"):  # registered first: sees the output before lxt's rescaling
            hooks.append(getattr(attn, name).register_forward_hook(
                lambda _m, _i, out, key=(layer, name): caught.__setitem__(key, out)))
        hooks.append(attn.o_proj.register_forward_pre_hook(
            lambda _m, args, key=(layer, "o"): caught.__setitem__(key, args[0])))
    ids = model.tokenizer(TEXT, return_tensors="pt").input_ids
    try:
        with (lrp.attnlrp_rules(model) if rules else torch.no_grad()), torch.enable_grad():
            embeds = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
            logit = hf(inputs_embeds=embeds, use_cache=False).logits[0, -1, ANSWER]
            keys = list(caught)
            grads = torch.autograd.grad(logit, [embeds, *(caught[k] for k in keys)])
    finally:
        for hook in hooks:
            hook.remove()
    rel = {k: float((caught[k] * g).sum().detach()) for k, g in zip(keys, grads[1:])}
    absorbed = sum(rel[(l, "o")] / 2 - rel[(l, "q_proj")] - rel[(l, "k_proj")] for l in range(ad.n_layers))
    values_half = [rel[(l, "v_proj")] - rel[(l, "o")] / 2 for l in range(ad.n_layers)]
    return float(logit), float((embeds * grads[0]).sum()), absorbed, values_half


@pytest.mark.parametrize("family", lrp.LRP_FAMILIES)
def test_relevance_is_conserved_as_lxt_defines_it(tiny_tokenizer, family):
    model = make_tiny_model(family, tiny_tokenizer)
    logit, at_embeddings, absorbed, values_half = _relevance_budget(model, rules=True)
    assert abs(at_embeddings + absorbed - logit) < CONSERVATION_TOL
    assert max(abs(v) for v in values_half) < CONSERVATION_TOL  # the values get exactly half (uniform rule)
    assert abs(absorbed) > 100 * CONSERVATION_TOL  # the softmax term is real, not ~0 by accident
    # `embedding_relevance` is the same quantity, per token.
    logit2, per_token = lrp.embedding_relevance(model, TEXT, ANSWER)
    assert abs(logit2 - logit) < 1e-6 and abs(float(per_token.sum()) - at_embeddings) < CONSERVATION_TOL
    # Control: plain gradient x input (no lxt rules) does not conserve.
    logit3, plain, plain_absorbed, _ = _relevance_budget(model, rules=False)
    assert abs(logit3 - logit) < 1e-6
    assert abs(plain + plain_absorbed - logit3) > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_head_relevance_with_cached_prefix_is_exact(tiny_tokenizer, family):
    """The last-token head relevances from the cached prefix equal those of a full forward + backward, and the
    heads of a layer add up to the relevance of its attention output (the output projection has no bias)."""
    model = make_tiny_model(family, tiny_tokenizer)
    ad, hf = model.adapter, model.hf
    logit, cached = lrp.lrp_prompt(model, TEXT, ANSWER)
    outs = []
    hooks = [ad.head_site(hf, layer).register_forward_pre_hook(lambda _m, a: outs.append(a[0]))
             for layer in range(ad.n_layers)]
    posts = []
    hooks += [ad.head_site(hf, layer).register_forward_hook(lambda _m, _a, o: posts.append(o))
              for layer in range(ad.n_layers)]
    ids = model.tokenizer(TEXT, return_tensors="pt").input_ids
    try:
        with lrp.attnlrp_rules(model), torch.enable_grad():
            embeds = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
            full_logit = hf(inputs_embeds=embeds, use_cache=False).logits[0, -1, ANSWER]
            grads = torch.autograd.grad(full_logit, outs + posts)
    finally:
        for hook in hooks:
            hook.remove()
    full = torch.stack([(z[0, -1] * g[0, -1]).view(ad.n_heads, ad.head_dim).sum(-1)
                        for z, g in zip(outs, grads[:ad.n_layers])]).reshape(-1)
    assert abs(logit - float(full_logit)) < 1e-5
    np.testing.assert_allclose(cached.numpy(), full.detach().numpy(), atol=1e-6, rtol=1e-4)
    per_layer_out = torch.stack([(o[0, -1] * g[0, -1]).sum() for o, g in zip(posts, grads[ad.n_layers:])])
    np.testing.assert_allclose(cached.view(ad.n_layers, ad.n_heads).sum(-1).numpy(),
                               per_layer_out.detach().numpy(), atol=1e-6, rtol=1e-4)


def test_rules_leave_the_model_as_it_was(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    hf = model.hf
    forwards = {name: m.__dict__.get("forward") for name, m in hf.named_modules()}
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in hf.named_modules()}
    ids = model.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        before = hf(input_ids=ids).logits
    lrp.lrp_prompt(model, TEXT, ANSWER)
    lrp.lrp_attention_prompt(model, TEXT, ANSWER, lrp.demo_end(TEXT, "\n\n"))
    assert {name: m.__dict__.get("forward") for name, m in hf.named_modules()} == forwards
    # the hooks the model came with (the unembedding's contiguity pre-hook), none added
    assert {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in hf.named_modules()} == hooks
    assert hf.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, before)
    # Inside the rules the forward is unchanged too (they only change gradients).
    with lrp.attnlrp_rules(model), torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


def test_paper_variant_scores_demonstration_attention(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    end = lrp.demo_end(TEXT, "\n\n")
    assert TEXT[end:] == "\n\nQ: big\nA:"
    logit, scores = lrp.lrp_attention_prompt(model, TEXT, ANSWER, end)
    assert scores.shape == (12,) and bool((scores >= 0).all()) and float(scores.sum()) > 0
    assert abs(logit - lrp.lrp_prompt(model, TEXT, ANSWER)[0]) < 1e-5
    with pytest.raises(UserError, match="demonstrations"):
        lrp.demo_end("Q: big\nA:", "\n\n")


def test_lrp_ranking_is_deterministic_and_stored(tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama", tiny_tokenizer)
    prepared = prepare_task(model.tokenizer, _toy_task())
    means = torch.zeros(3, 4, 16)
    results = {}
    for method in lrp.METHODS:
        runs = [cma.run_cma(model, prepared, ActivationStore(str(tmp_path / f"{method}{i}.zarr")), means,
                            n_prompts=3, n_shots=3, method=method) for i in range(2)]
        assert np.array_equal(runs[0].aie.values, runs[1].aie.values)
        assert top_heads(runs[0].aie, k=12) == top_heads(runs[1].aie, k=12)
        results[method] = runs[0]
    store = ActivationStore(str(tmp_path / "lrp0.zarr"))
    assert store.attrs("toy/lrp")["kind"] == "clean" and store.attrs("toy/lrp")["method"] == "lrp"
    np.testing.assert_array_equal(cma.load_aie(store, "toy", source="lrp").values, results["lrp"].aie.values)
    # Clean prompts with the same queries and demonstrations as the CMA's shuffled ones.
    shuffled = prepared.prompts("train", 3, kind="shuffled", n_shots=3, seed_offset=1)
    assert [q for q in store.open("toy/lrp")["query"].values] == [p.query for p in shuffled]


def test_lrp_refusals(tiny_tokenizer, tmp_path):
    prepared = prepare_task(tiny_tokenizer, _toy_task())
    gpt2 = make_tiny_model("gpt2", tiny_tokenizer)
    with pytest.raises(UserError, match="attribution"):
        cma.run_cma(gpt2, prepared, ActivationStore(str(tmp_path / "a.zarr")), torch.zeros(3, 4, 16),
                    n_prompts=1, n_shots=3, method="lrp")
    llama = make_tiny_model("llama", tiny_tokenizer)
    with pytest.raises(UserError, match="cannot run on NDIF.*--method attribution"):
        cma.run_cma(llama.using(DryRun()), prepared, ActivationStore(str(tmp_path / "b.zarr")), torch.zeros(3, 4, 16),
                    n_prompts=1, n_shots=3, method="lrp")


def test_cli_refuses_remote_lrp_in_one_line(tmp_path):
    proc = run_cli("cma", "--task", "antonym", "--store", str(tmp_path / "s.zarr"), "--method", "lrp", "--remote")
    assert_one_line_error(proc, "cannot run on NDIF", "--method attribution")
