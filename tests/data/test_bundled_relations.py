"""Sanity checks for the bundled word-pair relation datasets.

Loads the JSON files directly (no project imports, no model) so the test runs
even before the loader code exists.
"""

import json
from pathlib import Path

import pytest

RELATIONS_DIR = Path(__file__).resolve().parents[2] / "fv_remote" / "data" / "relations"
ALLOWED_CATEGORIES = {"lexical", "morphology", "encyclopedic", "translation", "format"}
REQUIRED_KEYS = {"name", "category", "description", "relation_words", "pairs"}
MIN_FILES = 30
MIN_PAIRS = 50

FILES = sorted(RELATIONS_DIR.glob("*.json"))


def _load(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _clean_string(s) -> bool:
    return isinstance(s, str) and s != "" and s == s.strip()


def test_enough_relation_files():
    assert RELATIONS_DIR.is_dir(), f"missing {RELATIONS_DIR}"
    assert len(FILES) >= MIN_FILES, f"only {len(FILES)} relation files in {RELATIONS_DIR}"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_relation_file(path: Path):
    data = _load(path)
    assert isinstance(data, dict)
    missing = REQUIRED_KEYS - data.keys()
    assert not missing, f"{path.name}: missing keys {sorted(missing)}"

    assert data["name"] == path.stem
    assert data["category"] in ALLOWED_CATEGORIES, data["category"]
    assert _clean_string(data["description"])

    words = data["relation_words"]
    assert isinstance(words, list) and 1 <= len(words) <= 4, words
    assert all(_clean_string(w) for w in words), words

    pairs = data["pairs"]
    assert isinstance(pairs, list)
    assert len(pairs) >= MIN_PAIRS, f"{path.name}: only {len(pairs)} pairs"

    seen = set()
    for pair in pairs:
        assert isinstance(pair, list) and len(pair) == 2, f"{path.name}: bad pair {pair!r}"
        assert all(_clean_string(x) for x in pair), f"{path.name}: bad strings in {pair!r}"
        assert pair[0] not in seen, f"{path.name}: duplicate input {pair[0]!r}"
        seen.add(pair[0])
