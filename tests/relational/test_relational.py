"""Relation bank, decoding, human alignment and composite-FV analogies on a tiny random model."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from conftest import make_tiny_model
from support.bank_fixtures import tiny_bank_fixtures
from fv_remote.relational.align import align, parse_columns, read_ratings, scatter, spearman_ci
from fv_remote.relational.analogy import (
    AnalogySettings,
    Combiner,
    composite_vector,
    continuation_scores,
    first_token_logprobs,
    relation_profile,
    run_analogies,
    train_combiner,
)
from fv_remote.relational.bank import BankEntry, RelationBank, info
from fv_remote.relational.bank_build import build_bank
from fv_remote.data import load_task, read_analogy_csv, read_mc_analogies
from fv_remote.relational.decode import decode, project
from fv_remote.core.errors import UserError
from fv_remote.fv.steering import Steer, last_logits
from fv_remote.fv.vectors import FunctionVector

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "relational"
CONTRACT = {"n", "n_skipped", "chance", "accuracy", "ci95"}


llama, bank_path, bank = tiny_bank_fixtures()


def test_bank_round_trip_and_resume(llama, bank_path, bank):
    assert bank.names == ["opposites", "echo"] and bank.layers == [1, 1] and bank.model == "tiny-llama"
    assert bank.vectors.shape == (2, llama.adapter.d_model) and bank.vectors.abs().sum() > 0
    entry = bank.get("opposites")
    assert entry.meta["relation_words"] == ["opposite", "antonym"] and entry.meta["n_train"] == 6
    summary = info(bank)
    assert summary["n"] == 2 and summary["layers"] == [1] and summary["entries"][1]["name"] == "echo"
    ffv = bank.function_vector("echo")
    assert ffv.kind == "ffv" and torch.equal(ffv.vector, bank.get("echo").vector)
    # resuming keeps finished relations untouched
    seen = []
    again = build_bank(llama, [load_task(FIX / "echo.json")], bank_path, layer=1,
                       on_task=lambda name, status: seen.append((name, status)))
    assert seen == [("echo", "kept")] and torch.equal(again.vectors, bank.vectors)
    with pytest.raises(UserError, match="did you mean 'echo'"):
        bank.get("ecko")


def test_bank_refusals(llama, tmp_path):
    empty = RelationBank("tiny-llama")
    empty.save(tmp_path / "empty.safetensors")
    with pytest.raises(UserError, match="is empty; build one with `fv-remote bank build"):
        RelationBank.load(tmp_path / "empty.safetensors")
    with pytest.raises(UserError, match="no relation bank at .*fv-remote bank build"):
        RelationBank.load(tmp_path / "missing.safetensors")
    fv = FunctionVector(vector=torch.zeros(64), model="tiny-llama", task="t", layer=0)
    fv.save(tmp_path / "one.fv.safetensors")
    with pytest.raises(UserError, match="not a relation bank .*single vector"):
        RelationBank.load(tmp_path / "one.fv.safetensors")
    with pytest.raises(UserError, match="give --layer"):
        build_bank(llama, [load_task(FIX / "echo.json")], tmp_path / "b.safetensors", layer=None)
    with pytest.raises(UserError, match="built for model"):
        RelationBank("other", [BankEntry("x", torch.zeros(64), 0)]).check_model(llama)


def test_decode_projects_through_norm_and_unembedding(llama):
    vec = torch.randn(llama.adapter.d_model)
    logits = project(llama, vec)
    expected = llama.hf.lm_head(llama.hf.model.norm(vec.view(1, 1, -1))).view(-1)
    assert torch.allclose(logits, expected, atol=1e-5)
    # a vector pointing at a word's unembedding row ranks that word first
    tok = llama.tokenizer
    target = tok.encode(" cold", add_special_tokens=False)[0]
    direction = llama.hf.lm_head.weight[target].detach() * 50
    result = decode(llama, direction, "cold-ish", words=["cold", "hot"], k=5)
    assert result.ranks["cold"] == 1 and result.forms["cold"] == " cold"
    assert result.top[0][0] == " cold" and result.ranks["hot"] > 1
    assert [v for _, v in result.top] == sorted((v for _, v in result.top), reverse=True)


def test_first_token_logprobs_match_steering(llama, bank):
    prompts = ["Q: hot\nA:", "Q: a big dog\nA:"]  # different lengths: left padding must not matter
    targets = [298, 305]
    mix = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = first_token_logprobs(llama, prompts, targets, mix, bank)
    slow = first_token_logprobs(llama, prompts, targets, mix, bank, fast=False)
    assert torch.allclose(got, slow, atol=1e-5)
    for r, name in enumerate(bank.names):
        steer = Steer(bank.function_vector(name))
        logp = torch.log_softmax(last_logits(llama, [prompts[r]], steer), -1)[0, targets[r]]
        assert float(got[r]) == pytest.approx(float(logp), abs=1e-4)
    # teacher forcing with the vector at the prompt's last token gives the same first-token log-prob
    total, count, _ = continuation_scores(llama, prompts, [" cold", " small dog"], mix, bank)
    assert count.tolist() == [1, 2]
    assert float(total[0]) == pytest.approx(float(got[0]), abs=1e-4)


@pytest.mark.parametrize("family", ["gptj", "gpt2"])
def test_shared_prefix_scoring_is_exact(family, tiny_tokenizer):
    """Many vectors on one prompt (a stem under every bank vector): cached prefix == whole prompts, gradients too."""
    model = make_tiny_model(family, tiny_tokenizer)
    d = model.adapter.d_model
    bank = RelationBank(model.model_id, [BankEntry("a", torch.randn(d), 1), BankEntry("b", torch.randn(d), 2)])
    prompts = ["Q: hot\nA:"] * 3 + ["Q: a big dog\nA:"] * 2
    targets = [298, 305, 300, 296, 293]
    results = []
    for fast in (True, False):
        mix = torch.rand(5, 2).requires_grad_(True)
        with torch.no_grad():
            mix.copy_(torch.tensor([[1, 0], [0, 1], [0.5, 0.5], [0.2, 0.8], [1, 1]], dtype=torch.float))
        logp = first_token_logprobs(model, prompts, targets, mix, bank, batch_size=4, fast=fast)
        logp.sum().backward()
        results.append((logp.detach(), mix.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-4)


def test_relation_profile_and_mixed_layer_cfv(llama, bank):
    prof = relation_profile(llama, bank, [("hot", "cold"), ("dog", "dog")])
    assert prof.shape == (2, 2) and torch.all(prof < 0)
    mixed = RelationBank(bank.model, [BankEntry("a", bank.vectors[0], 0), BankEntry("b", bank.vectors[1], 2)])
    cfv = composite_vector(mixed, torch.tensor([0.25, 0.75]))
    assert set(cfv) == {0, 2} and torch.allclose(cfv[2], 0.75 * bank.vectors[1])
    items = read_mc_analogies(FIX / "mc.jsonl")
    res = run_analogies(llama, mixed, items, AnalogySettings(n_boot=50))
    assert res.n == 3 and res.n_skipped == 2


def test_analogy_mc_contract_and_skips(llama, bank):
    items = read_mc_analogies(FIX / "mc.jsonl")
    res = run_analogies(llama, bank, items, AnalogySettings(n_boot=200, temperature=0.5))
    data = res.as_json()
    assert CONTRACT <= set(data) and {"cfv", "no_vector", "best_ffv", "icl"} <= set(data["accuracy"])
    assert data["n"] == 3 and data["n_skipped"] == 2
    reasons = [s["reason"] for s in data["skipped"]]
    assert any("B 'zebra'" in r for r in reasons) and any("D 'xylophone'" in r for r in reasons)
    assert data["chance"] == pytest.approx(np.mean([1 / 3, 1 / 2, 1 / 3]))
    for m, acc in data["accuracy"].items():
        lo, hi = data["ci95"][m]
        assert 0 <= lo <= acc <= hi <= 1
    assert torch.allclose(res.weights.sum(-1), torch.ones(3))
    json.dumps(data)  # serialisable
    # a sharper temperature moves the weights toward one-hot
    sharp = run_analogies(llama, bank, items, AnalogySettings(n_boot=10, temperature=0.01), methods=["cfv"])
    assert sharp.weights.max(-1).values.min() > res.weights.max(-1).values.min()


def test_analogy_generative_and_csv(llama, bank):
    items = read_analogy_csv(FIX / "analogies.csv")
    res = run_analogies(llama, bank, items, AnalogySettings(mode="generative", n_boot=50))
    assert res.n == 3 and res.chance < 0.01
    assert all(set(np.unique(v)) <= {0.0, 1.0} for v in res.correct.values())
    mean = run_analogies(llama, bank, items, AnalogySettings(score="mean", n_boot=50))
    assert mean.chance == 0.5 and len(mean.correct["cfv"]) == 3
    with pytest.raises(UserError, match="unknown mode"):
        run_analogies(llama, bank, items, AnalogySettings(mode="guess"))


def test_combiner_trains_saves_and_applies(llama, bank, tmp_path):
    items = read_mc_analogies(FIX / "mc.jsonl")
    comb = train_combiner(llama, bank, items, AnalogySettings(), steps=2, lr=0.5, items_per_step=2)
    assert not torch.equal(comb.weight, torch.eye(2)) and comb.meta["n_train"] == 3
    comb.save(tmp_path / "comb.safetensors")
    back = Combiner.load(tmp_path / "comb.safetensors")
    assert torch.equal(back.weight, comb.weight) and back.names == bank.names
    res = run_analogies(llama, bank, items, AnalogySettings(n_boot=10), combiner=back)
    assert res.n == 3
    with pytest.raises(UserError, match="retrain"):
        Combiner.identity(["x"]).check_bank(bank)


def test_spearman_ci_known_values(tmp_path):
    x = [1, 2, 3, 4, 5, 6, 7, 8]
    rho, ci = spearman_ci(x, [10, 20, 30, 40, 50, 60, 70, 80], n_boot=200)
    assert rho == pytest.approx(1.0) and ci == pytest.approx([1.0, 1.0])
    y = [2, 1, 3, 4, 5, 6, 8, 7]  # two adjacent swaps: rho = 1 - 6*(1+1+1+1)/(8*63) = 0.952...
    rho, (lo, hi) = spearman_ci(x, y, n_boot=500)
    assert rho == pytest.approx(1 - 24 / 504) and lo <= rho <= hi <= 1
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(size=200)
    rho, (lo, hi) = spearman_ci(a, a + b, n_boot=500)
    assert rho == pytest.approx(spearmanr(a, a + b).statistic) and lo < rho < hi and hi - lo < 0.3


def test_align_recovers_a_known_rho(llama, bank, tmp_path):
    rows = read_ratings(FIX / "ratings.csv")
    first = align(llama, bank, rows, method="weights", n_boot=100)
    assert first.n_used == 7 and first.n_skipped == 1  # 'zebra' is not single-token-resolvable
    # ratings that are a monotone function of the model's own similarity give rho = 1 exactly
    lines = ["a1,a2,b1,b2,score"]
    used = [r for r in rows if "zebra" not in (r.pair1 + r.pair2)]
    for r, sim in zip(used, first.model_sim):
        lines.append(f"{r.pair1[0]},{r.pair1[1]},{r.pair2[0]},{r.pair2[1]},{3 + 10 * sim:.9f}")
    (tmp_path / "known.csv").write_text("\n".join(lines) + "\n")
    known = read_ratings(tmp_path / "known.csv", parse_columns("a1,a2,b1,b2,score"))
    res = align(llama, bank, known, method="weights", n_boot=100)
    assert res.spearman == pytest.approx(1.0) and res.ci95 == pytest.approx([1.0, 1.0])
    assert res.as_json() == {"spearman": res.spearman, "ci95": res.ci95, "n_used": 7, "n_skipped": 0,
                             "method": "weights", "overlap": res.overlap.as_json()}
    assert res.as_json()["overlap"]["status"] == "known"  # the bank records its training pairs (test_overlap.py)
    for method in ("cfv", "logp", "bank"):
        other = align(llama, bank, rows, method=method, n_boot=50)
        assert -1 <= other.spearman <= 1 or np.isnan(other.spearman)
    assert scatter(res, tmp_path / "s.png").stat().st_size > 1000


def test_ratings_missing_columns_are_named(tmp_path):
    with pytest.raises(UserError) as err:
        read_ratings(FIX / "ratings_renamed.csv")
    msg = str(err.value)
    assert "missing columns pair1_word1, pair1_word2, pair2_word1, pair2_word2, mean_rating" in msg
    assert "w1, w2, w3, w4, score" in msg and "--columns" in msg
    rows = read_ratings(FIX / "ratings_renamed.csv", parse_columns("w1,w2,w3,w4,score"))
    assert len(rows) == 4 and rows[0].pair2 == ("up", "down") and rows[0].rating == 4.5
    (tmp_path / "half.csv").write_text("pair1_word1,pair1_word2,pair2_word1,rating\nhot,cold,up,3\n")
    with pytest.raises(UserError, match="missing columns pair2_word2, mean_rating"):
        read_ratings(tmp_path / "half.csv")
    with pytest.raises(UserError, match="5 comma-separated"):
        parse_columns("a,b,c")


def _main(*args: str) -> subprocess.CompletedProcess:
    code = "from fv_remote.cli.app import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}, timeout=300)


def test_cli_bad_input_messages(tmp_path):
    from typer.testing import CliRunner

    from fv_remote.cli.app import _register, app

    _register()
    RelationBank("HuggingFaceTB/SmolLM2-135M-Instruct").save(tmp_path / "empty.safetensors")
    # the real entry point: one red line on stderr, exit status 2
    proc = _main("analogy", "--mc", str(FIX / "mc.jsonl"), "--bank", str(tmp_path / "empty.safetensors"))
    assert proc.returncode == 2
    assert "is empty; build one with `fv-remote bank build --out" in proc.stderr

    def user_error(*args: str) -> str:
        result = CliRunner().invoke(app, list(args))
        assert isinstance(result.exception, UserError), result.output
        return str(result.exception)

    (tmp_path / "r.csv").write_text("x,y\n1,2\n")
    assert "missing columns pair1_word1" in user_error("align", "--ratings", str(tmp_path / "r.csv"), "--bank",
                                                       str(tmp_path / "empty.safetensors"))
    assert "fv-remote bank build" in user_error("bank", "info", str(tmp_path / "nothing.safetensors"))
    assert "exactly one of --mc" in user_error("analogy", "--bank", str(tmp_path / "empty.safetensors"))
    assert "--init fv needs --fv" in user_error("finetune", "--task", str(FIX / "echo.json"))
