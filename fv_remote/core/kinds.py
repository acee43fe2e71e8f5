"""What a path is, in words, for the error line that refuses it (issue 26): a command given the wrong kind of
file names what it found ("... is a relation bank, not a function-vector file") instead of a parse error, and an
output path that holds another kind of fv-remote file is not overwritten.

Only headers are read: a safetensors file's JSON header, a GGUF file's magic, a folder's listing.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from fv_remote.core.errors import UserError

MAX_HEADER = 100 * 2**20  # safetensors caps its JSON header at 100 MB too

# kinds written by fv-remote (what `kind_of` returns) and how an error line names them
NAMES = {"fv": "a function-vector file", "bank": "a relation bank", "combiner": "a combiner file",
         "gguf": "a GGUF file", "store": "an activation store", "json": "a JSON file", "png": "a PNG image",
         "safetensors": "a safetensors file of other tensors (not written by fv-remote)", "folder": "a folder",
         "model": "a model folder", "missing": "nothing (no such file or folder)", "text": "a text file",
         "binary": "a binary file"}
ARTEFACTS = ("fv", "bank", "combiner", "gguf", "store")


def _safetensors_header(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if not 2 <= n <= MAX_HEADER:
                return None
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return header if isinstance(header, dict) else None


STORE_MARKERS = ("zarr.json", ".fv-remote/manifest.json")


def is_store(url: str) -> bool:
    """A folder holding a root `zarr.json`, the metadata backup `.fv-remote/manifest.json`, or a task group's
    `zarr.json` one level down (a store whose root document was lost is still one; a folder of stores is not)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(url))
    root = root.rstrip("/")
    if not fs.exists(root) or fs.isfile(root):
        return False
    return has_store_markers(fs, root)


def has_store_markers(fs, root: str) -> bool:
    """Only the folder's own listing and a few named files are looked at: a wrong path (a home folder) costs nothing."""
    if any(fs.exists(f"{root}/{m}") for m in STORE_MARKERS):
        return True
    for entry in fs.ls(root, detail=True):
        child = str(entry["name"]).rstrip("/")
        if entry.get("type") == "directory" and fs.exists(f"{child}/zarr.json") and _task_group(fs, child):
            return True
    return False


def _task_group(fs, child: str) -> bool:
    """A Zarr group one level down is a task group (so the folder is a store that lost its root document) unless
    it is a store of its own: its root holds the store identity or the metadata backup."""
    if fs.exists(f"{child}/.fv-remote/manifest.json"):
        return False
    try:
        attrs = json.loads(fs.cat_file(f"{child}/zarr.json")).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return True  # damaged: only a store's task groups are looked for here
    return "store_identity" not in attrs


def kind_of(path: str | Path) -> str:
    """One of NAMES' keys."""
    path = Path(path)
    if path.is_dir():
        if is_store(str(path)):
            return "store"
        return "model" if (path / "config.json").is_file() else "folder"
    if not path.exists():
        return "missing"
    try:
        with open(path, "rb") as fh:
            start = fh.read(8)
    except OSError:
        return "binary"
    if start.startswith(b"GGUF"):
        return "gguf"
    if start.startswith(b"\x89PNG"):
        return "png"
    header = _safetensors_header(path)
    if header is not None:
        meta = header.get("__metadata__") or {}
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt == "fv-remote-bank":
            return "bank"
        if fmt == "fv-remote-combiner":
            return "combiner"
        if "vector" in header and isinstance(meta, dict) and "model" in meta:
            return "fv"
        return "safetensors"
    if start.lstrip()[:1] in (b"{", b"["):
        return "json"
    return "text" if all(b >= 9 for b in start) else "binary"


def describe(path: str | Path) -> str:
    return NAMES[kind_of(path)]


def wrong_kind(path: str | Path, wanted: str, hint: str = "") -> UserError:
    """`{path} is {what it is}, not {wanted}` (+ a hint for the kinds that have an obvious other use)."""
    found = kind_of(path)
    use = {"bank": "use it with --bank (or BANK:RELATION)", "fv": "use it with --fv",
           "combiner": "use it with analogy --combiner", "store": "use it with --store",
           "gguf": "a control vector: `fv-remote import` it first"}.get(found, "")
    extra = "; ".join(x for x in (hint, use) if x)
    return UserError(f"{path} is {NAMES[found]}, not {wanted}" + (f" ({extra})" if extra else ""))


def check_output_kind(path: str | Path | None, flag: str, kind: str | None = None) -> None:
    """An output that would replace a different kind of fv-remote file (a bank under a finetune's --out, a vector
    under --json) is refused: the file in the way may have cost hours."""
    if path is None or not Path(path).is_file():
        return
    found = kind_of(path)
    if found in ARTEFACTS and found != kind:
        raise UserError(f"{flag} {path} holds {NAMES[found]}; this command would overwrite it with "
                        f"{NAMES.get(kind or '', 'its output')}: give another file name")
