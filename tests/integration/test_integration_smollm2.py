"""Integration on the real offline model (smollm2-135m): exact head reads, the store, the CLI, a real FV effect."""

import json

import numpy as np
import pytest
import torch

from fv_remote.data import load_task
from fv_remote.fv.extract import extract, trace_heads
from fv_remote.store.activations import ActivationStore

from conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.integration


def test_sizes(smollm2):
    ad = smollm2.adapter
    assert (ad.family, ad.n_layers, ad.n_heads, ad.head_dim, ad.d_model) == ("llama", 30, 9, 64, 576)


def test_traced_heads_equal_plain_hooks(smollm2):
    ad = smollm2.adapter
    texts = ["Q: hot\nA: cold\n\nQ: up\nA:", "Q: big\nA:"]
    captured = {}
    hooks = [ad.head_site(smollm2.hf, layer).register_forward_pre_hook(
        lambda mod, args, layer=layer: captured.__setitem__(layer, args[0].detach().clone()))
        for layer in range(ad.n_layers)]
    enc = smollm2.tokenizer(texts, return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            smollm2.hf(**enc, position_ids=(enc["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    finally:
        for h in hooks:
            h.remove()
    out = trace_heads(smollm2, texts, [0, 0])
    ref = torch.stack([captured[layer][:, -1].view(2, ad.n_heads, ad.head_dim) for layer in range(ad.n_layers)], 1)
    assert (out["heads"][:, 0] - ref).abs().max() < 1e-5


def test_store_round_trip_and_resume(smollm2, tmp_path):
    task = load_task("antonym")
    store = ActivationStore(str(tmp_path / "a.zarr"))

    class Stop(Exception):
        pass

    def stop(done, total):
        if done >= 4:
            raise Stop

    with pytest.raises(Stop):
        extract(smollm2, task, store, n_prompts=10, n_shots=5, batch_size=4, progress=stop)
    result = extract(smollm2, task, store, n_prompts=10, n_shots=5, batch_size=4)
    assert (result.n_new, result.n_complete) == (6, 10)
    ds = store.open("antonym")
    assert list(ds["prompt"].values) == list(range(10))
    direct = trace_heads(smollm2, [str(t) for t in ds["text"].values[:4]],
                         [int(i) for i in ds["answer_token"].values[:4]])
    np.testing.assert_allclose(ds["head_out"].values[:4], direct["heads"][:, 0].numpy(), atol=1e-5)


def test_cli_extract_and_store_info(tmp_path):
    url = str(tmp_path / "cli.zarr")
    proc = run_cli("extract", "--model", "smollm2-135m", "--task", "antonym", "--store", url, "--n-prompts", "6")
    assert proc.returncode == 0, proc.stderr
    info = run_cli("store", "info", url, "--json")
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    var = summary["tasks"]["antonym"]["variables"]["head_out"]
    assert var["dims"] == ["prompt", "layer", "head", "d_head"] and var["shape"] == [6, 30, 9, 64]
    assert summary["tasks"]["antonym"]["attrs"]["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # A store written by another model is refused (here: a tiny model's store under the same task name).
    again = run_cli("extract", "--model", "smollm2-135m", "--task", "antonym", "--store", url, "--n-prompts", "6",
                    "--seed", "3")
    assert_one_line_error(again, "seed")
    missing = run_cli("cma", "--task", "antonym", "--store", url, "--n-prompts", "1")
    assert missing.returncode == 0 or "fv-remote" in missing.stderr


def test_cli_pipeline_errors(tmp_path):
    url = str(tmp_path / "e.zarr")
    run_cli("extract", "--task", "present-past", "--store", url, "--n-prompts", "4")
    assert_one_line_error(run_cli("fit", "--task", "present-past", "--store", url), "fv-remote cma")
    assert_one_line_error(run_cli("cma", "--task", "capitalize", "--store", url), "fv-remote extract")


def test_fv_raises_zero_shot_accuracy(smollm2, tmp_path):
    """The science end to end on present-past (bundled data): the FV must beat the no-vector baseline."""
    from fv_remote.fv.pipeline import PipelineSettings, run_task

    settings = PipelineSettings(n_prompts=24, n_cma_prompts=3, n_test=30)
    run = run_task(smollm2, load_task("present-past"), ActivationStore(str(tmp_path / "p.zarr")), tmp_path,
                   settings)
    assert run.scores.zero_shot_fv >= run.scores.zero_shot + 0.2, run.scores
    assert 12 <= run.fv.layer <= 22, run.sweep  # the FV works mid-network on this model, not at L/3
    assert (tmp_path / "present-past_aie.png").stat().st_size > 1000


def test_gemma3_head_dim_when_cached():
    """Gemma-3-270M has head_dim 256 with d_model 640: the adapter must read the real width (runs when pulled)."""
    from fv_remote.models.loading import is_cached, load_model

    if not is_cached("gemma3-270m"):
        pytest.skip("gemma3-270m not pulled (fv-remote models pull gemma3-270m)")
    gemma = load_model("gemma3-270m")
    ad = gemma.adapter
    assert (ad.n_layers, ad.n_heads, ad.head_dim, ad.d_model) == (18, 4, 256, 640)
    out = trace_heads(gemma, ["Q: hot\nA:"], [0])
    assert out["heads"].shape == (1, 1, 18, 4, 256)


def test_ffv_from_zero_learns_the_task(smollm2):
    """A vector trained from zero on 20 zero-shot pairs (model frozen) makes present-past work on held-out pairs."""
    from fv_remote.relational.ffv import FinetuneSettings, examples, finetune
    from fv_remote.fv.steering import Steer, top1_accuracy
    from fv_remote.data.tasks import prepare_task

    prepared = prepare_task(smollm2.tokenizer, load_task("present-past"), seed=0)
    train, valid = examples(prepared, "train", 20), examples(prepared, "valid", 10)
    settings = FinetuneSettings(steps=30, lr=0.2, eval_every=5, patience=50)
    res = finetune(smollm2, train, valid, torch.zeros(smollm2.adapter.d_model), 9, settings, task="present-past",
                   init="zero")
    assert res.history["train_loss"][-1] < res.history["train_loss"][0] - 1.0, res.history["train_loss"]
    test = prepared.prompts("test", len(prepared.splits.test), kind="zero_shot", n_shots=0)
    texts, ids = [p.text for p in test], prepared.ids(test)
    with torch.no_grad():
        before = top1_accuracy(smollm2, texts, ids)
        after = top1_accuracy(smollm2, texts, ids, Steer(res.ffv))
    assert after >= before + 0.3, (before, after)
