"""Architecture adapters on tiny random models of every family: sizes, head reads and head patches vs plain hooks."""

import pytest
import torch

from fv_remote.models.adapters import SUPPORTED_FAMILIES, Adapter, spec_for
from fv_remote.core.errors import UserError
from fv_remote.fv.extract import trace_heads
from fv_remote.traces.patching import set_head

from conftest import TINY_SIZES, WIDE_HEAD_FAMILIES

PROMPTS = ["Q: hot\nA:", "Q: the quick brown fox\nA:"]


def _encode(model, texts):
    return model.tokenizer(texts, return_tensors="pt", padding=True)


def _hf_forward(model, texts, **kwargs):
    """Forward of the bare torch model with the same padding and positions nnsight uses."""
    enc = _encode(model, texts)
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens
    return model.hf(**enc, position_ids=position_ids, **kwargs)


def test_adapter_sizes(tiny_model):
    ad = tiny_model.adapter
    assert ad.n_layers == TINY_SIZES["n_layers"]
    assert ad.n_heads == TINY_SIZES["n_heads"]
    assert ad.d_model == TINY_SIZES["d_model"]
    expected_head_dim = WIDE_HEAD_FAMILIES.get(tiny_model.name.removeprefix("tiny-"), 16)
    assert ad.head_dim == expected_head_dim  # never d_model // n_heads blindly
    assert ad.vocab_size == len(tiny_model.tokenizer)
    assert ad.family in SUPPORTED_FAMILIES


def test_traced_heads_match_plain_hook(tiny_model):
    ad = tiny_model.adapter
    captured = {}
    hooks = [
        ad.head_site(tiny_model.hf, layer).register_forward_pre_hook(
            lambda mod, args, layer=layer: captured.__setitem__(layer, args[0].detach().clone()))
        for layer in range(ad.n_layers)
    ]
    try:
        ref_logits = _hf_forward(tiny_model, PROMPTS).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()
    answer_ids = [5, 6]
    out = trace_heads(tiny_model, PROMPTS, answer_ids, positions=(-1, -2))
    assert out["heads"].shape == (2, 2, ad.n_layers, ad.n_heads, ad.head_dim)
    for layer in range(ad.n_layers):
        ref = captured[layer][:, [-1, -2]].reshape(2, 2, ad.n_heads, ad.head_dim)
        torch.testing.assert_close(out["heads"][:, :, layer], ref, atol=1e-6, rtol=0)
    ref_prob = torch.softmax(ref_logits, -1)[[0, 1], answer_ids]
    torch.testing.assert_close(out["answer_prob"], ref_prob, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layer,head", [(0, 1), (2, 3)])
def test_head_patch_matches_plain_hook(tiny_model, layer, head):
    ad, lm = tiny_model.adapter, tiny_model.lm
    value = torch.randn(ad.head_dim, generator=torch.Generator().manual_seed(1))
    sl = slice(head * ad.head_dim, (head + 1) * ad.head_dim)

    def pre_hook(mod, args):
        z = args[0].clone()
        z[:, -1, sl] = value
        return (z,)

    handle = ad.head_site(tiny_model.hf, layer).register_forward_pre_hook(pre_hook)
    try:
        ref = _hf_forward(tiny_model, PROMPTS).logits[:, -1]
    finally:
        handle.remove()
    clean = _hf_forward(tiny_model, PROMPTS).logits[:, -1]

    with lm.trace(PROMPTS):
        set_head(ad.head_site(lm, layer), head, ad.head_dim, value)
        patched = ad.unembed(lm).output[:, -1].save()
    torch.testing.assert_close(patched, ref, atol=1e-4, rtol=1e-4)  # gemma2 softcapping: ~3e-5 float noise
    assert (patched - clean).abs().max() > 1e-4  # the patch really changed something


def test_unknown_architecture_names_families():
    class Cfg:
        model_type = "mamba"

    with pytest.raises(UserError) as err:
        spec_for(Cfg())
    msg = str(err.value)
    assert "mamba" in msg and "llama" in msg and "gpt_neox" in msg and "SPECS" in msg


def test_adapter_from_model_reads_real_width(tiny_tokenizer):
    from conftest import make_tiny_model

    model = make_tiny_model("gemma3", tiny_tokenizer)
    assert Adapter.from_model(model.hf).head_width == 4 * 24 != model.adapter.d_model
