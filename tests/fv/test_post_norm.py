"""Post-norm function vectors (Gemma 2/3, OLMo 2/3) and the newer families (issue 13).

- the adapter's post-attention norm is where the spec says: its input is the attention output projection's output
  (and, in the families without one, the module of the same name normalises the residual stream instead);
- head vectors are in residual-stream units: all heads' vectors of a layer add up to the norm of the mean attention
  output, and adding one head's vector right after the attention block moves the logits as patching that head to
  its mean does, to first order, once the norm's rescaling of the whole attention output (no head's) is added;
- every way of computing them agrees (local weights, nnsight's in-process dry run, a sandboxed loopback NDIF server
  in float32 and bf16, the fit session);
- every family builds weightless (meta) from its config, as remote runs need;
- `fv-remote models info` names the family and the post-attention norm.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import (POST_NORM_FAMILIES, TINY_FAMILIES, assert_one_line_error, make_tiny_model, run_cli,
                      tiny_config)
from fv_remote.fv import cma
from fv_remote.models.adapters import SUPPORTED_FAMILIES
from fv_remote.data import RelationTask
from fv_remote.fv.extract import trace_heads
from fv_remote.traces.projection import linearised_norm
from fv_remote.fv.vectors import build_function_vector, head_vectors, output_weight
from fv_remote.execution import DryRun, NDIF

PROMPTS = ["Q: hot\nA: cold\n\nQ: up\nA:", "Q: big\nA: small\n\nQ: the\nA:", "Q: fox\nA: dog\n\nQ: over\nA:",
           "Q: lazy\nA: quick\n\nQ: brown\nA:"]
WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
TASK = RelationTask("toy", [(a, b) for a in WORDS for b in WORDS if a != b][:60])


def _post_norm_model(family: str, tokenizer, seed: int = 0):
    """A tiny post-norm model whose norm gains are not all 1 (Gemma initialises its gain offset to 0, OLMo to 1),
    so a vector that skipped the norm would be visibly wrong."""
    model = make_tiny_model(family, tokenizer, seed=seed)
    gen = torch.Generator().manual_seed(seed + 5)
    for layer in range(model.adapter.n_layers):
        weight = model.adapter.post_attn_norm(model.hf, layer).weight
        weight.data += torch.randn(weight.shape, generator=gen) * 0.5
    return model


def _means(model) -> torch.Tensor:
    """Mean head outputs at the last token of PROMPTS (so the mean attention output is the model's own)."""
    out = trace_heads(model, PROMPTS, [5] * len(PROMPTS), positions=(-1,))
    return out["heads"][:, 0].mean(0)


# -- where the norm is ------------------------------------------------------------------------------------------------

def test_post_attn_norm_is_on_the_attention_output(tiny_model):
    """Post-norm families: the norm's input is o_proj's output. Elsewhere a `post_attention_layernorm` (if any) is the
    pre-MLP norm: its input is the residual stream, not the attention output."""
    ad, hf = tiny_model.adapter, tiny_model.hf
    family = tiny_model.name.removeprefix("tiny-")
    assert ad.has_post_attn_norm == (family in POST_NORM_FAMILIES)
    block = ad.layer(hf, 1)
    named = getattr(block, "post_attention_layernorm", None)
    if named is None:
        assert not ad.has_post_attn_norm
        return
    seen = {}
    hooks = [ad.head_site(hf, 1).register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o.detach())),
             named.register_forward_pre_hook(lambda m, a: seen.__setitem__("norm_in", a[0].detach()))]
    try:
        with torch.no_grad():
            hf(**tiny_model.tokenizer(PROMPTS[:1], return_tensors="pt"))
    finally:
        for h in hooks:
            h.remove()
    same = seen["attn"].shape == seen["norm_in"].shape and torch.allclose(seen["attn"], seen["norm_in"])
    assert same == ad.has_post_attn_norm
    if ad.has_post_attn_norm:
        assert ad.post_attn_norm(hf, 1) is named
        assert "post_attention_layernorm" in ad.describe()["post_attention_norm"]
    else:
        assert ad.describe()["post_attention_norm"].startswith("none")


def test_post_attn_norm_rows_in_specs():
    """One ArchSpec row per family; the post-norm ones are exactly Gemma 2/3 and OLMo 2/3."""
    from fv_remote.models.adapters import SPECS

    assert len(SUPPORTED_FAMILIES) == len(set(SUPPORTED_FAMILIES))
    post = {t for s in SPECS if s.post_attn_norm for t in s.model_types}
    assert post == {"gemma2", "gemma3", "gemma3_text", "olmo2", "olmo3"}
    for family in ("gpt_oss", "qwen3_moe", "olmo3", "olmo2", "phi3", "mixtral"):
        assert family in SUPPORTED_FAMILIES


# -- what a head vector means -----------------------------------------------------------------------------------------

def _logits_with(model, layer: int, heads_last: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """Last-token logits of PROMPTS with every head of `layer` set to `heads_last` [n_heads, head_dim] at the last
    token (plain PyTorch hooks), and `add` [d_model] added to the post-attention norm's output there (i.e. to the
    residual stream right where the attention block writes)."""
    ad = model.adapter
    site, norm = ad.head_site(model.hf, layer), ad.post_attn_norm(model.hf, layer)

    def pre(mod, args):
        z = args[0].clone()
        z[:, -1] = heads_last.reshape(-1)
        return (z,)

    def post(mod, args, out):
        out = out.clone()
        out[:, -1] += add
        return out

    hooks = [site.register_forward_pre_hook(pre)] + ([norm.register_forward_hook(post)] if add is not None else [])
    enc = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            return model.hf(**enc, position_ids=(enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_head_vectors_decompose_the_mean_attention_output(tiny_tokenizer, family):
    """The definition: with the norm's scale frozen at the mean attention output a, the vectors of all heads of a
    layer plus the bias's share add up to exactly what the attention block adds there, norm(a)."""
    model = _post_norm_model(family, tiny_tokenizer)
    ad, means = model.adapter, _means(model)
    for layer in range(ad.n_layers):
        vecs = head_vectors(model, means, [(layer, h) for h in range(ad.n_heads)])
        site, norm = ad.head_site(model.hf, layer), ad.post_attn_norm(model.hf, layer)
        with torch.no_grad():
            anchor = site(means[layer].reshape(1, -1))
            bias = site(torch.zeros(1, ad.head_width))
            total = vecs.sum(0) + linearised_norm(norm, bias, anchor[0], torch.float32, ad.norm_eps)[0]
            torch.testing.assert_close(total, norm(anchor)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_adding_a_head_vector_is_patching_the_head_to_first_order(tiny_tokenizer, family):
    """Issue 13's check. In the mean state (every head of the layer at its mean at the last token), move head h from
    (1 - e) * mean to its mean: to first order in e the residual stream changes by e * J u, J the norm's Jacobian at
    the mean attention output a, u = W_O[:, slot] @ mean. Since J u = v - s * norm(a), v the head vector and
    s = (a . u) / (|a|^2 + d * eps) the head's share of the norm's rescaling of the whole attention output (a
    shared term that, like the bias, belongs to no head, and that the FV leaves out), adding e * (v - s * norm(a))
    after the norm must move the logits as the patch does.

    Tolerance: e = 0.01; what remains is second order, relative size O(e) (measured <= 0.004 here), so 0.05. `v`
    alone misses by the rescaling share (0.002-0.47 on these 4-head models, not asserted); the vector without the
    norm (W_O[:, slot] @ mean, the FV before issue 13) misses by more than half (measured 0.98-0.998)."""
    eps = 0.01
    model = _post_norm_model(family, tiny_tokenizer)
    ad, means = model.adapter, _means(model)
    for layer, head in [(0, 1), (1, 2), (2, 3)]:
        site, norm = ad.head_site(model.hf, layer), ad.post_attn_norm(model.hf, layer)
        base_heads = means[layer].clone()
        base_heads[head] *= 1 - eps
        base = _logits_with(model, layer, base_heads)
        patched = _logits_with(model, layer, means[layer]) - base
        with torch.no_grad():
            anchor = site(means[layer].reshape(1, -1))[0]
            u = site(torch.nn.functional.pad(means[layer, head], (head * ad.head_dim, (ad.n_heads - head - 1)
                                                                    * ad.head_dim)).view(1, -1))[0]
            u = u - site(torch.zeros(1, ad.head_width))[0]
            share = (anchor @ u) / (anchor @ anchor + ad.d_model * ad.norm_eps)  # the norm's epsilon counts here
            v = head_vectors(model, means, [(layer, head)])[0]
            added = _logits_with(model, layer, base_heads, add=eps * (v - share * norm(anchor.view(1, -1))[0])) - base
            naive = _logits_with(model, layer, base_heads, add=eps * u) - base
        error = float((added - patched).norm() / patched.norm())
        assert error < 0.05, (layer, head, error)
        assert float((naive - patched).norm() / patched.norm()) > 0.5


# -- head vectors: one definition, every path -------------------------------------------------------------------------

def _gain(model, layer: int) -> torch.Tensor:
    """The post-attention norm's elementwise gain, read from its weight: Gemma scales by (1 + weight), OLMo by
    weight (an independent reference for the ad-hoc norm call in `linearised_norm`)."""
    weight = model.adapter.post_attn_norm(model.hf, layer).weight.detach().float()
    return 1 + weight if model.adapter.family == "gemma" else weight


def _reference_vector(model, means, layer, head):
    ad = model.adapter
    site = ad.head_site(model.hf, layer)
    w = output_weight(site).detach().float()
    u = w[:, head * ad.head_dim:(head + 1) * ad.head_dim] @ means[layer, head]
    anchor = w @ means[layer].reshape(-1) + (site.bias.detach().float() if site.bias is not None else 0)
    return _gain(model, layer) * u / (anchor.pow(2).mean() + model.adapter.norm_eps).sqrt()


@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_head_vectors_follow_the_definition_on_every_path(tiny_tokenizer, family):
    """Local (weights + a direct norm call), nnsight's in-process dry run of the remote request (ad-hoc calls, no
    parameter read) and the closed form from the weights agree."""
    model = _post_norm_model(family, tiny_tokenizer)
    means = torch.randn(model.adapter.n_layers, model.adapter.n_heads, model.adapter.head_dim,
                        generator=torch.Generator().manual_seed(3))
    heads = [(2, 1), (0, 3), (2, 0), (1, 2)]
    local = head_vectors(model, means, heads)
    want = torch.stack([_reference_vector(model, means, l_, h_) for l_, h_ in heads])
    torch.testing.assert_close(local, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head_vectors(model.using(DryRun()), means, heads), local, atol=1e-5, rtol=1e-5)
    naive = torch.stack([output_weight(model.adapter.head_site(model.hf, l_)).float()[
        :, h_ * model.adapter.head_dim:(h_ + 1) * model.adapter.head_dim] @ means[l_, h_] for l_, h_ in heads])
    assert (local - naive).norm() > 0.1 * naive.norm()  # the norm really changed the vectors
    fv = build_function_vector(model, "toy", means, np.arange(12, dtype=float).reshape(3, 4), k=4)
    torch.testing.assert_close(fv.vector, fv.head_vectors.sum(0))


def test_pre_norm_families_are_unchanged(tiny_tokenizer):
    """Without a post-attention norm a head vector is W_O[:, slot] @ mean, as before."""
    model = make_tiny_model("gpt_oss", tiny_tokenizer)  # o_proj has a bias, which stays out
    ad = model.adapter
    means = torch.randn(ad.n_layers, ad.n_heads, ad.head_dim, generator=torch.Generator().manual_seed(3))
    heads = [(1, 2), (0, 0)]
    want = torch.stack([output_weight(ad.head_site(model.hf, l_)).float()[:, h_ * ad.head_dim:(h_ + 1) * ad.head_dim]
                        @ means[l_, h_] for l_, h_ in heads])
    torch.testing.assert_close(head_vectors(model, means, heads), want)
    torch.testing.assert_close(head_vectors(model.using(DryRun()), means, heads), want, atol=1e-5, rtol=1e-5)


def test_fit_session_uses_the_same_vectors(tiny_tokenizer):
    """The fit stage's one-session path (projection + sweep; what `--remote` runs) gives the local FV and sweep."""
    from fv_remote.fv.evaluate import fit_function_vector
    from fv_remote.data.tasks import prepare_task

    model = _post_norm_model("gemma3", tiny_tokenizer)
    ad = model.adapter
    means = _means(model)
    aie = np.random.default_rng(0).random((ad.n_layers, ad.n_heads))
    prepared = prepare_task(tiny_tokenizer, TASK, seed=0, min_pairs=4)
    want, want_sweep = fit_function_vector(model, prepared, means, aie, k=4, n_prompts=6, batch_size=3)
    got, got_sweep = fit_function_vector(model.using(DryRun()), prepared, means, aie, k=4, n_prompts=6, batch_size=3)
    torch.testing.assert_close(got.vector, want.vector, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.head_vectors, want.head_vectors, atol=1e-5, rtol=1e-5)
    assert got_sweep == want_sweep and got.layer == want.layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sandboxed_server_projects_through_the_norm(tiny_tokenizer, tmp_path, monkeypatch, dtype):
    """A loopback NDIF server in sandbox mode (no parameter can be read) hosting tiny Gemma 3 / OLMo 2: the remote
    head vectors equal the local ones (bf16: within bf16 rounding), in one request each."""
    from support.loopback_ndif import LoopbackNDIF
    from support.remote_fixtures import point_client_at, write_hub_cache

    from fv_remote import execution as R
    from fv_remote.models.loading import wrap_model

    for family in ("gemma3", "olmo2"):
        repo = f"test-org/tiny-{family}-postnorm"
        local = _post_norm_model(family, tiny_tokenizer)
        ad = local.adapter
        hub = write_hub_cache(tmp_path / family, repo, local.hf, tiny_tokenizer)
        hosted = wrap_model(copy.deepcopy(local.hf).to(dtype), tiny_tokenizer, name=repo)
        means = torch.randn(ad.n_layers, ad.n_heads, ad.head_dim, generator=torch.Generator().manual_seed(4))
        heads = [(2, 1), (0, 3), (2, 0)]
        with LoopbackNDIF({repo: hosted.lm}, hang_s=1.0, sandbox=True) as srv:
            point_client_at(srv, monkeypatch, hub)
            remote_model = R.load_remote_model(repo, cache_dir=hub)
            got = head_vectors(remote_model.using(NDIF()), means, heads)
            assert srv.n_requests == 1 and all(j.status == "COMPLETED" and j.sandboxed for j in srv.jobs), \
                [j.error for j in srv.jobs]
        want = head_vectors(local, means, heads)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(got, want, atol=0.05 * float(want.abs().max()), rtol=0.05)


# -- weightless builds and the newer families ------------------------------------------------------------------------

@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_weightless_build_from_config(tiny_tokenizer, family):
    """What a remote run does: the architecture from config + tokenizer on the meta device; the adapter it derives
    (sizes, head site, post-attention norm) equals the one from the real model, and no parameter holds data."""
    from fv_remote import execution as R
    from fv_remote.fv.vectors import projection_plan

    local = make_tiny_model(family, tiny_tokenizer)
    remote_model = R.load_remote_model(f"test-org/tiny-{family}", config=copy.deepcopy(local.hf.config),
                                       tokenizer=tiny_tokenizer)
    assert all(p.device.type == "meta" for p in remote_model.hf.parameters())
    got, want = remote_model.adapter, local.adapter
    assert (got.spec, got.n_layers, got.n_heads, got.head_dim, got.d_model, got.vocab_size) == \
        (want.spec, want.n_layers, want.n_heads, want.head_dim, want.d_model, want.vocab_size)
    means = torch.zeros(want.n_layers, want.n_heads, want.head_dim)
    plan = projection_plan(remote_model, means, [(0, 1), (2, 3)])
    assert len(plan["sites"]) == 2 and ("norms" in plan) == want.has_post_attn_norm


@pytest.mark.parametrize("family", ["gpt_oss", "olmo3"])
def test_fast_cma_with_sinks_and_windows_longer_than_the_prompt(tiny_tokenizer, family):
    """The copies layout (fast CMA) with a sliding window longer than the prompt, gpt-oss's attention sinks and its
    MoE: exact against one forward per head. (The tiny configs' 6-token window takes the per-row cache fallback,
    covered by test_cma_exact.)"""
    import transformers

    from fv_remote.models.loading import wrap_model

    torch.manual_seed(0)
    config = tiny_config(family, len(tiny_tokenizer))
    config.sliding_window = 64
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tiny_tokenizer.eos_token_id
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.requires_grad_(False)
    model = wrap_model(hf, tiny_tokenizer, name=f"tiny-{family}-w64", source="random")
    text = "Q: hot\nA: small\n\nQ: up\nA: cold\n\nQ: big\nA:"
    assert cma._copies_supported(model, len(tiny_tokenizer(text)["input_ids"]))
    means = torch.randn(model.adapter.n_layers, model.adapter.n_heads, model.adapter.head_dim,
                        generator=torch.Generator().manual_seed(1)) * 3
    _, ref = cma.cma_prompt_naive(model, text, 5, means)
    _, fast = cma.cma_prompt_fast(model, text, 5, means)
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=1e-4, rtol=0)
    assert ref.abs().max() > 1e-3


# -- the CLI ----------------------------------------------------------------------------------------------------------

def test_models_info_names_family_and_norm(tiny_tokenizer, tmp_path):
    gemma = make_tiny_model("gemma3", tiny_tokenizer)
    gemma.hf.save_pretrained(tmp_path / "gemma")
    tiny_tokenizer.save_pretrained(tmp_path / "gemma")
    proc = run_cli("models", "info", str(tmp_path / "gemma"))
    assert proc.returncode == 0, proc.stderr
    assert "gemma" in proc.stdout and "post_attention_layernorm" in proc.stdout, proc.stdout
    llama = make_tiny_model("llama", tiny_tokenizer)
    llama.hf.save_pretrained(tmp_path / "llama")
    tiny_tokenizer.save_pretrained(tmp_path / "llama")
    proc = run_cli("models", "info", str(tmp_path / "llama"))
    assert proc.returncode == 0 and "none (the attention output joins" in proc.stdout, proc.stdout


def test_unknown_family_lists_the_supported_ones(tiny_tokenizer, tmp_path):
    import transformers

    config = transformers.BloomConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, n_layer=1, n_head=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bloom")
    tiny_tokenizer.save_pretrained(tmp_path / "bloom")
    proc = run_cli("models", "info", str(tmp_path / "bloom"))
    assert_one_line_error(proc, "bloom", "gpt_oss", "qwen3_moe", "olmo3", "phi3", "mixtral", "gemma")
