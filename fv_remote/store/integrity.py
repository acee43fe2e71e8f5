"""Integrity of an activation store: find damage (`verify`), undo it (`repair`), back up the metadata.

Works on the files (through fsspec), not through zarr, so a store whose metadata no longer parses can still be
inspected and mended:

- every `zarr.json` must parse; a task group (one with `n_complete`) must have every prompt array at least
  `n_complete` long, every chunk covering the committed prompts present (groups written by this version store
  empty chunks too, so a missing chunk is always damage), decodable, and free of NaN/inf;
- rows past `n_complete` are an interrupted append: readers ignore them, `repair` drops them;
- a metadata backup (`.fv-remote/manifest.json`, rewritten after every commit) lets `repair` restore a damaged
  or deleted `zarr.json` with every committed prompt intact; damaged prompts are dropped from the first damaged
  one on (prompt i is always the same prompt of a seeded sequence, so a rerun of the stage redoes them);
- zarr's own `*.partial` temporary files (a write killed mid-file) are debris: harmless, removed by `repair`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import posixpath
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import numpy as np

from fv_remote.core.errors import UserError

PROMPT_DIM = "prompt"
BOOKKEEPING = ".fv-remote"  # a zarr group of its own (so zarr listings stay quiet): writer lock + metadata backup
MANIFEST = f"{BOOKKEEPING}/manifest.json"
ROOT_DOC = "zarr.json"
STORE_IDENTITY_KEYS = ("model", "revision", "template")


@dataclass
class Problem:
    group: str  # "toy", "toy/cma"; "" for the store itself
    kind: str  # metadata | short | missing-chunk | unreadable | non-finite | uncommitted | identity | debris | note
    message: str
    rows: tuple[int, int] | None = None  # [lo, hi) prompt range
    fatal: bool = True  # False: reported, but not damage (verify still passes)

    def line(self) -> str:
        where = self.group or "(store)"
        rows = f" [prompts {format_rows(*self.rows)}]" if self.rows else ""
        return f"{where}: {self.message}{rows}"


def format_rows(lo: int, hi: int) -> str:
    return f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}"


def row_ranges(rows) -> list[tuple[int, int]]:
    """Sorted row indices -> [lo, hi) runs."""
    out: list[tuple[int, int]] = []
    for r in sorted(set(int(x) for x in rows)):
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def describe_rows(rows) -> str:
    return ", ".join(format_rows(lo, hi) for lo, hi in row_ranges(rows))


# --- files ------------------------------------------------------------------------------------------------------


class Files:
    """The store's files through fsspec, keyed by their path inside the store."""

    def __init__(self, url: str):
        import fsspec

        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.local = type(self.fs).__name__ == "LocalFileSystem"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def exists(self) -> bool:
        return self.fs.exists(self.root)

    def isfile(self) -> bool:
        return self.fs.isfile(self.root)

    def keys(self, under: str = "") -> set[str]:
        base = self.path(under)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return set()
        cut = len(self.root) + 1
        return {p[cut:] for p in found if p.startswith(self.root + "/")}

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def write(self, key: str, data: bytes) -> None:
        """Atomic on local disks (temp file + rename); object stores replace whole objects anyway."""
        target = self.path(key)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.{os.getpid()}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)

    def remove(self, key: str, recursive: bool = False) -> None:
        self.fs.rm(self.path(key), recursive=recursive)


def read_doc(files: Files, key: str) -> tuple[dict | None, str | None]:
    """(parsed zarr.json, None) or (None, why it is unusable)."""
    try:
        doc = json.loads(files.read(key))
    except FileNotFoundError:
        return None, "missing"
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"not valid JSON ({exc}); truncated?"
    if not isinstance(doc, dict) or doc.get("node_type") not in ("group", "array"):
        return None, "not zarr metadata (no node_type)"
    if doc["node_type"] == "array" and not _array_doc_ok(doc):
        return None, "incomplete array metadata (shape, data_type or chunk_grid missing)"
    return doc, None


def _doc_conflict(doc: dict, saved: dict | None) -> str | None:
    """Why a parseable zarr.json is still wrong: a commit point that is not a count, or a node that changed kind."""
    if doc["node_type"] == "group":
        n = (doc.get("attributes") or {}).get("n_complete") if isinstance(doc.get("attributes"), dict) else None
        if not isinstance(doc.get("attributes", {}), dict):
            return "not zarr metadata (attributes are not an object)"
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            return f"wrong: its commit point n_complete={n!r} is not a count"
    if saved is not None and saved.get("node_type") != doc["node_type"]:
        return f"wrong: it describes a {doc['node_type']} where the store had an {saved.get('node_type')}"
    return None


def _array_doc_ok(doc: dict) -> bool:
    try:
        shape = [int(s) for s in doc["shape"]]
        chunks = [int(c) for c in doc["chunk_grid"]["configuration"]["chunk_shape"]]
        return len(shape) == len(chunks) and all(c > 0 for c in chunks) and bool(doc["data_type"])
    except (KeyError, TypeError, ValueError):
        return False


def chunk_keys(doc: dict, rows: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Chunk key (relative to the array) -> the row range it holds, for the chunks covering `rows` of dim 0."""
    shape = [int(s) for s in doc["shape"]]
    chunks = [int(c) for c in doc["chunk_grid"]["configuration"]["chunk_shape"]]
    enc = doc.get("chunk_key_encoding") or {"name": "default"}
    sep = (enc.get("configuration") or {}).get("separator", "/" if enc.get("name") == "default" else ".")
    if not shape:
        return {"c" if enc.get("name") == "default" else "0": (0, 1)}
    lo, hi = rows
    first = range(lo // chunks[0], math.ceil(hi / chunks[0]))
    rest = [range(math.ceil(s / c)) for s, c in zip(shape[1:], chunks[1:])]
    out = {}
    for coords in product(first, *rest):
        key = sep.join(str(i) for i in coords)
        if enc.get("name") == "default":
            key = f"c{sep}{key}"
        out[key] = (max(coords[0] * chunks[0], lo), min((coords[0] + 1) * chunks[0], hi))
    return out


# --- scanning ---------------------------------------------------------------------------------------------------


@dataclass
class GroupState:
    path: str
    n: int | None  # n_complete (None: unknown, the group's metadata is damaged and not backed up)
    arrays: dict[str, dict | None] = field(default_factory=dict)  # name -> doc (None: damaged)


@dataclass
class Scan:
    url: str
    problems: list[Problem]
    groups: dict[str, GroupState]
    damaged_docs: dict[str, str]  # zarr.json key -> why
    debris: list[str]

    @property
    def damage(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]


def read_manifest(files: Files) -> dict | None:
    try:
        data = json.loads(files.read(MANIFEST))
        return data if isinstance(data, dict) and isinstance(data.get("docs"), dict) else None
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None


def scan(url: str, full: bool = True, only: str | None = None) -> Scan:
    """Everything wrong with the store at `url` (`only`: one task group); `full` also decodes every chunk."""
    files = Files(url)
    if not files.exists():
        raise UserError(f"no activation store at {url}; create one with `fv-remote extract`")
    if files.isfile():
        raise UserError(f"{url} is a file, not an activation store (a Zarr folder)")
    keys = {k for k in files.keys(only or "") if not k.startswith(BOOKKEEPING + "/")}
    manifest = read_manifest(files)
    backup = (manifest or {}).get("docs", {})
    problems: list[Problem] = []
    docs: dict[str, dict] = {}
    damaged: dict[str, str] = {}
    debris = sorted(k for k in keys if k.endswith(".partial") or k.endswith(".tmp"))
    for key in sorted(k for k in keys if posixpath.basename(k) == "zarr.json"):
        doc, why = read_doc(files, key)
        if doc is not None:
            why = _doc_conflict(doc, backup.get(key))
        if why:
            damaged[key] = why
        elif doc is not None:
            docs[key] = doc
    node_dirs = {posixpath.dirname(k) for k in list(docs) + list(damaged)}
    # Arrays whose zarr.json is gone: chunk files under a dir with no metadata of its own.
    for key in keys:
        if key in debris or posixpath.basename(key) == "zarr.json":
            continue
        parts = key.split("/")
        if "c" in parts[1:]:
            array_dir = "/".join(parts[: parts.index("c", 1)])
            if array_dir not in node_dirs:
                damaged[f"{array_dir}/zarr.json" if array_dir else ROOT_DOC] = "missing (the array's chunks are there)"
                node_dirs.add(array_dir)
    for key in backup:  # arrays or groups the backup knows that are gone entirely
        if posixpath.dirname(key) not in node_dirs and key != ROOT_DOC and not key.startswith(BOOKKEEPING):
            if only is None or key.startswith(only + "/") and key.count("/") == only.count("/") + 2:
                damaged[key] = "missing (the whole node is gone)"
                node_dirs.add(posixpath.dirname(key))
    if only is None and ROOT_DOC not in docs and ROOT_DOC not in damaged:
        damaged[ROOT_DOC] = "missing"

    def node_kind(d: str) -> str | None:
        key = f"{d}/zarr.json" if d else ROOT_DOC
        if key in docs:
            return docs[key]["node_type"]
        if key in backup:
            return backup[key].get("node_type")
        # A damaged doc with no backup: it is an array if it has chunks of its own.
        return "array" if any(k.startswith(f"{d}/c/") or k.startswith(f"{d}/c.") for k in keys) else "group"

    for key, why in sorted(damaged.items()):
        node = posixpath.dirname(key)
        restorable = "; the metadata backup can restore it" if key in backup else "; no backup of it"
        group = node if node_kind(node) == "group" else posixpath.dirname(node)
        problems.append(Problem(group, "metadata", f"{key} is {why}{restorable}"))

    groups: dict[str, GroupState] = {}
    for d in sorted(node_dirs):
        if node_kind(d) != "group" or not d:
            continue
        key = f"{d}/zarr.json"
        doc = docs.get(key) or backup.get(key)
        attrs = (doc or {}).get("attributes", {}) if isinstance(doc, dict) else {}
        n = attrs.get("n_complete")
        children = {c for c in node_dirs if posixpath.dirname(c) == d and node_kind(c) == "array"}
        if n is None and not children:
            continue  # a plain parent group (e.g. a task whose only content is its cma group)
        state = GroupState(d, int(n) if isinstance(n, (int, float)) else None)
        for c in sorted(children):
            state.arrays[posixpath.basename(c)] = docs.get(f"{c}/zarr.json")
        groups[d] = state
    root_doc = docs.get(ROOT_DOC) or backup.get(ROOT_DOC) or {}
    identity = (root_doc.get("attributes") or {}).get("store_identity") or {}
    for state in groups.values():
        problems += _check_group(files, state, keys, full)
        problems += _check_identity(state.path, docs.get(f"{state.path}/zarr.json"), identity)
    if debris:
        problems.append(Problem("", "debris", f"{len(debris)} temporary file(s) of an interrupted write "
                                              f"(e.g. {debris[0]}); harmless, `store repair` removes them",
                                fatal=False))
    if manifest is None and groups:
        problems.append(Problem("", "note", "no metadata backup (.fv-remote/manifest.json; stores written before "
                                            "it existed have none): a damaged zarr.json cannot be restored",
                                fatal=False))
    return Scan(url, problems, groups, damaged, debris)


def _check_identity(path: str, doc: dict | None, identity: dict) -> list[Problem]:
    attrs = (doc or {}).get("attributes") or {}
    out = []
    for key in STORE_IDENTITY_KEYS:
        if key in identity and key in attrs and attrs[key] != identity[key]:
            out.append(Problem(path, "identity", f"written with {key} {attrs[key]!r} but the store holds "
                                                 f"{key} {identity[key]!r}: data of two runs are mixed"))
    return out


def _check_group(files: Files, state: GroupState, keys: set[str], full: bool) -> list[Problem]:
    out: list[Problem] = []
    n = state.n
    if n is None:
        out.append(Problem(state.path, "metadata", "the commit point (n_complete) is unknown"))
        return out
    all_written = False
    gdoc, _ = read_doc(files, f"{state.path}/zarr.json")
    if gdoc:
        all_written = int((gdoc.get("attributes") or {}).get("store_format", 1)) >= 2
    for name, doc in state.arrays.items():
        if doc is None:
            continue  # reported with the metadata problems
        dims = doc.get("dimension_names") or []
        on_prompts = bool(dims) and dims[0] == PROMPT_DIM
        shape = [int(s) for s in doc["shape"]]
        rows = (0, min(n, shape[0])) if on_prompts else (0, shape[0] if shape else 1)
        if on_prompts and shape[0] < n:
            out.append(Problem(state.path, "short", f"{name} holds {shape[0]} of the {n} committed prompts",
                               (shape[0], n)))
        if on_prompts and shape[0] > n:
            out.append(Problem(state.path, "uncommitted", f"{name} has {shape[0] - n} rows past the commit point "
                                                          f"(an interrupted append; readers ignore them)",
                               (n, shape[0])))
        if rows[1] <= rows[0]:
            continue
        # Legacy groups did not store chunks equal to the fill value: there only NaN/str fills prove damage.
        fill = doc.get("fill_value")
        check_presence = all_written or fill in ("NaN", "nan") or "str" in str(doc.get("data_type"))
        missing_rows: set[int] = set()
        if check_presence:
            for ckey, (lo, hi) in chunk_keys(doc, rows).items():
                if f"{state.path}/{name}/{ckey}" not in keys:
                    missing_rows.update(range(lo, hi))
            for lo, hi in row_ranges(missing_rows):
                out.append(Problem(state.path, "missing-chunk", f"{name}: chunk file(s) missing",
                                   (lo, hi) if on_prompts else None))
        if full:
            out += _read_array(files, state.path, name, doc, rows, missing_rows, on_prompts)
    return out


def _read_array(files: Files, group: str, name: str, doc: dict, rows: tuple[int, int], skip: set[int],
                on_prompts: bool) -> list[Problem]:
    import zarr

    out: list[Problem] = []
    try:
        arr = zarr.open_array(store=files.url, path=f"{group}/{name}", mode="r", zarr_format=3)
    except Exception as exc:  # noqa: BLE001 - any failure is damage to report, not to raise
        return [Problem(group, "metadata", f"{name}: cannot open ({type(exc).__name__}: {exc})")]
    chunk0 = int(doc["chunk_grid"]["configuration"]["chunk_shape"][0]) if doc["shape"] else 1
    bad_rows: list[int] = []
    unreadable: list[tuple[int, int, str]] = []
    for lo in range(rows[0], rows[1], chunk0):
        hi = min(lo + chunk0, rows[1])
        if set(range(lo, hi)) <= skip:
            continue
        try:
            block = np.asarray(arr[lo:hi] if doc["shape"] else arr[...])
        except Exception as exc:  # noqa: BLE001 - a chunk that does not decode
            unreadable.append((lo, hi, f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        if block.dtype.kind in "fc" and block.size:
            finite = np.isfinite(block.reshape(block.shape[0], -1) if block.ndim else block.reshape(1, 1)).all(1)
            bad_rows += [lo + int(i) for i in np.flatnonzero(~finite) if lo + int(i) not in skip]
    for lo, hi, why in unreadable:
        out.append(Problem(group, "unreadable", f"{name}: chunk does not decode ({why})",
                           (lo, hi) if on_prompts else None))
    if bad_rows:
        out.append(Problem(group, "non-finite", f"{name}: NaN/inf values in prompts {describe_rows(bad_rows)}",
                           (min(bad_rows), max(bad_rows) + 1) if on_prompts else None))
    return out


# --- backup and repair ------------------------------------------------------------------------------------------


def write_manifest(url: str) -> None:
    """Back up every zarr.json (a damaged one keeps its previous backup); called after each commit."""
    files = Files(url)
    old = (read_manifest(files) or {}).get("docs", {})
    docs: dict[str, Any] = {}
    for key in _metadata_keys(files):
        doc, why = read_doc(files, key)
        if doc is not None:
            docs[key] = doc
        elif key in old and why != "missing":
            docs[key] = old[key]
    data = {"format": 1, "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "docs": docs}
    files.write(MANIFEST, json.dumps(data, indent=1).encode())


def _metadata_keys(files: Files) -> list[str]:
    """zarr.json keys of every node, walking groups only (arrays' chunk folders are not listed)."""
    out, todo = [], [""]
    while todo:
        d = todo.pop()
        key = f"{d}/zarr.json" if d else ROOT_DOC
        out.append(key)
        doc, _ = read_doc(files, key)
        if doc is not None and doc["node_type"] == "array":
            continue
        try:
            entries = files.fs.ls(files.path(d), detail=True)
        except FileNotFoundError:
            continue
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "directory" and name != BOOKKEEPING:
                todo.append(f"{d}/{name}" if d else name)
    return out


@dataclass
class RepairReport:
    actions: list[str]
    remaining: list[Problem]


def repair(store) -> RepairReport:
    """Restore damaged metadata from the backup, drop rows past the commit point and damaged prompts (from the
    first damaged one on), remove debris. Committed prompts before any damage are left untouched."""
    import zarr

    actions: list[str] = []
    with store.writing():
        files = Files(store.url)
        first = scan(store.url, full=True)
        backup = (read_manifest(files) or {}).get("docs", {})
        for key, why in sorted(first.damaged_docs.items()):
            node = posixpath.dirname(key)
            if key in backup:
                doc = json.loads(json.dumps(backup[key]))
                if doc.get("node_type") == "array" and (doc.get("dimension_names") or [None])[0] == PROMPT_DIM:
                    n = _group_n(files, posixpath.dirname(node), backup)
                    if n is not None:
                        doc["shape"][0] = n
                files.write(key, json.dumps(doc, indent=2).encode())
                actions.append(f"restored {key} from the metadata backup (it was {why})")
            elif key == ROOT_DOC:
                files.write(key, json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode())
                actions.append(f"rewrote {key} (it was {why}; the store identity is taken from the tasks again)")
            else:
                group = _task_group_of(first, node)
                if files.fs.exists(files.path(group)):
                    files.remove(group, recursive=True)
                actions.append(f"dropped {group!r} entirely: {key} is {why} and there is no backup of it; rerun "
                               "its stage to redo it")
        second = scan(store.url, full=True)
        cuts: dict[str, tuple[int, list[str]]] = {}
        for p in second.damage:
            state = second.groups.get(p.group)
            if state is None or state.n is None or p.rows is None:
                continue
            n_new, reasons = cuts.get(p.group, (state.n, []))
            if p.kind == "uncommitted":
                cuts[p.group] = (n_new, reasons)
            else:
                cuts[p.group] = (min(n_new, p.rows[0]), reasons + [f"{p.message} [prompts {format_rows(*p.rows)}]"])
        for path, (n_new, reasons) in sorted(cuts.items()):
            state = second.groups[path]
            assert state.n is not None  # cuts holds only groups with a known commit point
            zgroup = zarr.open_group(store.url, mode="r+", zarr_format=3, path=path)
            for name, arr in zgroup.arrays():
                dims = (arr.metadata.dimension_names if arr.metadata.zarr_format == 3 else None) or ()
                if dims and dims[0] == PROMPT_DIM and arr.shape[0] != n_new:
                    if arr.shape[0] > state.n:
                        actions.append(f"{path}: dropped {arr.shape[0] - state.n} uncommitted row(s) of {name} "
                                       f"(prompts {format_rows(state.n, arr.shape[0])}, never committed)")
                    arr.resize((n_new, *arr.shape[1:]))
            if n_new < state.n:
                zgroup.attrs["n_complete"] = n_new
                actions.append(f"{path}: dropped committed prompts {format_rows(n_new, state.n)} "
                               f"({'; '.join(reasons)}); {n_new} prompts kept, rerun its stage to redo the rest")
        for key in second.debris:
            try:
                files.remove(key)
            except FileNotFoundError:
                pass
        if second.debris:
            actions.append(f"removed {len(second.debris)} temporary file(s) of an interrupted write")
        write_manifest(store.url)
        final = scan(store.url, full=True)
    return RepairReport(actions, final.damage)


def _group_n(files: Files, group: str, backup: dict) -> int | None:
    doc, _ = read_doc(files, f"{group}/zarr.json")
    doc = doc or backup.get(f"{group}/zarr.json")
    n = ((doc or {}).get("attributes") or {}).get("n_complete")
    return int(n) if isinstance(n, (int, float)) else None


def _task_group_of(s: Scan, node: str) -> str:
    """The task group a node belongs to (the node itself when it is one)."""
    while node and node not in s.groups and posixpath.dirname(node):
        node = posixpath.dirname(node)
    return node
