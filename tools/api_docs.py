"""docs/API.md from the docstrings of `fv_remote.__all__`: per name its signature and the first paragraph of its
docstring, grouped by subpackage.

    python tools/api_docs.py [--out docs/API.md]     (`make docs`; without --out the text goes to stdout)

tests/test_api_docs.py checks that the committed file equals this output.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Subpackages in layer order, low to high (tools/import_graph.py's LAYERS); names of others follow.
ORDER = ["core", "models", "data", "store", "execution", "fv", "relational", "export", "plan", "grafting"]
WIDTH = 110  # a longer signature is written one parameter a line


class _Raw(str):
    """Text that `inspect.Signature` prints as is (annotations are strings here, defaults may hold addresses)."""

    def __repr__(self) -> str:
        return str(self)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return re.sub(r" at 0x[0-9a-f]+", "", inspect.formatannotation(value))


def signature(name: str, obj: Any) -> str:
    """`name(params) -> return`, deterministic (no memory addresses), wrapped past WIDTH."""
    if not callable(obj) or not (inspect.isclass(obj) or inspect.isroutine(obj)):
        return f"{name} = {_text(obj) if not isinstance(obj, str) else repr(obj)}"
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = None
    if sig is None or (inspect.isclass(obj) and issubclass(obj, BaseException) and "args" in sig.parameters):
        bases = ", ".join(b.__name__ for b in obj.__bases__) if inspect.isclass(obj) else ""
        return f"class {name}({bases})" if inspect.isclass(obj) else f"{name}(...)"
    params = []
    for p in sig.parameters.values():
        changes: dict[str, Any] = {}
        if p.annotation is not p.empty:
            changes["annotation"] = _Raw(_text(p.annotation))
        if p.default is not p.empty:
            changes["default"] = _Raw(re.sub(r" at 0x[0-9a-f]+", "", repr(p.default)))
        params.append(p.replace(**changes))
    ret = sig.return_annotation
    clean = sig.replace(parameters=params, return_annotation=sig.empty if ret is sig.empty or inspect.isclass(obj)
                        else _Raw(_text(ret)))
    text = f"{name}{clean}"
    if len(text) <= WIDTH:
        return text
    tail = "" if clean.return_annotation is sig.empty else f" -> {clean.return_annotation}"
    inner = str(clean.replace(return_annotation=sig.empty))[1:-1]
    parts = _split_top_level(inner)
    return f"{name}(\n" + "".join(f"    {part},\n" for part in parts) + f"){tail}"


def _split_top_level(text: str) -> list[str]:
    """Split a parameter list at the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def own_doc(obj: Any, module: Any) -> str:
    """The object's own docstring (not a base class's, not a dataclass's generated signature); for a constant or
    an alias, its module's docstring."""
    if inspect.isclass(obj) or inspect.isroutine(obj):
        doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
        if doc and inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
            doc = None  # dataclass default
    else:
        doc = module.__doc__
    return inspect.cleandoc(doc) if doc else ""


def first_paragraph(doc: str) -> str:
    para = doc.split("\n\n", 1)[0].strip()
    return " ".join(line.strip() for line in para.splitlines())


def entries() -> dict[str, list[tuple[str, str, str, str]]]:
    """subpackage -> [(name, defining module, signature, first paragraph)], in fv_remote._MODULES's order."""
    import importlib

    import fv_remote

    groups: dict[str, list[tuple[str, str, str, str]]] = {}
    modules = fv_remote._MODULES  # module -> names, in the order the package lists them
    listed = [name for names in modules.values() for name in names]
    missing = sorted(set(fv_remote.__all__) - set(listed) - {"__version__"})
    if missing:
        raise SystemExit(f"in fv_remote.__all__ but not in fv_remote._MODULES: {', '.join(missing)}")
    for rel, names in modules.items():
        module = importlib.import_module(f"fv_remote.{rel}")
        for name in names:
            obj = getattr(fv_remote, name)
            home = getattr(obj, "__module__", None) if (inspect.isclass(obj) or inspect.isroutine(obj)) else None
            home = home if home and home.startswith("fv_remote.") else module.__name__
            group = home.split(".")[1]
            doc = own_doc(obj, importlib.import_module(home))
            groups.setdefault(group, []).append((name, home, signature(name, obj), first_paragraph(doc)))
    return groups


def render() -> str:
    import importlib

    import fv_remote

    groups = entries()
    order = [g for g in ORDER if g in groups] + sorted(set(groups) - set(ORDER))
    lines = ["# API reference", "",
             "Generated by `make docs` (`tools/api_docs.py`) from the docstrings of everything in `fv_remote.__all__`:",
             "the signature and the first paragraph of each docstring. Every name is importable from `fv_remote`;",
             "the heading of each entry says where it is defined. Do not edit by hand: `tests/test_api_docs.py`",
             "checks this file against the code.", "",
             f"`fv_remote.__version__` = `{fv_remote.__version__}`", ""]
    lines += [f"- [`fv_remote.{g}`](#fv_remote{g}): " + ", ".join(f"`{n}`" for n, *_ in groups[g]) for g in order]
    for group in order:
        package = importlib.import_module(f"fv_remote.{group}")
        lines += ["", f"## fv_remote.{group}", ""]
        summary = first_paragraph(inspect.cleandoc(package.__doc__ or ""))
        if summary.endswith(":") and ". " in summary:  # a lead-in to a table that is not copied
            summary = summary.rsplit(". ", 1)[0] + "."
        if summary:
            lines += [summary, ""]
        for name, home, sig, para in groups[group]:
            lines += [f"### `{name}`", "", f"*{home}*", "", "```python", sig, "```", ""]
            lines += [para or "(no docstring)", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    text = render()
    if args.out is None:
        sys.stdout.write(text)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = args.out.read_text(encoding="utf-8") if args.out.exists() else None
    args.out.write_text(text, encoding="utf-8")
    n = sum(line.startswith("### ") for line in text.splitlines())
    print(f"{args.out}: {n} names" + (" (unchanged)" if old == text else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
