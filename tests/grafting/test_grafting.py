"""Weight grafting on tiny random models: exactness at the extremes, causality, per-component routing, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import tiny_config
from fv_remote.core.errors import UserError
from fv_remote.grafting.finetune import load_pair
from fv_remote.grafting.graft import (GraftConfig, Grafter, encode, evaluate_model, layer_groups,
                                      metrics_from_logits, parse_components, parse_layers, span_mask,
                                      uncovered_parameters)
from fv_remote.grafting.synthetic import RELATIONS, GraftPrompt, SyntheticDataset, make_dataset

PROMPTS = [GraftPrompt("the quick brown fox jumps", "dog", 4, 15), GraftPrompt("Q: hot A: the lazy", "cold", 3, 6)]


# One family per distinct layout: separate q/k/v (llama), q_norm on [B, heads, T, d] (gemma3), fused q|k|v with
# learned positions (gpt2), per-head fused qkv (gpt_neox), tuple-returning blocks (gptj), q/k norms (qwen3).
FAMILIES = ("llama", "gemma3", "gpt2", "gpt_neox", "gptj", "qwen3")


def _hf(family, tok, seed=0):
    """A tiny random transformers model (no nnsight wrapper: grafting uses plain torch hooks)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, len(tok)), dtype=torch.float32).eval()


def _pair(family, tok):
    return _hf(family, tok, 0), _hf(family, tok, 1)


def _plain(hf, enc):
    with torch.no_grad():
        return hf(**enc.model_inputs()).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_everything_is_finetuned_and_nothing_is_pretrained_exactly(family, tiny_tokenizer):
    pt, ft = _pair(family, tiny_tokenizer)
    grafter = Grafter(pt, ft, tiny_tokenizer)
    enc = encode(tiny_tokenizer, PROMPTS)
    assert uncovered_parameters(GraftConfig.everything(), pt, grafter.adapter) == []
    ft_logits, pt_logits = _plain(ft, enc), _plain(pt, enc)
    assert (ft_logits - pt_logits).abs().max() > 1e-3  # the two models really differ
    assert torch.equal(grafter.logits(enc, GraftConfig.everything()), ft_logits)
    assert torch.equal(grafter.logits(enc, GraftConfig.nothing()), pt_logits)
    # The three named spans partition the positions: grafting all of them is grafting everything.
    union = GraftConfig(positions="entity+last+other", embed=True, unembed="not(none)")
    assert torch.equal(grafter.logits(enc, union), ft_logits)
    assert not any(m._forward_hooks for m in pt.modules())  # hooks are removed afterwards


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gpt_neox"])
def test_grafting_is_causal_and_dynamic(family, tiny_tokenizer):
    """Positions before the grafted ones are untouched; later positions see the grafted keys/values."""
    pt, ft = _pair(family, tiny_tokenizer)
    grafter = Grafter(pt, ft, tiny_tokenizer)
    prompt = [GraftPrompt("the quick brown fox jumps over", "dog", 10, 15)]  # entity: "brown"
    enc = encode(tiny_tokenizer, prompt)
    ent = enc.spans["entity"][0].nonzero()[:, 0]
    first, last_ent = int(ent[0]), int(ent[-1])
    assert tiny_tokenizer.decode(enc.input_ids[0, ent]).strip() == "brown"
    base = _plain(pt, enc)

    at_last = grafter.logits(enc, GraftConfig(positions="last", embed=True, unembed="last"))
    assert torch.equal(at_last[:, :-1], base[:, :-1])
    assert not torch.equal(at_last[:, -1], _plain(ft, enc)[:, -1])  # earlier positions are still pretrained

    at_entity = grafter.logits(enc, GraftConfig(positions="entity", embed=True))
    assert torch.equal(at_entity[:, :first], base[:, :first])
    # Only the entity used fine-tuned weights, yet the last token's prediction moves (keys/values carry it).
    assert (at_entity[:, -1] - base[:, -1]).abs().max() > 1e-4
    assert last_ent < enc.input_ids.shape[1] - 1


def _perturb_q(family, model, layer):
    """Change only the query projection of one layer, written independently of the grafting code's tables."""
    block = {"llama": lambda m: m.model.layers, "gpt2": lambda m: m.transformer.h,
             "gpt_neox": lambda m: m.gpt_neox.layers}[family](model)[layer]
    with torch.no_grad():
        if family == "llama":
            w = block.self_attn.q_proj.weight
            w += torch.randn_like(w)
        elif family == "gpt2":  # Conv1D weight [in, 3*d]; split order q, k, v
            d = model.config.n_embd
            w = block.attn.c_attn.weight
            w[:, :d] += torch.randn_like(w[:, :d])
        else:  # NeoX: output rows grouped per head as [q | k | v], head_dim each
            dh = model.config.hidden_size // model.config.num_attention_heads
            w = block.attention.query_key_value.weight
            q_rows = (torch.arange(w.shape[0]) % (3 * dh)) < dh
            w[q_rows] += torch.randn_like(w[q_rows])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_components_route_to_the_right_weights(family, tiny_tokenizer):
    pt = _hf(family, tiny_tokenizer)
    ft = copy.deepcopy(pt)
    _perturb_q(family, ft, layer=1)
    grafter = Grafter(pt, ft, tiny_tokenizer)
    enc = encode(tiny_tokenizer, PROMPTS)
    pt_logits, ft_logits = _plain(pt, enc), _plain(ft, enc)
    assert (pt_logits - ft_logits).abs().max() > 1e-4
    assert torch.equal(grafter.logits(enc, GraftConfig(layers="1", components=("q",))), ft_logits)
    assert torch.equal(grafter.logits(enc, GraftConfig(layers="0,2", components=("q",))), pt_logits)
    others = GraftConfig(components=("k", "v", "o", "mlp", "norms"), embed=True, unembed="all")
    assert torch.equal(grafter.logits(enc, others), pt_logits)


def test_metrics_rank_probability_and_topk():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 1.0, 0.0]])
    m = metrics_from_logits(logits, torch.tensor([3, 0]), k=1)
    assert m.ranks.tolist() == [2, 1]
    assert m.accuracy == 0.5 and m.top1 == 0.5
    assert m.probs[1] == pytest.approx(torch.softmax(logits[1], -1)[0].item())
    assert metrics_from_logits(logits, torch.tensor([3, 0]), k=2).accuracy == 1.0


def test_expressions():
    groups = layer_groups(30)
    assert groups["q1"] == list(range(0, 8)) and groups["q4"] == list(range(22, 30))
    assert sorted(sum((groups[f"q{i}"] for i in range(1, 5)), [])) == list(range(30))
    assert parse_layers("0-2,5,q4", 30) == [0, 1, 2, 5, *range(22, 30)]
    assert parse_layers("none", 30) == []
    for bad in ("3-1", "x", "30"):
        with pytest.raises(UserError):
            parse_layers(bad, 30)
    assert parse_components("attn,mlp") == ("q", "k", "v", "o", "mlp")
    assert parse_components("block") == ("q", "k", "v", "o", "mlp", "norms")
    with pytest.raises(UserError, match="unknown component"):
        parse_components("ffn")
    spans = {"entity": torch.tensor([[False, True, False]]), "last": torch.tensor([[False, False, True]]),
             "other": torch.tensor([[True, False, False]]), "all": torch.ones(1, 3, dtype=torch.bool)}
    assert span_mask("entity+last", spans).tolist() == [[False, True, True]]
    assert span_mask("not(entity+last)", spans).tolist() == span_mask("other", spans).tolist()
    assert span_mask("not-last", spans).tolist() == [[True, True, False]]
    with pytest.raises(UserError, match="unknown position span"):
        span_mask("subject", spans)


def test_synthetic_dataset(tiny_tokenizer, tmp_path):
    ds = make_dataset(6, ["film", "hometown"], seed=3, tokenizer=tiny_tokenizer)
    assert len(ds.facts) == 12 and len({f.subject for f in ds.facts}) == 6
    assert make_dataset(6, ["film", "hometown"], seed=3, tokenizer=tiny_tokenizer).facts == ds.facts
    for rel in RELATIONS.values():  # held-out phrasings are not training phrasings
        assert not {t.split("{o}")[0].strip() for t in rel.train_templates} & set(rel.eval_templates)
    for s in ds.train_sentences():
        assert any(s.text[s.object_start:s.object_end] == f.object for f in ds.facts)
    prompts = ds.eval_prompts("heldout")
    assert len(prompts) == 6 * (len(RELATIONS["film"].eval_templates) + len(RELATIONS["hometown"].eval_templates))
    assert all(p.entity in {f.subject for f in ds.facts} and not p.text.endswith(" ") for p in prompts)
    enc = encode(tiny_tokenizer, prompts[:3])
    for i, p in enumerate(prompts[:3]):
        assert tiny_tokenizer.decode(enc.input_ids[i][enc.spans["entity"][i]]).strip() == p.entity
    assert enc.spans["last"][:, -1].all() and enc.spans["last"].sum() == 3
    ds.save(tmp_path / "facts.json")
    assert SyntheticDataset.load(tmp_path / "facts.json").facts == ds.facts
    with pytest.raises(UserError):
        make_dataset(3, ["films"])


def test_cli_train_run_sweep(tiny_tokenizer, tmp_path):
    from typer.testing import CliRunner

    from fv_remote.cli.app import _register, app

    _register()
    base = tmp_path / "tiny"
    _hf("llama", tiny_tokenizer).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    runner = CliRunner()
    ft_dir = tmp_path / "ft"
    res = runner.invoke(app, ["graft", "train", "-m", str(base), "-o", str(ft_dir), "--n-subjects", "3",
                              "--epochs", "4", "--batch-size", "12", "--lr", "3e-3"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((ft_dir / "graft.json").read_text())
    assert manifest["base_model"] == str(base) and manifest["train"]["steps"] == 12
    losses = manifest["train"]["losses"]
    assert losses[-1] < losses[0]  # it learned something
    assert (ft_dir / "config.json").exists() and (ft_dir / "facts.json").exists()

    res = runner.invoke(app, ["graft", "run", "-d", str(ft_dir), "-p", "entity+last", "-l", "0-1", "-c", "o,mlp",
                              "--limit", "4", "--show", "2"])
    assert res.exit_code == 0, res.output
    assert "grafted" in res.output and "positions=entity+last layers=0-1" in res.output

    res = runner.invoke(app, ["graft", "run", "-d", str(ft_dir), "-l", "7"])
    assert isinstance(res.exception, UserError) and "out of range" in str(res.exception)

    res = runner.invoke(app, ["graft", "sweep", "-d", str(ft_dir), "--groups", "all", "--limit", "4"])
    assert res.exit_code == 0, res.output
    sweep = json.loads((ft_dir / "sweep" / "sweep.json").read_text())
    assert (ft_dir / "sweep" / "sweep.png").stat().st_size > 1000
    values = sweep["values"]
    assert sweep["rows"][:2] == ["pretrained", "fine-tuned"] and len(sweep["rows"]) == 13
    pt, ft, ds, _ = load_pair(ft_dir)
    prompts = ds.eval_prompts("heldout")[:4]
    assert values["pretrained"]["all"] == evaluate_model(pt.hf, pt.tokenizer, prompts).summary()
    assert values["fine-tuned"]["all"] == evaluate_model(ft.hf, ft.tokenizer, prompts).summary()
    grafter = Grafter(pt.hf, ft.hf, pt.tokenizer)
    last = grafter.evaluate(prompts, GraftConfig(positions="last", embed=True)).summary()
    assert values["last token (recall)"]["all"] == last
