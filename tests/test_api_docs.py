"""docs/API.md is what tools/api_docs.py writes from the code's docstrings (run `make docs` after changing them)."""

from __future__ import annotations

from pathlib import Path

from support.tools import load_tool

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    return load_tool("api_docs")


def test_api_md_is_up_to_date():
    text = _load_tool().render()
    committed = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    assert committed == text, "docs/API.md is out of date with the docstrings: run `make docs`"


def test_every_public_name_is_documented():
    import fv_remote

    text = _load_tool().render()
    for name in fv_remote.__all__:
        if name != "__version__":
            assert f"### `{name}`" in text
    assert "(no docstring)" not in text, "a public name has no docstring"
    assert " at 0x" not in text  # no memory addresses (the file must not change between runs)
