"""Issue 26: no result that only looks like one, no path taken for what it is not, no silent defaults, no table
nobody can read. Each case ran through the real entry point (in this process, on a tiny random model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support.cli_harness import invoke, one_error_line, save_tiny_model

WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
PAIRS = [(a, b) for a in WORDS for b in WORDS if a < b][:40]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from fv_remote.relational.bank import BankEntry, RelationBank

    root = tmp_path_factory.mktemp("edges")
    folder = str(save_tiny_model(root / "tiny"))
    task = root / "toy.json"
    task.write_text(json.dumps([{"input": a, "output": b} for a, b in PAIRS]))
    other = root / "toy2.json"
    other.write_text(json.dumps([{"input": b, "output": a} for a, b in PAIRS]))
    gen = torch.Generator().manual_seed(0)
    bank = root / "bank.safetensors"
    RelationBank(folder, [BankEntry("toy", torch.randn(64, generator=gen), 1, {"category": "x"}),
                          BankEntry("other", torch.randn(64, generator=gen), 2, {})]).save(bank)
    from fv_remote.fv.vectors import FunctionVector

    fv = root / "toy.fv.safetensors"
    FunctionVector(torch.randn(64, generator=gen), model=folder, task=str(task), layer=1, heads=[]).save(fv)
    return {"root": root, "folder": folder, "task": str(task), "task2": str(other), "bank": str(bank),
            "fv": str(fv)}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- 1. a kept result equal to its initialisation ------------------------------------------------------------------

def _finetune(out: Path, *extra: str):
    """The issue's case: smollm2-135m from zeros with a learning rate far too large keeps step 0."""
    return invoke("finetune", "-t", "antonym", "-m", "smollm2-135m", "--init", "zero", "--layer", "9",
                  "--lr", "1e6", "--steps", "10", "--n-train", "8", "--n-valid", "8", "--no-evaluate", "-o", out,
                  *extra)


@pytest.mark.integration
def test_finetune_that_keeps_its_start_is_refused(tmp_path):
    out = tmp_path / "z.ffv.safetensors"
    line = one_error_line(_finetune(out), "starting vector", "--lr", "--allow-unchanged")
    assert "nothing was saved" in line
    assert _files(tmp_path) == []  # neither the FFV nor its loss curve


@pytest.mark.integration
def test_finetune_allow_unchanged_keeps_the_baseline_and_says_so(tmp_path):
    out = tmp_path / "z.ffv.safetensors"
    res = _finetune(out, "--allow-unchanged")
    assert res.code == 0, res.describe()
    assert out.is_file() and "its starting vector" in res.stdout
    from fv_remote.fv.vectors import FunctionVector

    ffv = FunctionVector.load(out)
    assert ffv.meta["unchanged"] is True and float(ffv.vector.abs().max()) == 0.0


def test_finetune_within_float_noise_of_its_start_is_refused(env, tmp_path):
    """A learning rate so small that the kept vector differs from the random start by float noise only."""
    res = invoke("finetune", "-t", env["task"], "-m", env["folder"], "--init", "random", "--layer", "1",
                 "--lr", "1e-7", "--steps", "4", "--n-train", "8", "--n-valid", "6", "--no-evaluate", "-o",
                 tmp_path / "z.ffv.safetensors")
    one_error_line(res, "starting vector", "--allow-unchanged")
    assert _files(tmp_path) == []


def test_bank_build_refuses_an_unchanged_entry_and_keeps_the_rest(env, tmp_path):
    out = tmp_path / "b.safetensors"
    common = ("bank", "build", "-m", env["folder"], "--layer", "1", "--steps", "4", "--n-train", "8", "--n-valid",
              "6", "--out", out)
    first = invoke(*common, "--data", env["task2"], "--lr", "0.5")
    assert first.code == 0, first.describe()
    res = invoke(*common, "--data", env["task2"], "--data", env["task"], "--lr", "1e-9")
    assert res.code == 0, res.describe()
    assert "toy: skipped" in res.stderr and "starting vector" in res.stderr and "--allow-unchanged" in res.stderr
    from fv_remote.relational.bank import RelationBank

    assert RelationBank.load(out).names == ["toy2"]  # the earlier entry kept, the refused one not added


def test_combiner_that_keeps_its_start_says_so():
    from fv_remote.core.unchanged import combiner_unchanged
    from fv_remote.relational.combiner import Combiner

    comb = Combiner.identity(["a", "b"])
    assert combiner_unchanged(comb)
    comb.weight = comb.weight + 0.1
    assert not combiner_unchanged(comb)


# --- 2. a path that is not what the command works on ------------------------------------------------------------------

@pytest.mark.parametrize("command", ["repair", "verify", "info"])
def test_store_commands_refuse_a_folder_that_is_not_a_store(tmp_path, command):
    plain = tmp_path / "notes"
    plain.mkdir()
    (plain / "readme.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    before = _files(tmp_path)
    one_error_line(invoke("store", command, plain), "not an activation store", "readme.txt")
    one_error_line(invoke("store", command, tmp_path / "empty"), "not an activation store", "empty folder")
    one_error_line(invoke("store", command, tmp_path / "nowhere.zarr"), "no activation store")
    one_error_line(invoke("store", command, plain / "readme.txt"), "is a file")
    assert _files(tmp_path) == before  # nothing created, nothing changed


def test_stages_refuse_a_folder_that_is_not_a_store(env, tmp_path):
    plain = tmp_path / "notes"
    plain.mkdir()
    (plain / "readme.txt").write_text("hello")
    before = _files(tmp_path)
    one_error_line(invoke("extract", "-t", env["task"], "-s", plain, "-m", env["folder"], "--n-prompts", "2"),
                   "not an activation store")
    one_error_line(invoke("cma", "-t", env["task"], "-s", plain, "-m", env["folder"]), "not an activation store")
    one_error_line(invoke("fit", "-t", env["task"], "-s", plain, "-m", env["folder"], "-o", tmp_path / "f.fv"),
                   "not an activation store")
    assert _files(tmp_path) == before


def test_wrong_kind_of_file_is_named(env, tmp_path):
    from fv_remote.relational.combiner import Combiner

    comb = tmp_path / "c.safetensors"
    Combiner.identity(["toy", "other"]).save(comb)
    one_error_line(invoke("steer", "--fv", env["bank"], "-m", env["folder"], "--prompt", "x"), "relation bank")
    one_error_line(invoke("steer", "--fv", comb, "-m", env["folder"], "--prompt", "x"), "combiner")
    one_error_line(invoke("steer", "--fv", tmp_path, "-m", env["folder"], "--prompt", "x"), "folder")
    one_error_line(invoke("bank", "info", comb), "combiner")
    one_error_line(invoke("import", env["bank"], "--out", tmp_path / "v.fv.safetensors"), "relation bank")
    # an output path holding another kind of file is not overwritten
    before = Path(env["bank"]).read_bytes()
    one_error_line(invoke("finetune", "-t", env["task"], "-m", env["folder"], "--init", "zero", "--layer", "1",
                          "--steps", "2", "--n-train", "4", "--n-valid", "0", "--no-evaluate", "-o", env["bank"]),
                   "relation bank")
    assert Path(env["bank"]).read_bytes() == before


def test_plan_lists_the_sizes_it_read_and_refuses_missing_ones(tmp_path):
    full = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3,
            "vocab_size": 320, "intermediate_size": 128, "num_key_value_heads": 2, "max_position_embeddings": 512}
    good = tmp_path / "good.json"
    good.write_text(json.dumps(full))
    res = invoke("plan", "--stage", "cma", "--config", good, "--n-prompts", "2")
    assert res.code == 0, res.describe()
    assert "read from the config" in res.stdout and "hidden_size 64" in res.stdout
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({k: v for k, v in full.items() if k not in ("hidden_size", "intermediate_size")}))
    line = one_error_line(invoke("plan", "--stage", "cma", "--config", partial), "hidden_size", "intermediate_size",
                          "--assume-defaults")
    assert "missing" in line
    res = invoke("plan", "--stage", "cma", "--config", partial, "--assume-defaults", "--n-prompts", "2")
    assert res.code == 0, res.describe()
    assert "assumed hidden_size 4096" in res.stdout and "assumed intermediate_size 11008" in res.stdout


# --- 4. grouped results only when they mean something ---------------------------------------------------------------

def _per_item_prefix(tmp_path: Path, n: int = 6) -> Path:
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps({"stem": [a, b], "choice": [[c, d], [d, c]], "answer": 0,
                                          "prefix": f"item-{i}"})
                              for i, (a, b, c, d) in enumerate(zip(WORDS, WORDS[1:], WORDS[2:], WORDS[3:n + 3]))))
    return path


def test_analogy_per_item_prefix_prints_no_group_table(env, tmp_path):
    res = invoke("analogy", "--mc", _per_item_prefix(tmp_path), "--bank", env["bank"], "-m", env["folder"],
                 "--n-boot", "20", "--json", tmp_path / "a.json")
    assert res.code == 0, res.describe()
    assert "accuracy by" not in res.stdout and "item-3" not in res.stdout
    assert "--group-by relation" in res.stderr  # the note says why there is no table and how to ask for one
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["by_group"] is None and data["group_by"] is None


def test_analogy_group_by_pools_tiny_groups_and_gives_one_item_groups_no_interval(env, tmp_path):
    mc = _per_item_prefix(tmp_path)
    res = invoke("analogy", "--mc", mc, "--bank", env["bank"], "-m", env["folder"], "--n-boot", "20",
                 "--group-by", "relation", "--json", tmp_path / "a.json")
    assert res.code == 0, res.describe()
    assert "item-3" not in res.stdout and "other" in res.stdout and "pooled" in res.stdout
    data = json.loads((tmp_path / "a.json").read_text())
    assert list(data["by_group"]) == ["other"] and data["by_group"]["other"]["n"] == 6
    res = invoke("analogy", "--mc", mc, "--bank", env["bank"], "-m", env["folder"], "--n-boot", "20",
                 "--group-by", "relation", "--min-group", "1", "--json", tmp_path / "b.json")
    assert res.code == 0, res.describe()
    groups = json.loads((tmp_path / "b.json").read_text())["by_group"]
    assert len(groups) == 6 and all(g["n"] == 1 and g["ci95"] is None for g in groups.values())
    assert "[1.00, 1.00]" not in res.stdout and "[0.00, 0.00]" not in res.stdout


# --- 5. the same patterns elsewhere -----------------------------------------------------------------------------------

@pytest.mark.parametrize("lr", ["1e-30", "inf"])
def test_graft_train_refuses_a_model_training_left_unchanged_or_broke(env, tmp_path, lr):
    out = tmp_path / "g"
    res = invoke("graft", "train", "-m", env["folder"], "--out", out, "--n-subjects", "2", "--epochs", "1",
                 "--lr", lr)
    one_error_line(res, "--lr")
    assert not out.exists()


def test_kind_of_names_what_a_path_is(env, tmp_path):
    from fv_remote.core.kinds import kind_of
    from fv_remote.relational.combiner import Combiner

    Combiner.identity(["a"]).save(tmp_path / "c.safetensors")
    (tmp_path / "n.txt").write_text("hello")
    (tmp_path / "e.json").write_text("{}")
    assert kind_of(env["bank"]) == "bank" and kind_of(tmp_path / "c.safetensors") == "combiner"
    assert kind_of(tmp_path / "n.txt") == "text" and kind_of(tmp_path / "e.json") == "json"
    assert kind_of(env["folder"]) == "model" and kind_of(tmp_path / "none") == "missing"
    assert kind_of(tmp_path) == "folder"


def test_finetune_negative_layer_is_refused_not_a_traceback(env, tmp_path):
    """Found by the fuzz: --layer -1 reached the session body, where -1 means "the layer search's best"."""
    res = invoke("finetune", "-t", env["task"], "-m", env["folder"], "--init", "zero", "--layer", "-1",
                 "--steps", "2", "--n-train", "6", "--n-valid", "4", "--no-evaluate", "-o", tmp_path / "f.ffv")
    one_error_line(res, "layer -1")
    assert _files(tmp_path) == []


def test_export_and_plan_refuse_numbers_that_do_not_fit(env, tmp_path):
    """Found by the fuzz: export --scale 1e308 (float32 in the GGUF) and plan --memory-gb inf were tracebacks."""
    one_error_line(invoke("export", "--fv", env["fv"], "-m", env["folder"], "--scale", "1e308", "--out",
                          tmp_path / "x.gguf"), "--scale")
    one_error_line(invoke("plan", "--stage", "cma", "--memory-gb", "inf"), "--memory-gb")
    one_error_line(invoke("plan", "--stage", "cma", "--tflops", "nan"), "--tflops")
    assert _files(tmp_path) == []


def test_zero_vector_is_refused_by_decode_and_noted_by_steer(env, tmp_path):
    from fv_remote.fv.vectors import FunctionVector

    zero = FunctionVector(torch.zeros(64), model=env["folder"], task="toy", layer=1, heads=[], kind="ffv",
                          meta={"unchanged": True}).save(tmp_path / "z.ffv.safetensors")
    one_error_line(invoke("decode", zero, "-m", env["folder"], "--top-k", "3"), "all zeros")
    res = invoke("steer", "--fv", zero, "-m", env["folder"], "--prompt", "Q: hot\nA:")
    assert res.code == 0 and "all zeros" in res.stderr, res.describe()


def test_no_wait_bank_fetch_reports_an_unchanged_relation_and_writes_the_rest(tmp_path):
    """`jobs fetch` of a bank job: one relation kept its start (step 0), the other trained; the first is said, the
    second written (before: a refused relation stopped the whole fetch)."""
    from fv_remote.execution.stage import plan_from_json
    from fv_remote.relational.bank import RelationBank
    from fv_remote.relational.bank_build import BANK, BankPlan
    from fv_remote.relational.ffv import FinetuneSettings

    def out(kept: float, best_step: int) -> dict:
        return {"layer": 1, "vector": torch.full((8,), kept), "history": {"step": [1, 2], "train_loss": [1.0, 0.9],
                "lr": [0.1, 0.1], "eval_step": [0, 2], "valid_loss": [1.0, 1.1], "valid_acc": [0.0, 0.0]},
                "best_step": best_step, "best_loss": 1.0, "best_acc": 0.0, "stopped": False, "init_norm": 0.0,
                "baseline_acc": 0.0, "moved": 1.0, "kept_moved": float(torch.full((8,), kept).norm())}

    entry = {"category": "", "relation_words": [], "source": "", "labels": {}, "source_fv": None, "n_train": 4,
             "n_valid": 2, "n_batches": 1}
    path = tmp_path / "b.safetensors"
    plan = plan_from_json(BankPlan, {  # as a fetched job reads it back from its job file
        "path": str(path), "model": "m", "resume": False, "bank_settings": {}, "init": "zero",
        "settings": FinetuneSettings().as_dict(), "n_tasks": 2, "n_jobs": 2,
        "entries": [{**entry, "name": "same", "index": 0}, {**entry, "name": "moved", "index": 1}]})
    outputs = BANK.outputs_from_saved(plan, {"results": [out(0.0, 0), out(0.5, 2)]})
    bank = BANK.commit(plan, outputs)
    message = BANK.summary(plan, bank)
    assert RelationBank.load(path).names == ["moved"]
    assert "same: skipped" in message and "starting vector" in message
