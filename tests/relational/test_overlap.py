"""Train/test overlap (`fv_remote.relational.overlap`): pair hashes, records in FFVs and bank entries, the overlap
count and `--exclude-trained` in `align` and `analogy` (tiny random model)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from support.bank_fixtures import tiny_bank_fixtures
from fv_remote.core.errors import UserError
from fv_remote.data import MCAnalogy, load_task
from fv_remote.data.tasks import prepare_task
from fv_remote.relational import overlap as ov
from fv_remote.relational.align import RatingRow, align, similarities
from fv_remote.relational.analogy import (AnalogySettings, analogy_overlap, item_pairs, run_analogies, subset,
                                          without_trained)
from fv_remote.relational.bank import BankEntry, RelationBank, info
from fv_remote.relational.ffv import FinetuneSettings, examples, finetune, train_ffv
from fv_remote.fv.vectors import FunctionVector

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "relational"


def _entry(name: str, train=(), valid=(), d: int = 64) -> BankEntry:
    meta = {} if train is None else {ov.META_KEY: ov.record(train, valid)}
    return BankEntry(name, torch.randn(d, generator=torch.Generator().manual_seed(len(name))), 1, meta)


# --- the module: known answers ----------------------------------------------------------------------------------


def test_pair_hash_is_sha256_of_the_normalised_tab_string():
    assert ov.pair_hash("hot", "cold") == hashlib.sha256(b"hot\tcold").hexdigest()[:16]
    # case, outer and inner whitespace, Unicode compatibility forms: one pair
    assert ov.pair_hash("  HOT ", "Cold\n") == ov.pair_hash("hot", "cold")
    assert ov.pair_hash("ice  cream", "dessert") == ov.pair_hash("Ice cream", " DESSERT")
    assert ov.pair_hash("ｈｏｔ", "cold") == ov.pair_hash("hot", "cold")  # NFKC: full-width letters
    # different words, or the words swapped, are different hashes: the record keeps the trained order
    assert ov.pair_hash("hot", "cold") != ov.pair_hash("cold", "hot")
    assert ov.pair_hash("hot", "cold") != ov.pair_hash("hot", "colder")
    assert ov.pair_hash("a b", "c") != ov.pair_hash("a", "b c")  # the tab keeps the word boundary
    assert ov.normalise(" Ice\t Cream ") == "ice cream"


def test_record_round_trips_and_refuses_damage():
    rec = ov.record([("hot", "cold"), ("up", "down")], [("big", "small")])
    assert rec["scheme"] == ov.SCHEME and len(rec["train"]) == 2 and len(rec["valid"]) == 1
    back = ov.trained_hashes(json.loads(json.dumps({ov.META_KEY: rec})))
    assert back == {ov.pair_hash("hot", "cold"), ov.pair_hash("up", "down"), ov.pair_hash("big", "small")}
    assert ov.trained_hashes({}) is None and ov.trained_hashes(None) is None  # no record: unknown, not empty
    assert ov.n_recorded({ov.META_KEY: rec}) == 3 and ov.n_recorded({}) is None
    with pytest.raises(UserError, match="scheme 'md5'"):
        ov.trained_hashes({ov.META_KEY: {**rec, "scheme": "md5"}}, "x")
    with pytest.raises(UserError, match="bank entry 'x'.*damaged"):
        ov.trained_hashes({ov.META_KEY: {**rec, "train": ["not hex at all!"]}}, "x")


def test_overlap_counts_on_a_hand_made_bank():
    bank = RelationBank("m", [_entry("antonym", [("hot", "cold"), ("up", "down")], [("big", "small")]),
                              _entry("capital", [("France", "Paris")]),
                              _entry("old", None)])  # built before the record
    items = [
        [("HOT", " cold ")],                      # 0: antonym (case, spaces)
        [("down", "up")],                         # 1: antonym, reversed pair (either order counts)
        [("small", "big"), ("paris", "france")],  # 2: antonym (a validation pair) and capital
        [("hot", "warm"), ("cold", "hot dog")],   # 3: shares words but no pair
        [],                                       # 4: nothing
    ]
    found = ov.find_overlap(bank, items)
    assert found.hits == [[0], [0], [0, 1], [], []]
    assert found.n_items == 5 and found.n_overlapping == 3 and found.status == "partial"
    assert found.unknown == ["old"] and found.entries() == {"antonym": 3, "capital": 1}
    assert found.mask().tolist() == [[True, False, False], [True, False, False], [True, True, False],
                                     [False, False, False], [False, False, False]]
    data = found.as_json()
    assert data["n_overlapping"] == 3 and data["n_entries_involved"] == 2 and data["unknown_entries"] == ["old"]
    assert data["status"] == "partial" and data["pair_order"] == "either"
    line = found.describe("rows")
    assert "at least 3 of 5 rows" in line and "2 of 3 bank entries" in line and "unknown overlap): old" in line
    # every entry recorded: an exact count; none recorded: unknown (None), not 0
    known = ov.find_overlap(RelationBank("m", bank.entries[:2]), items)
    assert known.status == "known" and known.n_overlapping == 3 and "at least" not in known.describe()
    unknown = ov.find_overlap(RelationBank("m", [bank.entries[2]]), items)
    assert unknown.status == "unknown" and unknown.n_overlapping is None and unknown.as_json()["n_overlapping"] is None
    assert "UNKNOWN" in unknown.describe()
    with pytest.raises(UserError, match="--exclude-trained: none of the bank's 1 entries records"):
        ov.require_known(unknown)
    ov.require_known(found)  # partial is enough to leave the known ones out


def test_examples_record_needs_every_pair():
    from fv_remote.relational.ffv_plan import Examples

    train = Examples(["Q: hot\nA:"], torch.tensor([1]), [("hot", "cold")])
    valid = Examples(["Q: up\nA:"], torch.tensor([2]), [("up", "down")])
    assert ov.examples_record(train, valid) == ov.record([("hot", "cold")], [("up", "down")])
    assert ov.examples_record(train, None) == ov.record([("hot", "cold")])
    assert ov.examples_record(Examples(["Q: hot\nA:"], torch.tensor([1])), None) is None  # prompts by hand


def test_masked_similarities_leave_entries_out():
    bank = RelationBank("m", [_entry(n, []) for n in "abc"])
    logp1, logp2 = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -0.5, -9.0]])
    leave = torch.tensor([[False, False, True]])
    two = RelationBank("m", bank.entries[:2])
    for method in ("weights", "logp", "bank", "cfv"):  # leaving c out = a bank of a and b
        got = similarities(bank, logp1, logp2, method, exclude=leave)
        want = similarities(two, logp1[:, :2], logp2[:, :2], method)
        assert torch.allclose(got, want, atol=1e-6), method


# --- records written by fine-tuning and bank builds ---------------------------------------------------------------


llama, bank_path, bank = tiny_bank_fixtures()


def test_bank_entries_record_their_training_and_validation_pairs(llama, bank):
    sizes = []
    for name in ("opposites", "echo"):
        prepared = prepare_task(llama.tokenizer, load_task(FIX / f"{name}.json"), seed=0, min_pairs=8)
        want = ov.record(prepared.splits.train[:6], prepared.splits.valid[:4])
        rec = bank.get(name).meta[ov.META_KEY]
        assert rec == want and len(rec["train"]) == 6 and len(rec["valid"]) == len(prepared.splits.valid[:4])
        assert bank.function_vector(name).meta[ov.META_KEY] == want  # the entry as an FFV keeps it
        sizes.append(6 + len(prepared.splits.valid[:4]))
    assert [row["trained_pairs"] for row in info(bank)["entries"]] == sizes


def test_ffv_files_record_their_pairs_and_old_ones_load(llama, tmp_path):
    prepared = prepare_task(llama.tokenizer, load_task(FIX / "opposites.json"), seed=0, min_pairs=8)
    s = FinetuneSettings(steps=2, lr=0.5, allow_unchanged=True)
    run = train_ffv(llama, prepared, init="zero", layer=1, n_train=5, n_valid=3, settings=s,
                    out=tmp_path / "o.ffv.safetensors")
    loaded = FunctionVector.load(tmp_path / "o.ffv.safetensors")
    want = ov.record(prepared.splits.train[:5], prepared.splits.valid[:3])
    assert run.result.ffv.meta[ov.META_KEY] == want and loaded.meta[ov.META_KEY] == want
    # the lower-level API records pairs when its Examples carry them
    train, valid = examples(prepared, "train", 5), examples(prepared, "valid", 3)
    result = finetune(llama, train, valid, torch.zeros(llama.adapter.d_model), 1, s)
    assert result.ffv.meta[ov.META_KEY] == want
    # an FFV from before the record joins a bank; its overlap is unknown, not 0
    old = FunctionVector(vector=loaded.vector, model=loaded.model, task="old", layer=1, kind="ffv",
                         meta={k: v for k, v in loaded.meta.items() if k != ov.META_KEY})
    old.save(tmp_path / "old.ffv.safetensors")
    bank = RelationBank(loaded.model)
    bank.add_vector(FunctionVector.load(tmp_path / "old.ffv.safetensors"))
    bank.add_vector(loaded, name="new")
    bank.save(tmp_path / "b.safetensors")
    back = RelationBank.load(tmp_path / "b.safetensors")
    found = ov.find_overlap(back, [[prepared.splits.train[0]]])
    assert found.unknown == ["old"] and found.hits == [[1]] and found.status == "partial"
    assert info(back)["entries"][0]["trained_pairs"] is None


def test_bank_job_file_without_the_record_still_commits(llama, tmp_path):
    """A bank job submitted before the record (its plan's entries lack it) commits entries without one."""
    from fv_remote.relational.bank_build import BANK, _bank_plan

    bank = RelationBank(llama.model_id)
    prepared = prepare_task(llama.tokenizer, load_task(FIX / "echo.json"), seed=0, min_pairs=8)
    task = load_task(FIX / "echo.json")
    plan = _bank_plan(llama, [(0, task, prepared, None)], tmp_path / "b.safetensors", False, bank, 1, "zero", 5, 3,
                      FinetuneSettings(steps=2, lr=0.5, allow_unchanged=True), 1, None)
    outputs = BANK.body(llama, plan)
    assert plan.entries[0]["trained_pairs"] is not None
    del plan.entries[0]["trained_pairs"]
    committed = BANK.commit(plan, outputs)
    assert ov.META_KEY not in committed.get("echo").meta


# --- align and analogy report the overlap and leave entries out ----------------------------------------------------


def _rows() -> list[RatingRow]:
    pairs = [(("hot", "cold"), ("up", "down"), 4.5), (("hot", "cold"), ("big", "big"), 1.0),
             (("up", "down"), ("fox", "fox"), 1.2), (("big", "small"), ("quick", "lazy"), 4.1),
             (("dog", "dog"), ("the", "the"), 3.9), (("hot", "hot"), ("big", "small"), 0.8),
             (("lazy", "quick"), ("down", "up"), 4.4), (("fox", "dog"), ("dog", "fox"), 3.0),
             (("quick", "lazy"), ("jumps", "over"), 2.5)]
    return [RatingRow(a, b, r, i + 2) for i, (a, b, r) in enumerate(pairs)]


def test_align_reports_overlap_and_exclusion_changes_the_bank(llama, bank):
    rows = _rows()
    trained = ov.trained_hashes(bank.get("opposites").meta, "opposites")
    assert trained is not None
    plain = align(llama, bank, rows, n_boot=50)
    expected = ov.find_overlap(bank, [(r.pair1, r.pair2) for r in rows])
    # seed 0's splits (see the analogy test): a reversed pair counts; the last row is in both entries' test splits
    assert expected.hits == [[0], [0], [0, 1], [0], [1], [0, 1], [0], [0], []]
    assert plain.overlap is not None and plain.overlap.hits == expected.hits
    assert plain.overlap.n_overlapping == sum(1 for h in expected.hits if h) > 0  # the fixture's pairs reuse them
    data = plain.as_json()
    assert data["overlap"]["n_overlapping"] == plain.overlap.n_overlapping and "excluded_trained" not in data
    out = align(llama, bank, rows, n_boot=50, exclude_trained=True)
    assert out.spearman == pytest.approx(plain.spearman)  # the first figure is unchanged
    ex, clean = out.excluded, out.clean
    assert ex is not None and clean is not None
    n_empty = sum(1 for h in expected.hits if len(h) == len(bank))
    assert ex["n_used"] == len(rows) - n_empty and ex["n_no_entry_left"] == n_empty
    assert clean["n_used"] == sum(1 for h in expected.hits if not h)
    # the exclusion is what changes the similarities: recompute them by hand for the rows with an entry left
    mask = expected.mask()
    left = [i for i in range(len(rows)) if not bool(mask[i].all())]
    from fv_remote.relational.analogy import relation_profile

    pairs = sorted({p for r in rows for p in (r.pair1, r.pair2)})
    prof = relation_profile(llama, bank, pairs)
    idx = {p: i for i, p in enumerate(pairs)}
    l1 = prof[[idx[rows[i].pair1] for i in left]]
    l2 = prof[[idx[rows[i].pair2] for i in left]]
    masked = similarities(bank, l1, l2, "weights", exclude=mask[left])
    unmasked = similarities(bank, l1, l2, "weights")
    assert not torch.allclose(masked, unmasked)  # leaving entries out moved the similarities
    from fv_remote.relational.align import spearman

    assert ex["spearman"] == pytest.approx(spearman(masked.tolist(), [rows[i].rating for i in left]), nan_ok=True)
    json.dumps(out.as_json(), default=str)


def test_exclusion_refused_without_records(llama, bank):
    old = RelationBank(bank.model, [BankEntry(e.name, e.vector, e.layer, {k: v for k, v in e.meta.items()
                                                                           if k != ov.META_KEY})
                                    for e in bank.entries])
    res = align(llama, old, _rows(), n_boot=20)
    assert res.overlap is not None and res.overlap.status == "unknown" and res.as_json()["overlap"]["n_overlapping"] \
        is None
    with pytest.raises(UserError, match="none of the bank's 2 entries records"):
        align(llama, old, _rows(), n_boot=20, exclude_trained=True)


def test_analogy_overlap_and_per_item_exclusion(llama, bank):
    opp = ov.trained_hashes(bank.get("opposites").meta, "opposites")
    echo = ov.trained_hashes(bank.get("echo").meta, "echo")
    assert opp and echo
    items = [MCAnalogy(("hot", "cold"), [("up", "down"), ("up", "up")], 0, "a"),
             MCAnalogy(("quick", "lazy"), [("small", "big"), ("small", "small")], 0, "a"),
             MCAnalogy(("big", "big"), [("fox", "lazy"), ("fox", "fox")], 1, "b"),
             MCAnalogy(("dog", "the"), [("over", "brown"), ("over", "over")], 1, "b")]
    s = AnalogySettings(n_boot=50)
    res = run_analogies(llama, bank, items, s)
    found = analogy_overlap(bank, res)
    assert found.hits == ov.find_overlap(bank, [item_pairs(it) for it in res.items]).hits
    assert item_pairs(items[0]) == [("hot", "cold"), ("up", "down"), ("up", "up")]
    assert item_pairs(items[0], "generative") == [("hot", "cold"), ("up", "down")]
    # seed 0's splits: opposites trains on (cold, hot), (up, down), (small, big), ... and validates on (hot, cold);
    # echo on (up, up), (small, small), (fox, fox), ...; (quick, lazy), (dog, the), (over, *) are in neither
    assert found.hits == [[0, 1], [0, 1], [1], []] and found.n_overlapping == 3
    excluded, n_empty = without_trained(llama, bank, res, found)
    assert n_empty == 2 and excluded.n == res.n and excluded.items == res.items  # the same items, paired
    # the methods that do not read the bank keep their scores
    for m in ("no_vector", "icl", "icl_qa"):
        assert np.array_equal(excluded.correct[m], res.correct[m])
    # items 0 and 1 share a pair with both entries: no bank left, so the vector methods are the vector-free ones
    for i in (0, 1):
        assert excluded.weights[i].tolist() == [0.0, 0.0]
        assert excluded.correct["cfv"][i] == excluded.correct["best_ffv"][i] == res.correct["no_vector"][i]
        assert excluded.correct["icl_qa+cfv"][i] == res.correct["icl_qa"][i]
    assert excluded.weights[2].tolist() == [1.0, 0.0]  # item 2 without echo: all weight on opposites
    assert not torch.allclose(excluded.weights[2], res.weights[2])  # the exclusion changed the bank it used
    assert torch.equal(excluded.weights[3], res.weights[3])  # item 3 shares nothing: untouched
    assert torch.allclose(excluded.weights.sum(-1), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    # without no_vector among the methods, the empty items' fallback is scored for them
    cfv_only = run_analogies(llama, bank, items, s, methods=["cfv"])
    alone, _ = without_trained(llama, bank, cfv_only, found)
    assert np.array_equal(alone.correct["cfv"], excluded.correct["cfv"])
    clean = subset(res, [i for i, h in enumerate(found.hits) if not h])
    assert clean.n == 1 and clean.items == [res.items[3]]
    with pytest.raises(UserError, match="combiner"):
        from fv_remote.relational.combiner import Combiner

        run_analogies(llama, bank, items, s, combiner=Combiner.identity(bank.names),
                      exclude=torch.zeros(len(items), len(bank), dtype=torch.bool))


# --- through the CLI: the overlap line, both figures, the JSON, one-line errors -----------------------------------


def _flat(text: str) -> str:
    """The terminal's lines joined (rich wraps long lines at the terminal's width)."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    from support.cli_harness import invoke, save_tiny_model

    root = tmp_path_factory.mktemp("overlap_cli")
    folder = str(save_tiny_model(root / "tiny"))
    bank = root / "bank.safetensors"
    built = invoke("bank", "build", "--data", str(FIX / "opposites.json"), "--data", str(FIX / "echo.json"), "-m",
                   folder, "--out", str(bank), "--layer", "1", "--n-train", "6", "--n-valid", "4", "--steps", "2",
                   "--lr", "0.5", "--allow-unchanged")
    assert built.code == 0, built.describe()
    ratings = root / "ratings.csv"
    ratings.write_text("pair1_word1,pair1_word2,pair2_word1,pair2_word2,mean_rating\n" + "\n".join(
        f"{r.pair1[0]},{r.pair1[1]},{r.pair2[0]},{r.pair2[1]},{r.rating}" for r in _rows()) + "\n")
    return {"root": root, "folder": folder, "bank": str(bank), "ratings": str(ratings)}


def test_cli_align_prints_the_overlap_and_both_figures(cli_env, tmp_path):
    from support.cli_harness import invoke

    base = ("align", "--ratings", cli_env["ratings"], "--bank", cli_env["bank"], "-m", cli_env["folder"],
            "--n-boot", "20", "--plot", str(tmp_path / "a.png"))
    plain = invoke(*base, "--json", str(tmp_path / "plain.json"))
    assert plain.code == 0, plain.describe()
    assert "train/test overlap: 8 of 9 rows share a word pair (either order) with the training pairs of 2 of 2 bank " \
           "entries" in _flat(plain.stdout)
    assert "without the overlapping entries" not in _flat(plain.stdout)
    data = json.loads((tmp_path / "plain.json").read_text())
    assert data["overlap"]["n_overlapping"] == 8 and data["overlap"]["entries"] == {"opposites": 7, "echo": 3}
    ex = invoke(*base, "--exclude-trained", "--json", str(tmp_path / "ex.json"))
    assert ex.code == 0, ex.describe()
    assert "without the overlapping entries (left out per row): Spearman ρ" in _flat(ex.stdout)
    assert "2 rows shared a pair with every entry and are left out" in _flat(ex.stdout)
    assert "rows that share no pair with any entry's training pairs: Spearman ρ undefined on 1 rows" in _flat(ex.stdout)
    data = json.loads((tmp_path / "ex.json").read_text())
    assert data["excluded_trained"]["n_used"] == 7 and data["excluded_trained"]["n_no_entry_left"] == 2
    assert data["no_overlap_rows"]["n_used"] == 1 and data["no_overlap_rows"]["spearman"] is None  # NaN -> null
    assert data["spearman"] == json.loads((tmp_path / "plain.json").read_text())["spearman"]


def test_cli_analogy_prints_the_overlap_and_the_three_figures(cli_env, tmp_path):
    from support.cli_harness import invoke

    base = ("analogy", "--mc", str(FIX / "mc.jsonl"), "--bank", cli_env["bank"], "-m", cli_env["folder"],
            "--n-boot", "20")
    ex = invoke(*base, "--exclude-trained", "--json", str(tmp_path / "ex.json"))
    assert ex.code == 0, ex.describe()
    # mc.jsonl's 3 usable items: hot:cold (both entries), big:big (echo: (big, big) is not trained, (fox, fox) is),
    # quick:lazy (both, through its choices (small, big) and (small, small))
    assert "train/test overlap: 3 of 3 items share a word pair" in _flat(ex.stdout)
    assert "without overlapping" in _flat(ex.stdout) and "no-overlap items" in _flat(ex.stdout)
    data = json.loads((tmp_path / "ex.json").read_text())
    assert data["overlap"]["n_overlapping"] == 3 and data["overlap"]["status"] == "known"
    assert data["excluded_trained"]["n"] == data["n"] == 3 and data["excluded_trained"]["n_no_entry_left"] == 2
    assert data["no_overlap_items"]["n"] == 0


def test_cli_exclude_trained_errors_are_one_line(cli_env, tmp_path):
    from support.cli_harness import invoke, one_error_line

    old = RelationBank.load(cli_env["bank"])
    for e in old.entries:
        e.meta.pop(ov.META_KEY)
    old.save(tmp_path / "old.safetensors")
    plain = invoke("align", "--ratings", cli_env["ratings"], "--bank", str(tmp_path / "old.safetensors"), "-m",
                   cli_env["folder"], "--n-boot", "20", "--plot", str(tmp_path / "a.png"))
    assert plain.code == 0 and "train/test overlap: UNKNOWN" in _flat(plain.stdout), plain.describe()
    listed = invoke("bank", "info", str(tmp_path / "old.safetensors"))
    assert "pairs recorded" in _flat(listed.stdout) and "unknown" in listed.stdout, listed.describe()
    assert "unknown" not in invoke("bank", "info", cli_env["bank"]).stdout
    one_error_line(invoke("align", "--ratings", cli_env["ratings"], "--bank", str(tmp_path / "old.safetensors"), "-m",
                          cli_env["folder"], "--exclude-trained"), "--exclude-trained: none of the bank's 2 entries")
    one_error_line(invoke("analogy", "--mc", str(FIX / "mc.jsonl"), "--bank", str(tmp_path / "old.safetensors"),
                          "-m", cli_env["folder"], "--exclude-trained"), "records its training pairs")
    one_error_line(invoke("analogy", "--mc", str(FIX / "mc.jsonl"), "--bank", cli_env["bank"], "-m",
                          cli_env["folder"], "--exclude-trained", "--train-combiner", str(FIX / "mc.jsonl")),
                   "learned combiner")
    damaged = RelationBank.load(cli_env["bank"])
    damaged.entries[0].meta[ov.META_KEY]["train"][0] = "zz"
    damaged.save(tmp_path / "damaged.safetensors")
    one_error_line(invoke("align", "--ratings", cli_env["ratings"], "--bank", str(tmp_path / "damaged.safetensors"),
                          "-m", cli_env["folder"]), "bank entry 'opposites'", "damaged")


def test_the_session_body_leaves_the_same_entries_out(llama, bank):
    """The one-request body (`analogy_session`, here in nnsight's in-process dry run) masks like the local path."""
    from fv_remote.execution import DryRun

    items = [MCAnalogy(("big", "big"), [("fox", "lazy"), ("fox", "fox")], 1, "b"),
             MCAnalogy(("dog", "the"), [("over", "brown"), ("over", "over")], 1, "b")]
    leave = torch.tensor([[False, True], [False, False]])
    s = AnalogySettings(n_boot=10)
    local = run_analogies(llama, bank, items, s, methods=["cfv", "best_ffv"], exclude=leave)
    dry = run_analogies(llama.using(DryRun()), bank, items, s, methods=["cfv", "best_ffv"], exclude=leave)
    assert local.weights[0].tolist() == [1.0, 0.0]
    torch.testing.assert_close(dry.weights, local.weights, atol=1e-5, rtol=0)
    for m in ("cfv", "best_ffv"):
        assert np.array_equal(dry.correct[m], local.correct[m])
