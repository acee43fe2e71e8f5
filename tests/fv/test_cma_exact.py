"""Exactness of the fast causal mediation (and its fallbacks) against one forward per head; attribution scores.

No timing here: speed is measured by `make bench` (benchmarks/bench_cma.py, bench_attribution.py).
"""

import numpy as np
import pytest
import torch

from fv_remote.fv import cma
from fv_remote.fv.attribution import attribution_prompt
from fv_remote.data import RelationTask
from fv_remote.core.errors import UserError
from fv_remote.fv.extract import trace_heads
from fv_remote.store.activations import ActivationStore
from fv_remote.data.tasks import prepare_task

from conftest import TINY_FAMILIES, make_tiny_model
from test_remote import hub_cache, local_model, ndif, remote_model, server  # noqa: F401 - loopback NDIF fixtures
from fv_remote.execution import NDIF, resolve

TOL = 1e-4
TEXT = "Q: hot\nA: small\n\nQ: up\nA: cold\n\nQ: big\nA:"
ANSWER = 5


def _toy_task():
    words = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
    return RelationTask("toy", [(a, b) for a in words for b in words if a != b][:60])


def _means(model, seed=1, scale=3.0):
    ad = model.adapter
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(ad.n_layers, ad.n_heads, ad.head_dim, generator=gen) * scale


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fast_matches_naive_all_heads(tiny_tokenizer, family):
    model = make_tiny_model(family, tiny_tokenizer)
    means = _means(model)
    base_ref, ref = cma.cma_prompt_naive(model, TEXT, ANSWER, means)
    base, fast = cma.cma_prompt_fast(model, TEXT, ANSWER, means)
    assert fast.shape == ref.shape == (model.adapter.n_layers * model.adapter.n_heads,)
    assert abs(base - base_ref) < TOL
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=TOL, rtol=0)
    assert ref.abs().max() > 10 * float((fast - ref).abs().max())  # effects are not all ~0


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gemma3"])
def test_fast_subset_unordered_and_chunked(tiny_tokenizer, family):
    """A subset of heads in arbitrary order, forced into many small forwards, keeps the caller's order."""
    model = make_tiny_model(family, tiny_tokenizer)
    means = _means(model, seed=2)
    heads = [(2, 1), (0, 3), (1, 0), (2, 2), (0, 0), (1, 3), (2, 0)]
    _, ref = cma.cma_prompt_naive(model, TEXT, ANSWER, means, heads=heads)
    for chunk in (1, 2, 256):
        _, fast = cma.cma_prompt_fast(model, TEXT, ANSWER, means, heads=heads, chunk=chunk)
        np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen3"])
def test_reference_methods_agree(tiny_tokenizer, family):
    model = make_tiny_model(family, tiny_tokenizer)
    means = _means(model, seed=3)
    _, ref = cma.cma_prompt_naive(model, TEXT, ANSWER, means)
    for method in ("cached_batch", "invoke_per_head"):
        _, got = cma.CMA_FUNCTIONS[method](model, TEXT, ANSWER, means)
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=TOL, rtol=0, err_msg=method)


def test_sliding_window_shorter_than_prompt_falls_back_exactly(tiny_tokenizer):
    """Mistral with a 4-token window: the copies layout does not apply; fast must fall back and stay exact."""
    model = make_tiny_model("mistral", tiny_tokenizer)
    model.hf.config.sliding_window = 4
    n_tokens = len(model.tokenizer(TEXT).input_ids)
    assert n_tokens > 4 and not cma._copies_supported(model, n_tokens)
    means = _means(model, seed=4)
    _, ref = cma.cma_prompt_naive(model, TEXT, ANSWER, means)
    _, fast = cma.cma_prompt_fast(model, TEXT, ANSWER, means)
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=TOL, rtol=0)


def test_plan_groups_partitions_heads():
    heads = [(layer, head) for layer in range(30) for head in range(9)]
    for fixed, weights, max_copies in ((15, 20, 256), (0, 0, 256), (1e6, 1e6, 1000), (15, 20, 7)):
        groups = cma.plan_groups(heads, 30, 8.0, fixed=fixed, weights=weights, max_copies=max_copies)
        flat = sorted(i for g in groups for i in g)
        assert flat == list(range(len(heads)))
        assert all(1 <= len(g) <= max_copies for g in groups)
    # Free forwards: one per layer (each skips everything below it); costly forwards: one for all.
    assert len(cma.plan_groups(heads, 30, 8.0, fixed=0, weights=0)) == 30
    assert len(cma.plan_groups(heads, 30, 8.0, fixed=1e6, weights=1e6, max_copies=1000)) == 1


def test_fast_rejects_one_token_prompt(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    with pytest.raises(UserError, match="two tokens"):
        cma.cma_prompt_fast(model, "Q", ANSWER, _means(model))


# -- remote: one request per stage ---------------------------------------------------------------------------------

def test_fast_session_matches_local_dry_run_and_loopback(tiny_tokenizer, request):
    """`cma_fast_session`: plain local, nnsight's dry run and a loopback NDIF server (one request) all agree."""
    local_model = request.getfixturevalue("local_model")
    means = _means(local_model, seed=7)
    jobs = [(TEXT, ANSWER), ("Q: up\nA: down\n\nQ: the\nA:", 7)]
    want = [cma.cma_prompt_naive(local_model, t, a, means) for t, a in jobs]
    for remote, max_copies in ((False, 5), ("local", 1024), ("local", 5)):
        got = cma.cma_fast_session(local_model.using(resolve(remote)), jobs, means, max_copies=max_copies)
        for (b_got, e_got), (b_want, e_want) in zip(got, want):
            assert abs(b_got - b_want) < TOL
            np.testing.assert_allclose(e_got.numpy(), e_want.numpy(), atol=TOL, rtol=0)
    remote_model, ndif = request.getfixturevalue("remote_model"), request.getfixturevalue("ndif")
    got = cma.cma_fast_session(remote_model.using(NDIF()), jobs, means)
    assert ndif.n_requests == 1
    for (b_got, e_got), (b_want, e_want) in zip(got, want):
        assert abs(b_got - b_want) < TOL
        np.testing.assert_allclose(e_got.numpy(), e_want.numpy(), atol=TOL, rtol=0)


def test_run_cma_remote_is_one_request_and_stores_like_local(request, tmp_path):
    local_model = request.getfixturevalue("local_model")
    remote_model, ndif = request.getfixturevalue("remote_model"), request.getfixturevalue("ndif")
    prepared = prepare_task(local_model.tokenizer, _toy_task())
    means = _means(local_model, seed=8, scale=1.0)
    local = cma.run_cma(local_model, prepared, ActivationStore(str(tmp_path / "a.zarr")), means, n_prompts=3,
                        n_shots=3)
    store = ActivationStore(str(tmp_path / "b.zarr"))
    got = cma.run_cma(remote_model.using(NDIF()), prepared, store, means, n_prompts=3, n_shots=3)
    assert ndif.n_requests == 1 and got.n_new == 3
    np.testing.assert_allclose(got.aie.values, local.aie.values, atol=TOL, rtol=0)
    with pytest.raises(UserError, match="fast method only"):
        cma.run_cma(remote_model.using(NDIF()), prepared, store, means, n_prompts=4, n_shots=3, method="naive")


# -- attribution ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gemma2"])
def test_attribution_is_the_first_order_effect(tiny_tokenizer, family):
    """Scores equal dP/dz . (m - z): check against exact patches with m - z scaled down (finite differences)."""
    model = make_tiny_model(family, tiny_tokenizer)
    ad = model.adapter
    means = _means(model, seed=5)
    base, scores = attribution_prompt(model, TEXT, ANSWER, means)
    base_full, scores_full = attribution_prompt(model, TEXT, ANSWER, means, cached_prefix=False)
    assert abs(base - base_full) < 1e-7
    np.testing.assert_allclose(scores.numpy(), scores_full.numpy(), atol=1e-7, rtol=1e-4)
    acts = trace_heads(model, [TEXT], [ANSWER])["heads"][0, 0]  # corrupted last-token head outputs [L, H, Dh]
    eps = 1e-4  # the finite-difference error shrinks linearly with eps (gemma2: 5% at 1e-3, 0.6% at 1e-4)
    _, exact = cma.cma_prompt_naive(model, TEXT, ANSWER, acts + eps * (means - acts))
    np.testing.assert_allclose(exact.numpy() / eps, scores.numpy(), atol=0.02 * float(scores.abs().max()), rtol=0)
    assert scores.shape == (ad.n_layers * ad.n_heads,)


def test_attribution_stored_like_cma(tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama", tiny_tokenizer)
    prepared = prepare_task(model.tokenizer, _toy_task())
    store = ActivationStore(str(tmp_path / "s.zarr"))
    means = _means(model, seed=6, scale=1.0)
    first = cma.run_cma(model, prepared, store, means, n_prompts=2, n_shots=3, method="attribution")
    assert store.has_task("toy/attribution") and not store.has_task("toy/cma")
    np.testing.assert_allclose(cma.load_aie(store, "toy").values, first.aie.values)  # auto: attribution only
    exact = cma.run_cma(model, prepared, store, means, n_prompts=2, n_shots=3)
    np.testing.assert_allclose(cma.load_aie(store, "toy").values, exact.aie.values)  # auto prefers exact
    np.testing.assert_allclose(cma.load_aie(store, "toy", source="attribution").values, first.aie.values)
    ds = store.open("toy/attribution")
    assert dict(ds["indirect_effect"].sizes) == {"prompt": 2, "layer": 3, "head": 4}
    assert store.attrs("toy/attribution")["method"] == "attribution"
    # Same prompts as the exact run, so the two are directly comparable.
    assert list(ds["text"].values) == list(store.open("toy/cma")["text"].values)


# -- the real model ------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_fast_matches_naive_on_smollm2(smollm2):
    from fv_remote.data import load_task

    model = smollm2
    prepared = prepare_task(model.tokenizer, load_task("present-past"), min_pairs=12)
    clean = prepared.prompts("train", 8, kind="clean", n_shots=10)
    heads_out = trace_heads(model, [p.text for p in clean], prepared.ids(clean))["heads"][:, 0]
    means = heads_out.mean(0)
    prompt = prepared.prompts("train", 1, kind="shuffled", n_shots=10, seed_offset=1)[0]
    answer = prepared.answer_token[prompt.answer]
    heads = [(0, 0), (3, 4), (9, 8), (14, 2), (17, 7), (20, 5), (20, 6), (25, 1), (29, 8)]
    base_ref, ref = cma.cma_prompt_naive(model, prompt.text, answer, means, heads=heads)
    base, fast = cma.cma_prompt_fast(model, prompt.text, answer, means, heads=heads)
    assert abs(base - base_ref) < TOL
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=TOL, rtol=0)
    _, scores = attribution_prompt(model, prompt.text, answer, means)
    assert scores.shape == (270,) and torch.isfinite(scores).all()
