"""Issue 17: labelled banks from public sources, per-group analogy results, icl_qa+cfv, the bank map."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from fv_remote.relational.analogy import AnalogySettings, bootstrap_ci, group_keys, run_analogies
from fv_remote.relational.bank import RelationBank
from fv_remote.relational.bank_sources import build_from_sources, report_path, select_sources
from fv_remote.data import RelationTask, load_task, read_analogy_csv, read_mc_analogies
from fv_remote.data.sources import Collection, bats_relations, preset_paths, semeval_relations, todd_relations
from fv_remote.core.errors import UserError
from fv_remote.relational.ffv import FinetuneSettings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIX = FIXTURES / "relational"


@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    return make_tiny_model("llama", tiny_tokenizer)


def _labelled(name: str, source: str, cls: str) -> RelationTask:
    task = load_task(FIX / f"{name}.json")
    task.labels = {"source": source, "class": cls, "subcategory": name}
    task.name = f"{source}:{name}"
    return task


@pytest.fixture(scope="module")
def labelled_bank(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("bank") / "public.safetensors"
    few = RelationTask("tiny", [("hot", "cold"), ("up", "down"), ("big", "small")])
    few.labels = {"source": "todd", "class": "x", "subcategory": "tiny"}
    few.name = "todd:tiny"
    coll = Collection([_labelled("opposites", "semeval2012", "CONTRAST"), few, _labelled("echo", "bats", "copy")])
    # a random tiny model seldom beats its start on 4 validation pairs in 2 steps (issue 26 refuses such entries);
    # what is tested here is the labels and the report, so those entries are kept on purpose
    bank, report = build_from_sources(llama, coll, path, layer=1, n_train=20, min_train=4, n_valid=4,
                                      settings=FinetuneSettings(steps=2, lr=0.5, allow_unchanged=True))
    return path, bank, report


def test_public_readers_label_every_relation(tmp_path):
    sem = semeval_relations(FIXTURES / "semeval_mini")
    assert [t.name for t in sem.tasks] == ["semeval2012:1a", "semeval2012:2c"]
    assert sem.tasks[0].labels["class"] == "CLASS-INCLUSION" and sem.tasks[0].labels["subcategory"] == "1a Taxonomic"
    bats = bats_relations(FIXTURES / "bats_pairs.json")
    by_name = {t.name: t.labels for t in bats.tasks}
    assert by_name["bats:E01 [country - capital]"]["class"] == "encyclopedic semantics"
    assert by_name["bats:I01 [noun - plural_reg]"]["source"] == "bats"
    todd = tmp_path / "abstractive"
    todd.mkdir()
    (todd / "opp.json").write_text((FIXTURES / "todd_small.json").read_text())
    (todd / "news.json").write_text(json.dumps([{"input": "a long headline about markets and rates today",
                                                 "output": "business"}] * 3))
    got = todd_relations(todd)
    assert [t.name for t in got.tasks] == ["todd:opp"] and got.tasks[0].labels["class"] == "abstractive"
    assert [u.name for u in got.unusable] == ["todd:news"] and "not a word relation" in got.unusable[0].reason
    assert got.unusable[0].n_pairs == 3
    with pytest.raises(UserError, match="missing"):
        preset_paths("public", tmp_path)
    with pytest.raises(UserError, match="unknown preset"):
        preset_paths("all", tmp_path)


def test_build_from_sources_records_labels_and_reports(llama, labelled_bank):
    path, bank, report = labelled_bank
    assert bank.names == ["semeval2012:opposites", "bats:echo"]
    meta = bank.get("semeval2012:opposites").meta
    assert meta["source"] == "semeval2012" and meta["class"] == "CONTRAST" and meta["subcategory"] == "opposites"
    # 14 pairs -> 10 training pairs after the 70/15/15 split: min(--n-train 20, 10)
    assert meta["n_train"] == 10
    assert report["per_source"]["semeval2012"] == {"offered": 1, "built": 1, "unusable": 0,
                                                   "train_s": report["per_source"]["semeval2012"]["train_s"]}
    assert report["per_source"]["todd"]["unusable"] == 1 and report["per_source"]["todd"]["built"] == 0
    (row,) = report["unusable"]
    assert row["name"] == "todd:tiny" and row["n_pairs"] == 3 and "fewer than 4" in row["reason"]
    assert set(report["train_s"]) == {"semeval2012:opposites", "bats:echo"}
    assert json.loads(report_path(path).read_text())["bank"] == 2
    # the labels survive the file; selecting a source keeps its entries only
    back = RelationBank.load(path)
    assert select_sources(back, ["bats"]).names == ["bats:echo"]
    with pytest.raises(UserError, match="no entries from source"):
        select_sources(back, ["msr"])


def test_resumed_build_keeps_times(llama, labelled_bank):
    path, _, first = labelled_bank
    coll = Collection([_labelled("opposites", "semeval2012", "CONTRAST"), _labelled("echo", "bats", "copy")])
    _, again = build_from_sources(llama, coll, path, layer=1, n_train=20, min_train=4, n_valid=4,
                                  settings=FinetuneSettings(steps=2, lr=0.5, allow_unchanged=True))
    assert again["train_s"] == first["train_s"] and len(again["wall_s_runs"]) == 2


def test_csv_header_extra_columns_and_groups(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("distance,D_foil,A,B,C,D\nnear,up,hot,cold,up,down\nfar,fox,big,small,fox,dog\n")
    items = read_analogy_csv(path)
    assert [it.stem for it in items] == [("hot", "cold"), ("big", "small")]
    assert items[1].choices == [("fox", "dog"), ("fox", "fox")] and items[1].groups == {"distance": "far"}
    assert group_keys(items) == ["distance"]
    path.write_text("A,B,C,D_foil\nhot,cold,up,down\n")
    with pytest.raises(UserError, match="lacks column"):
        read_analogy_csv(path)
    # no header: 5 columns by position, as before
    assert len(read_analogy_csv(FIXTURES / "analogies_noheader.csv")) >= 1


def test_jsonl_groups_relation_and_family():
    items = read_mc_analogies(FIX / "mc.jsonl")
    assert items[0].groups["relation"] == "L10 [antonyms - binary]"
    assert items[0].groups["family"] == "4_Lexicographic_semantics"
    assert items[1].groups["family"] == "semantic" and "prefix" in items[0].groups


def test_by_group_and_icl_qa_plus_cfv(llama, labelled_bank):
    _, bank, _ = labelled_bank
    items = read_mc_analogies(FIX / "mc.jsonl")
    res = run_analogies(llama, bank, items, AnalogySettings(n_boot=200))
    assert res.group_by is None  # three items, three relations: no groups worth a table unasked (issue 26)
    res.group_by = "relation"
    groups = res.by_group("family")
    assert sum(g["n"] for g in groups.values()) == res.n == 3
    idx = [i for i, it in enumerate(res.items) if it.groups["family"] == "4_Lexicographic_semantics"]
    lex = groups["4_Lexicographic_semantics"]
    for m, v in res.correct.items():
        assert lex["accuracy"][m] == pytest.approx(v[idx].mean())
        assert lex["ci95"][m] == bootstrap_ci(v[idx], 200, 0)
    assert all((g["ci95"] is None) == (g["n"] < 2) for g in groups.values())  # a group of one: no interval
    pooled = res.by_group("family", min_size=100)
    assert list(pooled) == ["other"] and pooled["other"]["pooled"] == len(groups) and pooled["other"]["n"] == 3
    for m, v in res.correct.items():
        assert pooled["other"]["ci95"][m] == bootstrap_ci(v, 200, 0)
    assert "cfv_minus_no_vector" in lex["gain"] and "icl_qa+cfv_minus_icl_qa" in res.gains()
    data = res.as_json()
    assert data["by_group"].keys() == res.by_group("relation", res.min_group).keys() == {"other"}
    json.dumps(data)
    # the CFV on top of the one-shot prompt: nothing added at scale 0, so exactly the one-shot prompt's hits
    zero = run_analogies(llama, bank, items, AnalogySettings(n_boot=10, scale=0.0),
                         methods=["cfv", "icl_qa", "icl_qa+cfv"])
    assert np.array_equal(zero.correct["icl_qa+cfv"], zero.correct["icl_qa"])
    assert np.array_equal(zero.correct["cfv"], run_analogies(llama, bank, items, AnalogySettings(n_boot=10),
                                                              methods=["cfv", "no_vector"]).correct["no_vector"])


def test_icl_qa_plus_cfv_moves_the_scores(llama, labelled_bank):
    from fv_remote.relational.analogy import _choice_scores, _method_rows, check_items, cfv_weights, relation_profile

    _, bank, _ = labelled_bank
    s = AnalogySettings(scale=4.0)
    kept, _ = check_items(llama.tokenizer, read_mc_analogies(FIX / "mc.jsonl"), s)
    weights = cfv_weights(relation_profile(llama, bank, [it.stem for it in kept], s))
    rows, prompts, ds, tmpl = _method_rows(kept, s, "icl_qa+cfv")
    assert prompts == _method_rows(kept, s, "icl_qa")[1]
    plain = _choice_scores(llama, bank, prompts, ds, tmpl, None, s, "mc")
    steered = _choice_scores(llama, bank, prompts, ds, tmpl, weights[torch.tensor(rows)], s, "mc")
    assert not torch.allclose(plain, steered)


# --- the bank map ------------------------------------------------------------------------------------------------


def test_adjusted_rand_index_known_values():
    from fv_remote.relational.bank_map import adjusted_rand_index as ari

    assert ari([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)  # same partition, other names
    assert ari([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    # by hand: cells (2, 1, 1, 2) give 2 pairs, rows 3 + 3, columns 1 + 1 + 1, E = 6 * 3 / 15 = 1.2
    assert ari([0, 0, 0, 1, 1, 1], ["a", "a", "b", "b", "c", "c"]) == pytest.approx((2 - 1.2) / (4.5 - 1.2))
    assert ari([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)


def _synthetic_bank(per_class: int = 6, noise: float = 0.3, seed: int = 0) -> RelationBank:
    from fv_remote.relational.bank import BankEntry

    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 32, generator=gen) * 3
    bank = RelationBank("m")
    for c in range(3):
        for j in range(per_class):
            vec = centres[c] + noise * torch.randn(32, generator=gen)
            bank.add(BankEntry(f"r{c}{j}", vec, 1, {"source": "semeval2012", "class": f"C{c}"}))
    bank.add(BankEntry("other", torch.randn(32, generator=gen), 1, {"source": "todd", "class": "t"}))
    return bank


def test_bank_map_recovers_planted_classes(tmp_path):
    from fv_remote.relational.bank_map import bank_map, plot_map, plot_recovery

    result = bank_map(_synthetic_bank(), n_perm=200)
    sem = next(r for r in result.recoveries if r.source == "semeval2012")
    assert sem.n == 18 and sem.n_classes == 3 and sem.ari == pytest.approx(1.0)
    assert abs(sem.perm_mean) < 0.1 and sem.perm_q95 < 0.5 and sem.p_value == pytest.approx(1 / 201)
    assert sorted(result.order) == list(range(19)) and np.allclose(np.diag(result.sim), 1.0)
    # relations of one planted class sit next to each other in the order
    pos = {result.names[i]: k for k, i in enumerate(result.order)}
    assert max(pos[f"r0{j}"] for j in range(6)) - min(pos[f"r0{j}"] for j in range(6)) == 5
    # classes unrelated to the geometry: no recovery beyond the shuffles
    noisy = bank_map(_synthetic_bank(noise=50.0), n_perm=200)
    assert next(r for r in noisy.recoveries if r.source == "semeval2012").ari < 0.5
    assert plot_map(result, tmp_path / "m.png").stat().st_size > 1000
    assert plot_recovery(result, tmp_path / "r.png").stat().st_size > 1000
    json.dumps(result.as_json())


def test_bank_map_cli(tmp_path):
    from typer.testing import CliRunner

    from fv_remote.cli.app import _register, app

    _register()
    _synthetic_bank().save(tmp_path / "b.safetensors")
    res = CliRunner().invoke(app, ["bank", "map", str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "m.png"),
                                   "--n-perm", "50", "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.png").is_file() and (tmp_path / "m_recovery.png").is_file()
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["n"] == 19 and data["recovery"][0]["ari"] == pytest.approx(1.0)
    res = CliRunner().invoke(app, ["bank", "map", str(tmp_path / "b.safetensors"), "--linkage", "median"])
    assert isinstance(res.exception, UserError) and "unknown linkage" in str(res.exception)


def test_analogy_cli_group_by_refusals(tmp_path):
    from typer.testing import CliRunner

    from fv_remote.cli.app import _register, app

    _register()
    _synthetic_bank().save(tmp_path / "b.safetensors")
    res = CliRunner().invoke(app, ["analogy", "--mc", str(FIX / "mc.jsonl"), "--bank", str(tmp_path / "b.safetensors"),
                                   "--group-by", "difficulty"])
    assert isinstance(res.exception, UserError) and "family, prefix, relation" in str(res.exception)
    res = CliRunner().invoke(app, ["analogy", "--mc", str(FIX / "mc.jsonl"), "--bank", str(tmp_path / "b.safetensors"),
                                   "--methods", "cfv,guess"])
    assert isinstance(res.exception, UserError) and "unknown guess" in str(res.exception)


# --- the learned combiner, done properly ---------------------------------------------------------------------------


def test_analogies_from_relations_use_other_classes():
    from fv_remote.relational.combiner_fit import analogies_from_relations

    def rel(name, cls, pairs):
        task = RelationTask(name, pairs)
        task.labels = {"class": cls}
        return task

    tasks = [rel("a", "X", [("hot", "cold"), ("up", "down"), ("big", "small"), ("quick", "lazy")]),
             rel("b", "X", [("cat", "cats"), ("dog", "dogs")]),
             rel("c", "Y", [("fox", "fox"), ("the", "the")]), rel("d", "Z", [("one", "two"), ("two", "three")]),
             rel("e", "W", [("x", "y")])]
    items = analogies_from_relations(tasks, per_relation=2, n_choices=4, seed=1)
    from_a = [it for it in items if it.relation == "a"]
    assert len(from_a) == 2 and all(len(it.choices) == 4 for it in items)
    a_pairs = set(tasks[0].pairs)
    for it in from_a:
        assert it.stem in a_pairs and it.correct in a_pairs and it.stem != it.correct
        foils = [c for j, c in enumerate(it.choices) if j != it.answer]
        assert not any(f in a_pairs or f in set(tasks[1].pairs) for f in foils)  # never the same class
    assert analogies_from_relations(tasks, 2, 4, seed=1) == items  # seeded


def test_fit_combiner_early_stops_and_keeps_best(llama, labelled_bank):
    from fv_remote.relational.analogy import check_items, relation_profile
    from fv_remote.relational.combiner_fit import choose_scale, choose_softmax, cfv_hits, fit_combiner

    _, bank, _ = labelled_bank
    s = AnalogySettings(n_boot=10)
    kept, _ = check_items(llama.tokenizer, read_mc_analogies(FIX / "mc.jsonl"), s)
    logp = relation_profile(llama, bank, [it.stem for it in kept], s)
    sel = choose_softmax(llama, bank, kept, logp, s, temperatures=(0.5, 2.0), scales=(1.0, 3.0))
    assert set(sel.grid) == {"T=0.5,scale=1", "T=0.5,scale=3", "T=2,scale=1", "T=2,scale=3"}
    assert sel.grid[f"T={sel.temperature:g},scale={sel.scale:g}"] == max(sel.grid.values())
    # the one-shot + CFV selection scores the one-shot prompts, not the CFV-alone ones
    from dataclasses import replace

    from fv_remote.relational.analogy import cfv_weights

    both = choose_softmax(llama, bank, kept, logp, s, temperatures=(0.5,), scales=(1.0, 3.0), method="icl_qa+cfv")
    for sc in (1.0, 3.0):
        w05 = cfv_weights(logp, 0.5)
        assert both.grid[f"T=0.5,scale={sc:g}"] == cfv_hits(llama, bank, kept, w05, replace(s, scale=sc),
                                                             "icl_qa+cfv").mean()
    comb = fit_combiner(llama, bank, kept, logp, kept, logp, s, steps=12, lr=0.5, items_per_step=2, eval_every=2,
                        patience=1)
    hist = comb.meta["history"]
    assert hist[0]["step"] == 0 and hist[-1]["step"] <= 12
    best = comb.meta["best_step"]
    assert comb.meta["held_acc"] == max(h["held_acc"] for h in hist)
    if best == 0:  # nothing beat the identity start: the identity is what is kept
        assert torch.equal(comb.weight, torch.eye(len(bank)))
    # the kept checkpoint reproduces its recorded held-aside accuracy
    w = torch.softmax(comb.logits(logp), -1)
    assert cfv_hits(llama, bank, kept, w, s).mean() == pytest.approx(comb.meta["held_acc"])
    assert choose_scale(llama, bank, kept, w, s, scales=(1.0, 2.0)).scale in (1.0, 2.0)


def test_pick_keeps_the_named_public_relations():
    from fv_remote.data.sources import pick

    sem = semeval_relations(FIXTURES / "semeval_mini")
    assert [t.name for t in pick(sem, ["semeval2012:2c"]).tasks] == ["semeval2012:2c"]
    with pytest.raises(UserError, match="no relation 'todd:antonym'"):
        pick(sem, ["semeval2012:1a", "todd:antonym"])


def test_bank_build_public_refusals(tmp_path):
    from typer.testing import CliRunner

    from fv_remote.cli.app import _register, app

    _register()

    def error(*args: str) -> str:
        res = CliRunner().invoke(app, ["bank", "build", "--out", str(tmp_path / "b.safetensors"), *args])
        assert isinstance(res.exception, UserError), res.output
        return str(res.exception)

    assert "needs --data-root" in error("--preset", "public")
    assert "missing" in error("--preset", "public", "--data-root", str(tmp_path))
    assert "without --data or --remote" in error("--semeval", str(tmp_path), "--data", "x.json")
    picked = error("--semeval", str(FIXTURES / "semeval_mini"), "--tasks", "semeval2012:1b")
    assert "--tasks: no relation 'semeval2012:1b'" in picked and "did you mean 'semeval2012:1a'" in picked
    assert "goes with --preset" in error("--data-root", str(tmp_path))


def test_shared_prompt_scoring_equals_one_call_per_variant(llama, labelled_bank):
    """Several (weights, scale) variants on one prompt kind score as one `cfv_hits` call each, while the prompts
    run once (counted by a forward hook: K variants add K last-token rows, not K prompt forwards)."""
    from dataclasses import replace

    from fv_remote.relational.analogy import check_items, relation_profile
    from fv_remote.relational.analogy_scoring import first_token, first_token_logprobs, first_token_logprobs_shared
    from fv_remote.relational.combiner_fit import cfv_hits, choice_hits_shared

    _, bank, _ = labelled_bank
    s = AnalogySettings(n_boot=10, batch_size=5)
    kept, _ = check_items(llama.tokenizer, read_mc_analogies(FIX / "mc.jsonl"), s)
    logp = relation_profile(llama, bank, [it.stem for it in kept], s)
    sharp, flat = torch.softmax(logp / 0.25, -1), torch.softmax(logp / 4.0, -1)
    variants = [(sharp, 1.0), (flat, 3.0), (sharp, 8.0)]
    for method in ("cfv", "icl_qa+cfv"):
        shared = choice_hits_shared(llama, bank, kept, method, variants, s)
        for (w, sc), hits in zip(variants, shared):
            assert (hits == cfv_hits(llama, bank, kept, w, replace(s, scale=sc), method)).all()
    # the log-probs themselves, and no vector at all
    prompts = [s.template.query_text(c) for it in kept for c, _ in it.choices]
    answers = [d for it in kept for _, d in it.choices]
    targets = [first_token(llama.tokenizer, p, s.template.answer_text(d)) for p, d in zip(prompts, answers)]
    mix = torch.eye(len(bank))[torch.arange(len(prompts)) % len(bank)]
    seen = []
    hook = llama.hf.register_forward_hook(lambda m, a, k, o: seen.append(k["input_ids"].shape), with_kwargs=True)
    try:
        got = first_token_logprobs_shared(llama, prompts, targets, [(None, 1.0), (mix, 2.0)], bank, batch_size=5)
    finally:
        hook.remove()
    # each batch's distinct prompts ran whole once; then one last-token row per prompt and variant
    assert sum(sh[0] for sh in seen if sh[1] > 1) == sum(len(set(prompts[i:i + 5])) for i in range(0, len(prompts), 5))
    assert sum(sh[0] for sh in seen if sh[1] == 1) == 2 * len(prompts)
    assert torch.allclose(got[0], first_token_logprobs(llama, prompts, targets, None, bank, 1.0, 5), atol=1e-5)
    assert torch.allclose(got[1], first_token_logprobs(llama, prompts, targets, mix, bank, 2.0, 5), atol=1e-5)
