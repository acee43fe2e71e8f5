"""Readers for relation datasets in public formats.

Every reader turns a problem with the input into a UserError that names the file and, where one exists, the
line, so a user can fix the file without reading a traceback.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from fv_remote.core.errors import UserError

__all__ = [
    "RelationTask",
    "MCAnalogy",
    "read_relation_json",
    "read_todd_json",
    "read_task_json",
    "read_bats_pairs",
    "read_semeval2012",
    "read_semeval2012_ratings",
    "read_mc_analogies",
    "read_analogy_csv",
]


@dataclass
class RelationTask:
    """A relation given by examples: (x, y) pairs where y = relation(x)."""

    name: str
    pairs: list[tuple[str, str]]
    category: str = "custom"
    description: str = ""
    relation_words: tuple[str, ...] = ()
    source: str = ""
    labels: dict[str, str] = field(default_factory=dict)  # e.g. source, class, subcategory (fv_remote.data.sources)

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass
class MCAnalogy:
    """A multiple-choice analogy: stem a:b, pick the choice c:d that stands in the same relation."""

    stem: tuple[str, str]
    choices: list[tuple[str, str]]
    answer: int
    relation: str = ""
    groups: dict[str, str] = field(default_factory=dict)  # what `analogy --group-by` can split results by

    @property
    def correct(self) -> tuple[str, str]:
        return self.choices[self.answer]


# --- helpers ------------------------------------------------------------------------------------------------


def _fail(path: Path, line: int | None, message: str) -> UserError:
    where = f"{path}:{line}" if line else str(path)
    return UserError(f"{where}: {message}")


def read_text_file(path: str | Path, encoding: str = "utf-8") -> tuple[Path, str]:
    """(path, text) of a UTF-8 data file; a missing, undecodable or empty one is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    return path, text


def _load_json(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _locate(text: str, keys: tuple) -> int | None:
    """Line where the value at `keys` (list indices / dict keys) starts in an already-valid JSON text.

    Only called on the error path, so walking the text in Python is fine; None when it cannot be found.
    """
    decoder = json.JSONDecoder()
    try:
        i = _skip_ws(text, 0)
        for key in keys:
            opener = text[i]
            closer = "]" if opener == "[" else "}"
            i, n, found = _skip_ws(text, i + 1), 0, False
            while text[i] != closer:
                if opener == "{":
                    k, i = decoder.raw_decode(text, i)
                    i = _skip_ws(text, _skip_ws(text, i) + 1)  # past the ':'
                    found = k == key
                else:
                    found = n == key
                if found:
                    break
                _, i = decoder.raw_decode(text, i)
                i = _skip_ws(text, i)
                if text[i] == ",":
                    i = _skip_ws(text, i + 1)
                n += 1
            if not found:
                return None
        return text.count("\n", 0, i) + 1
    except (IndexError, ValueError):
        return None


# Relation entries are words or short phrases; a 5 MB "word" would make every prompt holding it explode a forward
# pass (and memory) long before the model's context check could say why.
MAX_ENTRY_CHARS = 2000


def _entry_ok(value) -> bool:
    return isinstance(value, str) and bool(value.strip()) and len(value) <= MAX_ENTRY_CHARS


def _word(value, path: Path, line: int | None, what: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, line, f"{what} must be a string, got {type(value).__name__} {value!r:.80}")
    value = value.strip()
    if not value:
        raise _fail(path, line, f"{what} is empty")
    if len(value) > MAX_ENTRY_CHARS:
        raise _fail(path, line, f"{what} has {len(value)} characters ({value[:30]!r}...); entries are words or "
                                f"short phrases of at most {MAX_ENTRY_CHARS} characters")
    return value


def _pair(value, path: Path, text: str, keys: tuple, what: str = "pair") -> tuple[str, str]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(path, _locate(text, keys), f"{what} must be a list of 2 strings, got {value!r}")
    line = _locate(text, keys) if not all(_entry_ok(v) for v in value) else None
    return _word(value[0], path, line, f"{what}[0]"), _word(value[1], path, line, f"{what}[1]")


# --- relation tasks -----------------------------------------------------------------------------------------


def read_todd_json(path: str | Path) -> RelationTask:
    """A Todd et al. (2024) task file: a JSON list of {"input": x, "output": y}; the name is the file stem."""
    path, text = read_text_file(path)
    return _todd_from(path, text, _load_json(path, text))


def _todd_from(path: Path, text: str, data) -> RelationTask:
    if not isinstance(data, list):
        raise _fail(path, 1, 'expected a JSON list of {"input": ..., "output": ...} objects')
    if not data:
        raise _fail(path, 1, "dataset is empty")
    pairs = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "input" not in item or "output" not in item:
            line = _locate(text, (i,))
            raise _fail(path, line, f'element {i} must be an object with "input" and "output", got {item!r}')
        bad = not all(_entry_ok(item[k]) for k in ("input", "output"))
        line = _locate(text, (i,)) if bad else None
        pairs.append((_word(item["input"], path, line, "input"), _word(item["output"], path, line, "output")))
    return RelationTask(name=path.stem, pairs=pairs, category="todd", source=str(path))


def read_relation_json(path: str | Path) -> RelationTask:
    """The bundled format: {"name", "category", "description", "relation_words": [...], "pairs": [[x, y], ...]}."""
    path, text = read_text_file(path)
    return _relation_from(path, text, _load_json(path, text))


def _relation_from(path: Path, text: str, data) -> RelationTask:
    if not isinstance(data, dict) or "pairs" not in data:
        raise _fail(path, 1, 'expected an object with a "pairs" list')
    raw = data["pairs"]
    if not isinstance(raw, list):
        raise _fail(path, _locate(text, ("pairs",)), '"pairs" must be a list of [x, y] pairs')
    if not raw:
        raise _fail(path, _locate(text, ("pairs",)), "dataset is empty")
    pairs = [_pair(p, path, text, ("pairs", i), f"pairs[{i}]") for i, p in enumerate(raw)]
    words = data.get("relation_words", [])
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise _fail(path, _locate(text, ("relation_words",)), '"relation_words" must be a list of strings')
    for key in ("name", "category", "description"):
        if key in data and not isinstance(data[key], str):
            raise _fail(path, _locate(text, (key,)), f'"{key}" must be a string')
    return RelationTask(
        name=data.get("name") or path.stem,
        pairs=pairs,
        category=data.get("category") or "custom",
        description=data.get("description", ""),
        relation_words=tuple(words),
        source=str(path),
    )


def read_task_json(path: str | Path) -> RelationTask:
    """Either JSON task format, told apart by the top level: a list is Todd's, an object is ours."""
    path, text = read_text_file(path)
    data = _load_json(path, text)
    if isinstance(data, list):
        return _todd_from(path, text, data)
    return _relation_from(path, text, data)


_BATS_CATEGORIES = {
    "I": "inflectional morphology",
    "D": "derivational morphology",
    "E": "encyclopedic semantics",
    "L": "lexicographic semantics",
}


def read_bats_pairs(path: str | Path) -> dict[str, RelationTask]:
    """BATS pairs: {"E05 [name - occupation]": [[source, target], ...], ...} -> one task per relation."""
    path, text = read_text_file(path)
    data = _load_json(path, text)
    if not isinstance(data, dict):
        raise _fail(path, 1, "expected an object mapping relation names to lists of [source, target] pairs")
    if not data:
        raise _fail(path, 1, "dataset is empty")
    tasks = {}
    for rel, raw in data.items():
        if not isinstance(raw, list) or not raw:
            raise _fail(path, _locate(text, (rel,)), f"relation {rel!r} must be a non-empty list of pairs")
        pairs = [_pair(p, path, text, (rel, i), f"{rel}[{i}]") for i, p in enumerate(raw)]
        # "E05 [name - occupation]": the letter gives the BATS section, the bracket the relation.
        match = re.match(r"\s*([A-Z])\d+\s*\[(.*)\]\s*$", rel)
        category = _BATS_CATEGORIES.get(match.group(1), "bats") if match else "bats"
        description = match.group(2).strip() if match else ""
        tasks[rel] = RelationTask(rel, pairs, category=category, description=description, source=str(path))
    return tasks


# --- SemEval-2012 Task 2 ------------------------------------------------------------------------------------

_COMPLETE = "SemEval-2012-Complete-Data-Package"
_GOLD = "SemEval-2012-Gold-Ratings"
# Paradigm lists are hand-typed: pairs are separated by ", ", ",", ". " or a bare space, and "x: y" occurs.
_PAIR_RE = re.compile(r"([^\s,.:]+)\s*:\s*([^\s,.:]+)")
_RATING_RE = re.compile(r'^\s*(-?\d+(?:\.\d+)?)\s+"([^"]*)"\s*$')


def _semeval_file(root: Path, name: str) -> Path | None:
    for candidate in (root / _COMPLETE / name, root / name):
        if candidate.is_file():
            return candidate
    return None


def _subcategory_lines(path: Path, min_fields: int):
    """Yield (line_no, id, fields) for lines like '1, a, CLASS-INCLUSION, Taxonomic, ...'."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(", ", min_fields - 1)]
        if len(fields) < min_fields or not fields[0].isdigit() or not fields[1].isalpha():
            raise _fail(path, n, f"expected 'number, letter, CLASS, Subclass, ...', got {line!r}")
        yield n, fields[0] + fields[1], fields


def read_semeval2012(root: str | Path, min_score: float | None = 0.0) -> dict[str, RelationTask]:
    """SemEval-2012 Task 2: subcategory id ("1a") -> task with its paradigm pairs, then the gold-rated pairs.

    `root` holds SemEval-2012-Complete-Data-Package (and optionally SemEval-2012-Gold-Ratings). Rated pairs
    are added when their prototypicality score exceeds `min_score` (None adds none): the rated lists contain
    deliberately reversed and off-relation pairs with negative scores, which are not examples of the relation.
    """
    root = Path(root)
    paradigms = _semeval_file(root, "subcategories-paradigms.txt")
    if paradigms is None:
        raise UserError(f"{root}: no {_COMPLETE}/subcategories-paradigms.txt here; pass the SemEval-2012 Task 2 folder")
    definitions = {}
    if (path := _semeval_file(root, "subcategories-definitions.txt")) is not None:
        definitions = {sid: f[4] for _, sid, f in _subcategory_lines(path, 5)}
    ratings = read_semeval2012_ratings(root) if min_score is not None and (root / _GOLD).is_dir() else {}
    tasks = {}
    for n, sid, fields in _subcategory_lines(paradigms, 5):
        pairs = [(x, y) for x, y in _PAIR_RE.findall(fields[4])]
        if not pairs:
            raise _fail(paradigms, n, f"no x:y paradigm pairs for subcategory {sid}")
        for x, y, score in ratings.get(sid, []):
            if min_score is not None and score > min_score and (x, y) not in pairs:
                pairs.append((x, y))
        description = fields[3] + (f": {definitions[sid]}" if sid in definitions else "")
        tasks[sid] = RelationTask(sid, pairs, category=fields[2], description=description, source=str(paradigms))
    return tasks


def read_semeval2012_ratings(root: str | Path) -> dict[str, list[tuple[str, str, float]]]:
    """Gold prototypicality ratings: subcategory id -> [(x, y, score)], training and testing, best first."""
    root = Path(root)
    gold = root / _GOLD if (root / _GOLD).is_dir() else root
    files = sorted(gold.glob("*/GoldRatings-*.txt"))
    if not files:
        raise UserError(f"{root}: no {_GOLD}/*/GoldRatings-*.txt files here")
    ratings: dict[str, list[tuple[str, str, float]]] = {}
    for path in files:
        sid = path.stem.split("-", 1)[1]
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            match = _RATING_RE.match(line)
            pair = match.group(2).split(":") if match else []
            if match is None or len(pair) != 2 or not all(w.strip() for w in pair):
                raise _fail(path, n, f'expected a score and a "x:y" pair, got {line!r}')
            rows.append((pair[0].strip(), pair[1].strip(), float(match.group(1))))
        if not rows:
            raise _fail(path, None, "no ratings in file")
        rows.sort(key=lambda r: -r[2])
        ratings[sid] = rows
    return ratings


# --- multiple-choice analogies ------------------------------------------------------------------------------


def read_mc_analogies(path: str | Path) -> list[MCAnalogy]:
    """JSON lines {"stem": [a, b], "choice": [[c, d], ...], "answer": i, "prefix": relation}."""
    path, text = read_text_file(path)
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(path, n, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(item, dict) or not {"stem", "choice", "answer"} <= item.keys():
            raise _fail(path, n, 'expected an object with "stem", "choice" and "answer"')
        stem = _line_pair(item["stem"], path, n, "stem")
        if not isinstance(item["choice"], list) or len(item["choice"]) < 2:
            raise _fail(path, n, '"choice" must be a list of at least 2 [c, d] pairs')
        choices = [_line_pair(c, path, n, f"choice[{i}]") for i, c in enumerate(item["choice"])]
        answer = item["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise _fail(path, n, f'"answer" must be an index in 0..{len(choices) - 1}, got {answer!r}')
        relation = _relation_name(item.get("prefix", ""))
        items.append(MCAnalogy(stem, choices, answer, relation, _item_groups(item, relation)))
    if not items:
        raise _fail(path, None, "no analogies in file")
    return items


def _line_pair(value, path: Path, line: int, what: str) -> tuple[str, str]:
    if not isinstance(value, list) or len(value) != 2:
        raise _fail(path, line, f"{what} must be a list of 2 strings, got {value!r}")
    return _word(value[0], path, line, f"{what}[0]"), _word(value[1], path, line, f"{what}[1]")


def _item_groups(item: dict, relation: str) -> dict[str, str]:
    """An item's groupings: `relation` (from the prefix), `family` (a BATS prefix's section folder, e.g.
    "3_Encyclopedic_semantics"; Google's gram* relations are "syntactic", the others "semantic"), and every other
    scalar field as it is."""
    groups = {k: str(v) for k, v in item.items()
              if k not in ("stem", "choice", "answer") and isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    if relation:
        groups["relation"] = relation
        parts = str(item.get("prefix", "")).split("/")
        groups["family"] = parts[-2] if len(parts) >= 2 else ("syntactic" if relation.startswith("gram") else
                                                              "semantic")
    return groups


def _relation_name(prefix) -> str:
    # BATS prefixes are paths like "./cache/BATS_3.0/.../E05 [name - occupation].txt"; Google's are bare names.
    prefix = str(prefix or "").rsplit("/", 1)[-1]
    return prefix[:-4] if prefix.endswith(".txt") else prefix


_CSV_COLUMNS = ("a", "b", "c", "d", "d_foil")


def read_analogy_csv(path: str | Path) -> list[MCAnalogy]:
    """CSV rows A,B,C,D,D_foil -> 2-choice problems A:B :: C:? with choices [D, D_foil], answer 0.

    Without a header: exactly those 5 columns. With one (the first row names a column D_foil or foil), columns
    are read by name (case-insensitive; order free) and any other column becomes a grouping (`--group-by NAME`).
    """
    path, text = read_text_file(path)
    problems = []
    reader = csv.reader(text.splitlines())
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise _fail(path, reader.line_num, f"not valid CSV ({exc})") from None
    rows = [(n, row) for n, row in rows if any(cell.strip() for cell in row)]
    header = None
    if rows and any(cell.strip().lower() in ("d_foil", "foil") for cell in rows[0][1]):
        header = _csv_header(path, rows[0][0], rows[0][1])
        rows = rows[1:]
    for n, row in rows:
        width = len(header) if header else 5
        if len(row) != width:
            expected = ",".join(header) if header else "A,B,C,D,D_foil"
            raise _fail(path, n, f"expected {width} columns {expected}, got {len(row)}: {row!r}")
        cells = [cell.strip() for cell in row]
        named = dict(zip(header, cells)) if header else dict(zip(_CSV_COLUMNS, cells))
        if not all(named[k] for k in _CSV_COLUMNS):
            raise _fail(path, n, f"empty cell in {row!r}")
        a, b, c, d, foil = (named[k] for k in _CSV_COLUMNS)
        groups = {k: v for k, v in named.items() if k not in _CSV_COLUMNS}
        problems.append(MCAnalogy((a, b), [(c, d), (c, foil)], 0, groups=groups))
    if not problems:
        raise _fail(path, None, "no analogies in file")
    return problems


def _csv_header(path: Path, line: int, row: list[str]) -> list[str]:
    """Column names: A..D_foil in lower case (foil = d_foil), other columns as written."""
    names = [cell.strip() for cell in row]
    names = [n.lower() if n.lower() in _CSV_COLUMNS else "d_foil" if n.lower() == "foil" else n for n in names]
    missing = [c.upper() if c != "d_foil" else "D_foil" for c in _CSV_COLUMNS if c not in names]
    if missing:
        raise _fail(path, line, f"header lacks column(s) {', '.join(missing)} (needs A,B,C,D,D_foil; others are "
                                f"groupings)")
    dup = sorted({name for name in names if names.count(name) > 1})
    if dup:
        raise _fail(path, line, f"header repeats column name(s) {', '.join(dup)}")
    if not all(names):
        raise _fail(path, line, "header has an empty column name")
    return names
