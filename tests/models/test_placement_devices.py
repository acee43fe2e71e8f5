"""Placement (issue 24): device, dtype and device map chosen once, and every stage device- and dtype-correct.

There is no GPU in CI, so the stage list runs on `fakegpu` (tests/support/fake_device.py): a second device with real
values that raises CUDA's `Expected all tensors to be on the same device` when a stage lets a tensor it created on
the CPU meet the model's activations. Results must equal the plain CPU run. Also: bf16 and fp16 end to end on the
CPU, a device map split between the CPU and disk offload (accelerate) giving the unsplit numbers, and the one-line
errors of a wrong placement.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, make_tiny_model, run_cli
from support import fake_device
from support.fake_device import fake_gpu, move_model
from support.stage_list import compare, run_stages

from fv_remote.core.errors import UserError
from fv_remote.models.placement import Placement, parse_memory, placement_rows

FAKE_FAMILIES = ("llama", "gemma3", "gpt2", "gptj", "qwen3_moe", "phi3", "mixtral")


@pytest.mark.parametrize("family", FAKE_FAMILIES)
def test_every_stage_runs_on_a_second_device_with_the_cpu_numbers(family, tiny_tokenizer, tmp_path):
    model = make_tiny_model(family, tiny_tokenizer)
    model.hf.set_attn_implementation("eager")  # SDPA's CPU kernel allocates outside the wrapper
    want = run_stages(model, tmp_path / "cpu", family)
    fake_device.MISMATCHES.clear()
    with fake_gpu():
        move_model(model.hf)
        assert next(model.hf.parameters()).device.type == fake_device.NAME
        got = run_stages(model, tmp_path / "fake", family)
    assert not fake_device.MISMATCHES, fake_device.MISMATCHES[0]  # none, not even one a broad `except` swallowed
    assert compare(got, want, atol=1e-5) == []


def test_the_second_device_catches_a_stage_tensor_left_on_the_cpu(tiny_tokenizer, tmp_path, monkeypatch):
    """The check itself: a fast-CMA patch whose means stay on the CPU (the mistake issue 24 fixed) fails here."""
    import fv_remote.fv.cma_methods as cma_methods
    from fv_remote.data import RelationTask
    from fv_remote.data.tasks import prepare_task
    from fv_remote.fv.cma import run_cma
    from fv_remote.store.activations import ActivationStore
    from support.stage_list import PAIRS

    def planted(site, positions, heads, values, n_heads, head_dim):
        z = site.input
        grid = z[0].view(z.shape[1], n_heads, head_dim)
        grid[positions, heads] = values.to(grid.dtype)  # no device=: the means stay where they were made

    monkeypatch.setattr(cma_methods, "patch_positions", planted)
    model = make_tiny_model("llama", tiny_tokenizer)
    model.hf.set_attn_implementation("eager")
    prepared = prepare_task(model.tokenizer, RelationTask("toy", PAIRS), seed=0, min_pairs=4)
    ad = model.adapter
    means = torch.randn(ad.n_layers, ad.n_heads, ad.head_dim)
    with fake_gpu():
        move_model(model.hf)
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            run_cma(model, prepared, ActivationStore(str(tmp_path / "s.zarr")), means, n_prompts=1, n_shots=3)
    # on the CPU alone the same mistake passes unseen
    run_cma(make_tiny_model("llama", tiny_tokenizer), prepared, ActivationStore(str(tmp_path / "t.zarr")), means,
            n_prompts=1, n_shots=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_every_stage_runs_in_half_precision_on_the_cpu(family, dtype, tiny_tokenizer, tmp_path):
    model = make_tiny_model(family, tiny_tokenizer)
    want = run_stages(model, tmp_path / "fp32", family, cma_methods=("fast", "attribution"))
    model.hf.to(dtype)
    got = run_stages(model, tmp_path / "half", family, cma_methods=("fast", "attribution"))
    for key, value in got.items():  # everything stored or returned is float32 and finite
        if isinstance(value, np.ndarray):
            assert np.isfinite(value).all(), key
    # the store keeps float32; a half-precision activation is stored exactly (every value is representable)
    for key in ("extract.head_out", "residuals.icl", "residuals.zero_shot"):
        stored = got[key]
        assert np.array_equal(torch.from_numpy(stored).to(dtype).double().numpy(), stored), key
    # the FFV was trained in float32 (its Adam state too) and moved: not the FV it started from
    assert not np.allclose(got["finetune.vector"], want["fit.vector"] * 4)
    # the same stage in half precision agrees with float32 within the precision's rounding
    tol = {torch.bfloat16: 0.1, torch.float16: 0.02}[dtype]
    assert np.abs(got["extract.head_out"] - want["extract.head_out"]).max() < tol * (
        1 + np.abs(want["extract.head_out"]).max())


def _tiny_folder(tiny_tokenizer, tmp_path, family="llama"):
    model = make_tiny_model(family, tiny_tokenizer)
    folder = tmp_path / f"tiny-{family}"
    model.hf.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_a_model_split_between_cpu_and_disk_gives_the_unsplit_numbers(tiny_tokenizer, tmp_path):
    """accelerate's device map: layers 1-2 offloaded to disk (their weights on `meta` between forwards, loaded by
    accelerate's hooks): extract -> cma -> fit -> steer equal the unsplit model's within 1e-5 (float32)."""
    from fv_remote.models.loading import load_model

    folder = _tiny_folder(tiny_tokenizer, tmp_path)
    split_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                 "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    whole = load_model(str(folder), Placement(device="cpu"))
    split = load_model(str(folder), Placement(device="cpu", device_map=json.dumps(split_map),
                                              offload_folder=str(tmp_path / "offload")))
    rows = placement_rows(split.hf)
    assert [(r["block"], r["device"]) for r in rows if "layers" in r["block"]] == [
        ("model.layers.0", "cpu"), ("model.layers.1-2", "disk")]
    assert any(p.device.type == "meta" for p in split.hf.parameters())  # really offloaded
    want = run_stages(whole, tmp_path / "whole", "llama", upto="steer", cma_methods=("fast", "attribution"))
    got = run_stages(split, tmp_path / "split", "llama", upto="steer", cma_methods=("fast", "attribution"))
    assert compare(got, want, atol=1e-5) == []


def test_placement_from_options_and_environment(monkeypatch):
    monkeypatch.setenv("FV_REMOTE_DTYPE", "bf16")
    monkeypatch.setenv("FV_REMOTE_DEVICE", "cpu")
    chosen = Placement.from_env(device=None, dtype=None)
    assert (chosen.device, chosen.dtype, chosen.device_map) == ("cpu", "bfloat16", "")
    assert Placement.from_env(dtype="float16").dtype == "float16"  # an option wins over the environment
    assert Placement(device="cpu").from_pretrained_kwargs() == {"dtype": torch.float32, "device_map": {"": "cpu"}}
    assert Placement(device_map="balanced").map_value() == "balanced"
    assert Placement(device_map='{"model.layers.0": 0, "lm_head": "disk"}').map_value() == {
        "model.layers.0": 0, "lm_head": "disk"}
    assert parse_memory("80GiB") == 80 * 2**30 and parse_memory("24GB") == 24 * 10**9
    for bad in (dict(device="tpu"), dict(dtype="int8"), dict(device_map="{bad"), dict(device_map="everywhere"),
                dict(device_map='{"lm_head": "gpu7"}')):
        with pytest.raises(UserError):
            Placement(**bad)
    if not torch.cuda.is_available():
        assert Placement().resolved_device() == "cpu"  # the default on a machine without CUDA
        with pytest.raises(UserError, match="no CUDA device"):
            Placement(device="cuda:1").resolved_device()


def test_placement_mistakes_end_with_one_error_line():
    assert_one_line_error(run_cli("--device", "tpu", "models", "info"), "unknown device 'tpu'")
    assert_one_line_error(run_cli("--device-map", "{oops", "models", "info"), "not valid JSON")
    if not torch.cuda.is_available():
        proc = run_cli("--device", "cuda", "extract", "--task", "antonym", "--store", "/tmp/never.zarr")
        assert_one_line_error(proc, "no CUDA device")
        assert proc.returncode == 2


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_unembedding_gets_a_contiguous_input(family, tiny_tokenizer):
    """`logits_to_keep=1` slices a strided [B, 1, d] out of [B, T, d]; on the CPU a strided 3-D input makes the
    unembedding copy its weight once per row (6.4 GiB on gemma3-270m in bf16). Every loaded model's unembedding
    gets a contiguous input, and the logits are those of the plain forward."""
    from fv_remote.relational.ffv_plan import trace_kwargs

    model = make_tiny_model(family, tiny_tokenizer)
    model.hf.to(torch.bfloat16)
    seen = []
    model.hf.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    enc = tiny_tokenizer(["Q: hot\nA:", "Q: a much longer prompt\nA:"], return_tensors="pt", padding=True)
    with torch.no_grad():
        kept = model.hf(**enc, **trace_kwargs(model)).logits
        full = model.hf(**enc).logits
    assert kept.shape[1] == 1 and seen == [True, True]
    assert torch.equal(kept[:, -1], full[:, -1])
