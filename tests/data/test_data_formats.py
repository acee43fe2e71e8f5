import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import pytest

from fv_remote.data import (
    MCAnalogy,
    RelationTask,
    list_tasks,
    load_task,
    read_analogy_csv,
    read_bats_pairs,
    read_mc_analogies,
    read_relation_json,
    read_semeval2012,
    read_semeval2012_ratings,
    read_task_json,
    read_todd_json,
)
from fv_remote.core.errors import UserError

FIX = Path(__file__).resolve().parents[1] / "fixtures"
# The public datasets live beside the checkout (../shared/data); a clone elsewhere names them with FV_REMOTE_SHARED_DATA.
SHARED = Path(os.environ.get("FV_REMOTE_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def error_of(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    return str(info.value)


# --- Todd JSON ----------------------------------------------------------------------------------------------


def test_todd_json_parses_and_strips():
    task = read_todd_json(FIX / "todd_small.json")
    assert isinstance(task, RelationTask)
    assert task.name == "todd_small"
    assert len(task.pairs) == 12
    assert task.pairs[0] == ("big", "small")
    assert task.pairs[1] == ("wet", "dry")  # " wet " stripped
    assert task.source.endswith("todd_small.json")


def test_todd_syntax_error_names_file_and_line():
    msg = error_of(read_todd_json, FIX / "todd_bad_syntax.json")
    assert "todd_bad_syntax.json:4:" in msg
    assert "invalid JSON" in msg


def test_todd_missing_key_names_line_of_element():
    msg = error_of(read_todd_json, FIX / "todd_missing_key.json")
    assert "todd_missing_key.json:6:" in msg  # the second object opens on line 6
    assert "element 1" in msg and "output" in msg


def test_todd_empty_and_missing_files():
    assert "dataset is empty" in error_of(read_todd_json, FIX / "todd_empty.json")
    assert "file is empty" in error_of(read_todd_json, FIX / "empty.json")
    assert "no such file" in error_of(read_todd_json, FIX / "nope.json")


def test_todd_non_string_value(tmp_path):
    path = tmp_path / "numbers.json"
    path.write_text('[\n  {"input": "one", "output": "1"},\n  {"input": "two", "output": 2}\n]\n')
    msg = error_of(read_todd_json, path)
    assert "numbers.json:3:" in msg and "must be a string" in msg


def test_todd_top_level_not_a_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"input": "a", "output": "b"}')
    assert "expected a JSON list" in error_of(read_todd_json, path)


# --- bundled format and auto-detection ----------------------------------------------------------------------


def test_relation_json_fields():
    task = read_relation_json(FIX / "relation_small.json")
    assert task.name == "opposites-mini"
    assert task.category == "lexical"
    assert task.description == "a word and its opposite"
    assert task.relation_words == ("opposite", "antonym")
    assert task.pairs == [("big", "small"), ("wet", "dry"), ("loud", "quiet"), ("early", "late")]


def test_relation_json_bad_pair_line():
    msg = error_of(read_relation_json, FIX / "relation_bad_pair.json")
    assert "relation_bad_pair.json:5:" in msg and "pairs[1]" in msg


def test_read_task_json_detects_format():
    assert read_task_json(FIX / "todd_small.json").category == "todd"
    assert read_task_json(FIX / "relation_small.json").name == "opposites-mini"


def test_load_task_from_path_and_data_dir(tmp_path):
    assert len(load_task(str(FIX / "todd_small.json")).pairs) == 12
    assert load_task(str(FIX / "relation_small.json")).category == "lexical"
    # DATA_DIR/NAME.json and one level deeper (Todd's abstractive/ and extractive/)
    (tmp_path / "abstractive").mkdir()
    (tmp_path / "abstractive" / "opp.json").write_text((FIX / "todd_small.json").read_text())
    task = load_task("opp", data_dir=tmp_path)
    assert task.name == "opp" and len(task.pairs) == 12


def test_load_task_unknown_names():
    msg = error_of(load_task, "definitely-not-a-task")
    assert "definitely-not-a-task" in msg and "fv-remote data list" in msg
    msg = error_of(load_task, "todd_smal", FIX)
    assert "did you mean 'todd_small'" in msg
    assert "no such file" in error_of(load_task, "missing/file.json")


def test_bundled_tasks_load():
    names = list_tasks()
    assert names == sorted(names)
    for name in names:
        task = load_task(name)
        assert task.pairs, name
        assert task.source == f"bundled:{name}"
        assert all(isinstance(x, str) and isinstance(y, str) and x and y for x, y in task.pairs)
    if names:
        assert "did you mean" in error_of(load_task, names[0] + "x")


# --- BATS ---------------------------------------------------------------------------------------------------


def test_bats_pairs_fixture():
    tasks = read_bats_pairs(FIX / "bats_pairs.json")
    assert list(tasks) == ["I01 [noun - plural_reg]", "E01 [country - capital]", "X [odd one]"]
    plural = tasks["I01 [noun - plural_reg]"]
    assert plural.pairs == [("cat", "cats"), ("dog", "dogs"), ("car", "cars")]
    assert plural.category == "inflectional morphology"
    assert plural.description == "noun - plural_reg"
    assert tasks["E01 [country - capital]"].category == "encyclopedic semantics"
    assert tasks["X [odd one]"].category == "bats"


def test_bats_bad_pair_line():
    msg = error_of(read_bats_pairs, FIX / "bats_bad_pair.json")
    assert "bats_bad_pair.json:4:" in msg and "2 strings" in msg


# --- multiple-choice analogies ------------------------------------------------------------------------------


def test_mc_jsonl():
    items = read_mc_analogies(FIX / "mc.jsonl")
    assert len(items) == 3  # the blank line is skipped
    first = items[0]
    assert isinstance(first, MCAnalogy)
    assert first.stem == ("cat", "cats")
    assert first.choices == [("dog", "dogs"), ("dog", "cat"), ("red", "blue")]
    assert first.answer == 0 and first.correct == ("dog", "dogs")
    assert first.relation == "I01 [noun - plural_reg]"
    assert items[1].relation == "capital-world" and items[1].correct == ("lima", "peru")
    assert items[2].relation == ""


@pytest.mark.parametrize(
    "name, line, words",
    [
        ("mc_bad_answer.jsonl", 2, "answer"),
        ("mc_bad_json.jsonl", 3, "invalid JSON"),
        ("mc_bad_arity.jsonl", 1, "stem"),
    ],
)
def test_mc_errors(name, line, words):
    msg = error_of(read_mc_analogies, FIX / name)
    assert f"{name}:{line}:" in msg and words in msg


def test_mc_missing_key(tmp_path):
    path = tmp_path / "nokey.jsonl"
    path.write_text('{"stem": ["a", "b"], "answer": 0}\n')
    assert "nokey.jsonl:1:" in error_of(read_mc_analogies, path)


def test_analogy_csv():
    with_header = read_analogy_csv(FIX / "analogies.csv")
    assert [a.stem for a in with_header] == [("hot", "cold"), ("cat", "kitten")]
    assert with_header[0].choices == [("up", "down"), ("up", "sideways")]
    assert all(a.answer == 0 for a in with_header)
    no_header = read_analogy_csv(FIX / "analogies_noheader.csv")
    assert len(no_header) == 2
    assert no_header[1].stem == ("new york", "city")


def test_analogy_csv_wrong_arity():
    msg = error_of(read_analogy_csv, FIX / "analogies_bad.csv")
    assert "analogies_bad.csv:3:" in msg and "5 columns" in msg


# --- SemEval-2012 -------------------------------------------------------------------------------------------


def test_semeval_mini():
    tasks = read_semeval2012(FIX / "semeval_mini")
    assert set(tasks) == {"1a", "2c"}
    taxonomic = tasks["1a"]
    assert taxonomic.category == "CLASS-INCLUSION"
    assert taxonomic.description == "Taxonomic: Y is a kind of X"
    # paradigms first (odd separators handled), then positively rated pairs not already present
    assert taxonomic.pairs == [("fruit", "pear"), ("tool", "saw"), ("metal", "tin"), ("bird", "sparrow")]
    assert tasks["2c"].pairs == [("bread", "slice"), ("rope", "strand"), ("cake", "crumb"), ("pizza", "slice")]
    only_paradigms = read_semeval2012(FIX / "semeval_mini", min_score=None)
    assert len(only_paradigms["1a"].pairs) == 3


def test_semeval_ratings_mini():
    ratings = read_semeval2012_ratings(FIX / "semeval_mini")
    assert ratings["1a"] == [("bird", "sparrow", 40.0), ("fruit", "pear", 12.5), ("sparrow", "bird", -30.0)]
    assert ratings["2c"] == [("pizza", "slice", 22.0), ("slice", "pizza", -8.0)]


def test_semeval_errors(tmp_path):
    assert "subcategories-paradigms.txt" in error_of(read_semeval2012, tmp_path)
    gold = tmp_path / "SemEval-2012-Gold-Ratings" / "Training"
    gold.mkdir(parents=True)
    (gold / "GoldRatings-1a.txt").write_text('# header\n 10.0 "a:b"\n 5.0 a-b\n')
    msg = error_of(read_semeval2012_ratings, tmp_path)
    assert "GoldRatings-1a.txt:3:" in msg


# --- the real public data, when ../shared is present -----------------------------------------------------


def test_shared_todd_counts():
    root = shared("todd_fv", "abstractive")
    assert len(read_todd_json(root / "antonym.json").pairs) == 2398
    capitals = read_todd_json(root / "country-capital.json")
    assert len(capitals.pairs) == 197 and capitals.name == "country-capital"
    assert len(load_task("present-past", data_dir=root.parent).pairs) == 293


def test_shared_bats():
    tasks = read_bats_pairs(shared("bats", "pairs_by_relation.json"))
    assert len(tasks) == 40
    assert {t.category for t in tasks.values()} == {
        "inflectional morphology",
        "derivational morphology",
        "encyclopedic semantics",
        "lexicographic semantics",
    }
    assert all(len(t.pairs) >= 40 for t in tasks.values())


@pytest.mark.parametrize("name", ["bats_test.jsonl", "bats_valid.jsonl", "google_test.jsonl", "google_valid.jsonl"])
def test_shared_mc_analogies(name):
    path = shared("bats", name)
    items = read_mc_analogies(path)
    n_lines = sum(1 for line in path.read_text().splitlines() if line.strip())
    assert len(items) == n_lines
    assert all(0 <= a.answer < len(a.choices) for a in items)
    assert all(a.relation for a in items)
    raw = json.loads(path.read_text().splitlines()[0])
    assert items[0].correct == tuple(raw["choice"][raw["answer"]])


def test_shared_semeval():
    root = shared("semeval2012_task2")
    tasks = read_semeval2012(root)
    assert len(tasks) == 79
    assert tasks["1a"].pairs[:3] == [("flower", "tulip"), ("emotion", "rage"), ("poem", "sonnet")]
    assert all(len(t.pairs) >= 3 for t in tasks.values())
    ratings = read_semeval2012_ratings(root)
    assert len(ratings) == 79
    assert all(r[0][2] >= r[-1][2] for r in ratings.values())  # best first


def test_list_and_load_bundled_with_stand_in_folder(tmp_path, monkeypatch):
    # The real bundled folder is filled by another module; check the lookup itself on a stand-in.
    import fv_remote.data as data

    (tmp_path / "opposites-mini.json").write_text((FIX / "relation_small.json").read_text())
    (tmp_path / "notes.txt").write_text("not a task")
    monkeypatch.setattr(data, "_bundled", lambda: tmp_path)
    assert data.list_tasks() == ["opposites-mini"]
    task = data.load_task("opposites-mini")
    assert task.source == "bundled:opposites-mini" and task.relation_words == ("opposite", "antonym")
    assert "did you mean 'opposites-mini'" in error_of(data.load_task, "opposites-mini2")
