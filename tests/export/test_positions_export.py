"""Steering at every position (positions "all", a llama.cpp control vector's rule) against plain-PyTorch hooks, the
scale sweep, and export to / import from llama.cpp control-vector GGUFs, locally and through the loopback NDIF
server (trusted and sandboxed)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from support.cli_harness import invoke, one_error_line, save_tiny_model
from conftest import make_tiny_model
from support.remote_fixtures import hosted_model_fixtures, point_client_at, toy_vector_fixtures

from fv_remote.export import llamacpp as ex
from fv_remote.data import RelationTask
from fv_remote.core.errors import UserError
from fv_remote.fv.evaluate import best_scale, evaluate_task, scale_sweep
from fv_remote.fv.steering import Condition, Steer, generate_many, last_logits, logits_conditions
from fv_remote.fv.vectors import FunctionVector
from fv_remote.execution import NDIF

WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
TASK = RelationTask("toy", [(a, b) for a in WORDS for b in WORDS if a != b][:60])
PROMPTS = ["Q: hot\nA:", "Q: the quick brown\nA:", "Q: up\nA: down\n\nQ: big\nA:"]
REPO = "test-org/tiny-llama-positions"


def _vec(model, seed=0, size=3.0):
    return torch.randn(model.adapter.d_model, generator=torch.Generator().manual_seed(seed)) * size


def _add_everywhere_hook(ad, vectors_scale):
    """A forward hook adding `scale * vec` to a block's output at every position (plain PyTorch, no nnsight)."""
    vec, scale = vectors_scale

    def hook(mod, args, output):
        hidden = output[0] if ad.layer_output_is_tuple else output
        hidden = hidden + scale * vec.to(hidden.dtype)
        return (hidden, *output[1:]) if ad.layer_output_is_tuple else hidden
    return hook


def _hf_last_logits(model, texts, hooks):
    enc = model.tokenizer(texts, return_tensors="pt", padding=True)
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            return model.hf(**enc, position_ids=position_ids).logits[:, -1]
    finally:
        for h in handles:
            h.remove()


def _hf_generate(model, prompt, hooks, n):
    ids = model.tokenizer(prompt, return_tensors="pt")
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            out = model.hf.generate(**ids, max_new_tokens=n, do_sample=False,
                                    pad_token_id=model.tokenizer.pad_token_id)
    finally:
        for h in handles:
            h.remove()
    return model.tokenizer.decode(out[0][ids.input_ids.shape[1]:], skip_special_tokens=True)


# -- positions "all" equals a hook adding the vector at every position ---------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gemma2", "gpt_neox"])
def test_all_positions_scoring_matches_plain_hook(tiny_tokenizer, family):
    model = make_tiny_model(family, tiny_tokenizer)
    ad = model.adapter
    vec = _vec(model)
    fv = FunctionVector(vector=vec, model=model.model_id, task="t", layer=1)
    ref = _hf_last_logits(model, PROMPTS, [(ad.layer(model.hf, 1), _add_everywhere_hook(ad, (vec, 0.5)))])
    got = last_logits(model, PROMPTS, Steer(fv, scale=0.5, positions="all"))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    last = last_logits(model, PROMPTS, Steer(fv, scale=0.5))
    assert (got - last).abs().max() > 1e-3  # "all" is not "last"


@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_all_positions_generation_matches_plain_hook(tiny_tokenizer, family):
    """Every generated token is steered too: greedy text equals HF generate with the hook on at every step."""
    model = make_tiny_model(family, tiny_tokenizer)
    ad = model.adapter
    for seed in range(3):
        vec = _vec(model, seed, size=2.0)
        fv = FunctionVector(vector=vec, model=model.model_id, task="t", layer=1)
        want = _hf_generate(model, PROMPTS[0], [(ad.layer(model.hf, 1), _add_everywhere_hook(ad, (vec, 1.0)))], 6)
        got_all, got_last = generate_many(model, [(PROMPTS[0], Steer(fv, positions="all")),
                                                  (PROMPTS[0], Steer(fv))], max_new_tokens=6)
        assert got_all == want
    # the prompt-only (last token, first step) rule is today's behaviour, unchanged
    ids = model.tokenizer(PROMPTS[0], return_tensors="pt")
    n_prompt = ids.input_ids.shape[1]

    def last_only(mod, args, output):
        hidden = output[0] if ad.layer_output_is_tuple else output
        if hidden.shape[1] == n_prompt:
            hidden = hidden.clone()
            hidden[:, -1] += vec
        return (hidden, *output[1:]) if ad.layer_output_is_tuple else hidden
    assert got_last == _hf_generate(model, PROMPTS[0], [(ad.layer(model.hf, 1), last_only)], 6)


def test_all_positions_distributed_matches_plain_hooks(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    ad = model.adapter
    heads = [(0, 1), (2, 3), (2, 0)]
    means = torch.randn(len(heads), ad.head_dim, generator=torch.Generator().manual_seed(2))
    fv = FunctionVector(vector=torch.zeros(ad.d_model), model=model.model_id, task="t", layer=0, heads=heads,
                        head_means=means)
    handles = []
    for layer in {h[0] for h in heads}:
        def pre(mod, args, layer=layer):
            z = args[0].clone()
            for i, (l_, h_) in enumerate(heads):
                if l_ == layer:
                    z[:, :, h_ * ad.head_dim:(h_ + 1) * ad.head_dim] += 2 * means[i]
            return (z,)
        handles.append(ad.head_site(model.hf, layer).register_forward_pre_hook(pre))
    try:
        ref = _hf_last_logits(model, PROMPTS, [])
    finally:
        for h in handles:
            h.remove()
    got = last_logits(model, PROMPTS, Steer(fv, distributed=True, scale=2.0, positions="all"))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_bad_positions_refused(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    fv = FunctionVector(vector=_vec(model), model=model.model_id, task="t", layer=1)
    with pytest.raises(UserError, match="last, all"):
        Steer(fv, positions="every")


# -- export -> import ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    return make_tiny_model("llama", tiny_tokenizer)


def test_export_import_round_trip_is_exact(llama, tmp_path):
    vec = _vec(llama, 5)
    fv = FunctionVector(vector=vec, model=llama.model_id, task="toy", layer=2, kind="ffv")
    path = ex.write_control_vector(tmp_path / "toy.gguf", ex.from_vector(fv, "toy.fv"), llama, 4.0, "given")
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "llama" and fields["controlvector.layer_count"] == 1
    assert [(t.name, t.tensor_type) for t in reader.tensors] == [("direction.2", gguf.GGMLQuantizationType.F32)]
    note = json.loads(ex.sidecar_path(path).read_text())
    assert note["layers"] == [2] and note["scale"] == 4.0 and "every position" in note["positions"]
    back = ex.import_control_vector(path, llama)
    assert torch.equal(back.vector, vec) and back.vector.dtype == torch.float32
    assert (back.layer, back.kind, back.task, back.model) == (2, "ffv", "toy", llama.model_id)
    assert back.meta["positions"] == "all" and back.meta["exported_scale"] == 4.0
    # through the vector file too
    back.save(tmp_path / "back.fv.safetensors")
    again = FunctionVector.load(tmp_path / "back.fv.safetensors")
    assert torch.equal(again.vector, vec) and again.meta["positions"] == "all"


def test_multi_layer_control_vector_steers_each_layer(llama, tmp_path):
    """A repeng-style file (a direction per layer) steers each layer; equal to hooks on both blocks."""
    ad = llama.adapter
    dirs = {1: _vec(llama, 1, 1.0), 2: _vec(llama, 2, 1.0)}
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 2)
    for layer, vec in dirs.items():
        writer.add_tensor(f"direction.{layer}", vec.numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    fv = ex.import_control_vector(path, llama, task="toy")
    assert fv.kind == "cvec" and fv.layer == 1
    fv.save(tmp_path / "cv.fv.safetensors")
    fv = FunctionVector.load(tmp_path / "cv.fv.safetensors")
    got_dirs = ex.directions(fv)
    assert set(got_dirs) == {1, 2} and all(torch.equal(got_dirs[k], dirs[k]) for k in dirs)
    hooks = [(ad.layer(llama.hf, k), _add_everywhere_hook(ad, (v, 1.5))) for k, v in dirs.items()]
    ref = _hf_last_logits(llama, PROMPTS, hooks)
    got = last_logits(llama, PROMPTS, Steer(fv, scale=1.5, positions="all"))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="--layer does not apply"):
        last_logits(llama, PROMPTS, Steer(fv, layer=2))
    # and back out: both layers
    out = ex.write_control_vector(tmp_path / "again.gguf", ex.from_vector(fv, "cv"), llama, 1.0, "given")
    assert sorted(ex.read_control_vector(out).directions) == [1, 2]


def test_export_refuses_what_llamacpp_cannot_do(llama):
    ad = llama.adapter
    fv0 = FunctionVector(vector=_vec(llama), model=llama.model_id, task="t", layer=0)
    with pytest.raises(UserError, match="no control-vector direction for layer 0"):
        ex.from_vector(fv0, "f")
    heads = [(1, 0), (2, 1), (2, 3)]
    hv = torch.randn(3, ad.d_model)
    fv = FunctionVector(vector=hv.sum(0), model=llama.model_id, task="t", layer=1, heads=heads,
                        head_means=torch.randn(3, ad.head_dim), head_vectors=hv)
    with pytest.raises(UserError, match="--per-layer-sum"):
        ex.from_vector(fv, "f", distributed=True)
    exp = ex.from_vector(fv, "f", distributed=True, per_layer_sum=True)
    assert sorted(exp.directions) == [1, 2] and "approximation" in exp.approximation
    torch.testing.assert_close(exp.directions[2], hv[1] + hv[2])
    fv.heads = [(0, 0), (2, 1), (2, 3)]
    with pytest.raises(UserError, match="layer 0"):
        ex.from_vector(fv, "f", distributed=True, per_layer_sum=True)


def test_export_bank_entry_weights_and_cfv(tiny_folder, tmp_path):
    """A bank entry is one direction; a CFV one per layer the bank uses (Σ w_i FFV_i), also through the CLI."""
    from fv_remote.relational.bank import BankEntry, RelationBank
    from fv_remote.models.loading import load_model

    model = load_model(str(tiny_folder))
    vecs = [_vec(model, s, 1.0) for s in (1, 2, 3)]
    bank = RelationBank(model.model_id, [BankEntry("a", vecs[0], 1), BankEntry("b", vecs[1], 2),
                                         BankEntry("c", vecs[2], 2)])
    exp = ex.from_bank_entry(bank, "b", "bank")
    assert list(exp.directions) == [2] and torch.equal(exp.directions[2], vecs[1])
    exp = ex.from_weights(bank, ex.parse_weights(bank, "a=0.5,c=2"), "w", "bank")
    assert sorted(exp.directions) == [1, 2]
    torch.testing.assert_close(exp.directions[1], 0.5 * vecs[0])
    torch.testing.assert_close(exp.directions[2], 2 * vecs[2])
    with pytest.raises(UserError, match="no relation 'zz'"):
        ex.parse_weights(bank, "zz=1")
    bank_file = bank.save(tmp_path / "bank.safetensors")
    result = invoke("export", "--bank", bank_file, "--cfv", "hot:cold", "--model", tiny_folder, "--out",
                    tmp_path / "cfv.gguf")
    assert result.code == 0, result.describe()
    note = json.loads((tmp_path / "cfv.gguf.json").read_text())
    assert note["kind"] == "cfv" and note["layers"] == [1, 2] and abs(sum(note["cfv_weights"].values()) - 1) < 1e-5
    cv = ex.read_control_vector(tmp_path / "cfv.gguf")
    w = note["cfv_weights"]
    np.testing.assert_allclose(cv.directions[2], (w["b"] * vecs[1] + w["c"] * vecs[2]).numpy(), atol=1e-5)
    result = invoke("export", "--bank", bank_file, "--entry", "a", "--model", tiny_folder, "--out",
                    tmp_path / "a.gguf")
    assert result.code == 0, result.describe()
    assert np.array_equal(ex.read_control_vector(tmp_path / "a.gguf").directions[1], vecs[0].numpy())
    one_error_line(invoke("export", "--bank", bank_file, "--model", tiny_folder, "--out", tmp_path / "x.gguf"),
                   "--entry")


def _write_gguf(path, arch="controlvector", tensors=None, hint="llama", **strings):
    writer = gguf.GGUFWriter(str(path), arch)
    if hint is not None:
        writer.add_string(f"{arch}.model_hint", hint)
    for key, value in strings.items():
        writer.add_string(key.replace("__", "."), value)
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return path


def test_import_refuses_bad_files(llama, tmp_path):
    d = llama.adapter.d_model
    ok = np.ones(d, dtype=np.float32)
    cases = {
        "garbage": (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00garbage"), "not a readable GGUF"),
        "text": (lambda p: p.write_text("hello"), "not a readable GGUF"),
        "model": (lambda p: _write_gguf(p, arch="llama", tensors={"token_embd.weight": ok}), "not a control vector"),
        "empty": (lambda p: _write_gguf(p), "no direction tensors"),
        "layer0": (lambda p: _write_gguf(p, tensors={"direction.0": ok}), "layer 0"),
        "name": (lambda p: _write_gguf(p, tensors={"vector.3": ok}), "direction.<layer>"),
        "f16": (lambda p: _write_gguf(p, tensors={"direction.1": ok.astype(np.float16)}), "not F32"),
        "2d": (lambda p: _write_gguf(p, tensors={"direction.1": np.ones((2, d), np.float32)}), "not 1-D"),
        "sizes": (lambda p: _write_gguf(p, tensors={"direction.1": ok, "direction.2": ok[:8]}), "values"),
        "nan": (lambda p: _write_gguf(p, tensors={"direction.1": ok * np.nan}), "NaN"),
        "dim": (lambda p: _write_gguf(p, tensors={"direction.1": np.ones(4096, np.float32)}, hint="mistral"),
                "another model"),
        "hint": (lambda p: _write_gguf(p, tensors={"direction.1": ok}, hint="gemma2"), "'gemma2' model"),
        "layers": (lambda p: _write_gguf(p, tensors={"direction.31": ok}), "another model"),
        "recorded": (lambda p: _write_gguf(p, tensors={"direction.1": ok}, fv_remote__model="org/other"),
                     "org/other"),
    }
    for name, (make, needle) in cases.items():
        path = tmp_path / f"{name}.gguf"
        make(path)
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(".", r"\.")) as err:
            ex.import_control_vector(path, llama)
        assert "\n" not in str(err.value), name


# -- CLI -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_cli_export_import_round_trip_and_errors(tiny_folder, tmp_path):
    from fv_remote.models.loading import load_model

    model = load_model(str(tiny_folder))
    vec = _vec(model, 7)
    fv = FunctionVector(vector=vec, model=model.model_id, task="toy", layer=1)
    fv_file = fv.save(tmp_path / "toy.fv.safetensors")
    result = invoke("export", "--fv", fv_file, "--model", tiny_folder, "--out", tmp_path / "toy.gguf", "--scale", "3")
    assert result.code == 0, result.describe()
    assert "--control-vector-scaled" in result.stdout
    result = invoke("import", tmp_path / "toy.gguf", "--model", tiny_folder, "--out", tmp_path / "back.fv.safetensors")
    assert result.code == 0, result.describe()
    back = FunctionVector.load(tmp_path / "back.fv.safetensors")
    assert torch.equal(back.vector, vec) and back.layer == 1
    # steer/generate take the imported vector at every position by default, and say so
    result = invoke("generate", "--fv", tmp_path / "back.fv.safetensors", "--model", tiny_folder, "--prompt",
                    "Q: hot\\nA:", "--max-new-tokens", "2")
    assert result.code == 0 and "positions all" in result.stdout, result.describe()
    # one error line, exit 2
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    one_error_line(invoke("import", tmp_path / "bad.gguf", "--model", tiny_folder, "--out", tmp_path / "x.fv"),
                   "not a readable GGUF")
    _write_gguf(tmp_path / "other.gguf", tensors={"direction.1": np.ones(4096, np.float32)})
    one_error_line(invoke("import", tmp_path / "other.gguf", "--model", tiny_folder, "--out", tmp_path / "x.fv"),
                   "another model")
    fv0 = FunctionVector(vector=vec, model=model.model_id, task="toy", layer=0).save(tmp_path / "l0.fv.safetensors")
    one_error_line(invoke("export", "--fv", fv0, "--model", tiny_folder, "--out", tmp_path / "l0.gguf"), "layer 0")
    one_error_line(invoke("export", "--fv", fv_file, "--model", tiny_folder, "--out", tmp_path / "x.bin"), ".gguf")
    one_error_line(invoke("steer", "--fv", fv_file, "--model", tiny_folder, "--prompt", "Q: a\\nA:", "--positions",
                          "first"), "--positions")


# -- the scale sweep and the evaluation row ---------------------------------------------------------------------------

def test_scale_sweep_and_row_say_how(llama):
    from fv_remote.data.tasks import prepare_task

    prepared = prepare_task(llama.tokenizer, TASK, seed=0, min_pairs=4)
    fv = FunctionVector(vector=_vec(llama, 3), model=llama.model_id, task="toy", layer=1)
    scores = scale_sweep(llama, prepared, fv, [0.5, 2.0], positions="all", n_prompts=6)
    assert set(scores) == {0.5, 2.0} and all(0 <= v <= 1 for v in scores.values())
    assert best_scale({1.0: 0.5, 2.0: 0.7, -2.0: 0.7, 4.0: 0.7}) == -2.0
    assert best_scale({1.0: 0.5, 2.0: 0.7, 4.0: 0.7}) == 2.0
    row = evaluate_task(llama, prepared, fv, n_test=4, n_shots=2, scale=2.0, positions="all").as_json()
    assert row["positions"] == "all" and row["scale"] == 2.0


# -- remote: the same traced helpers on the loopback server, trusted and sandboxed -----------------------------------

local, hub_cache, server, remote_model = hosted_model_fixtures(REPO, hang_s=1.0)
prepared, means_aie, fv = toy_vector_fixtures(TASK)


@pytest.mark.parametrize("sandbox", [False, True])
def test_all_positions_remote_equals_local(local, remote_model, fv, server, monkeypatch, hub_cache, sandbox):
    if sandbox:
        monkeypatch.setenv("FV_REMOTE_SANDBOX", "1")
    ndif = point_client_at(server, monkeypatch, hub_cache)
    conds = [Condition(PROMPTS, Steer(fv, positions="all", scale=0.5)),
             Condition(PROMPTS, Steer(fv, positions="all", distributed=True))]
    want = logits_conditions(local, conds)
    got = logits_conditions(remote_model.using(NDIF()), conds)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
    runs = [(PROMPTS[0], Steer(fv, positions="all")), (PROMPTS[0], Steer(fv))]
    assert generate_many(remote_model.using(NDIF()), runs, max_new_tokens=4) == \
        generate_many(local, runs, max_new_tokens=4)
    assert ndif.n_requests == 2 and all(job.status == "COMPLETED" for job in ndif.jobs)
    assert all(job.sandboxed == sandbox for job in ndif.jobs)


def test_scale_from_an_evaluation_json(tmp_path):
    fv_file = tmp_path / "t.fv.safetensors"
    fv_file.write_bytes(b"")
    data = {"model": "m", "layer": 5, "settings": {"fv": str(fv_file), "scale": 2.0, "positions": "all",
                                                   "scale_sweep": {"1": 0.5, "2": 0.75}}}
    (tmp_path / "e.json").write_text(json.dumps(data))
    scale, source = ex.scale_from_evaluation(tmp_path / "e.json", fv_file, 5)
    assert scale == 2.0 and "2: 0.75" in source
    with pytest.raises(UserError, match="layer 5"):
        ex.scale_from_evaluation(tmp_path / "e.json", fv_file, 6)
    with pytest.raises(UserError, match="evaluated"):
        ex.scale_from_evaluation(tmp_path / "e.json", tmp_path / "other.fv.safetensors", 5)
    data["settings"]["positions"] = "last"
    (tmp_path / "e.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="positions 'last'"):
        ex.scale_from_evaluation(tmp_path / "e.json", fv_file, 5)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not an `fv-remote evaluate --json` file"):
        ex.scale_from_evaluation(tmp_path / "bad.json", fv_file, 5)
