"""Is a path an activation store? Checked before a command acts on one (issue 26): `store repair` on a folder of
notes used to answer "nothing to repair; intact", `extract` would write Zarr groups among someone's files.

A store is a folder holding a root `zarr.json`, the metadata backup `.fv-remote/manifest.json`, or a task group's
`zarr.json` one level down (a store whose root document was lost is still one: `store repair` restores it; a
folder that merely holds stores is not).
Only the folder's own listing and a few named files are looked at, so a wrong path (a home folder) costs nothing.
"""

from __future__ import annotations

import posixpath

from fv_remote.core.errors import UserError

MARKERS = ("zarr.json", ".fv-remote/manifest.json")


def _files(url: str):
    from fv_remote.store.integrity import Files

    return Files(url)


def is_store(url: str) -> bool:
    files = _files(url)
    if not files.exists() or files.isfile():
        return False
    return _has_markers(files)


def _has_markers(files) -> bool:
    fs = files.fs
    if any(fs.exists(files.path(m)) for m in MARKERS):
        return True
    for entry in fs.ls(files.root, detail=True):
        child = str(entry["name"]).rstrip("/")
        if entry.get("type") == "directory" and fs.exists(f"{child}/zarr.json") and _task_group(fs, child):
            return True
    return False


def _task_group(fs, child: str) -> bool:
    """A Zarr group one level down is a task group (so the folder is a store that lost its root document) unless
    it is a store of its own: its root holds the store identity or the metadata backup."""
    import json

    if fs.exists(f"{child}/.fv-remote/manifest.json"):
        return False
    try:
        attrs = json.loads(fs.cat_file(f"{child}/zarr.json")).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return True  # damaged: only a store's task groups are looked for here
    return "store_identity" not in attrs


def require_store(url: str, writing: bool = False) -> None:
    """Refuse a path that is not an activation store with one line naming what is there instead. `writing`
    (extract, run): a path that does not exist yet or an empty folder is fine (the store is created there)."""
    files = _files(url)
    if not files.exists():
        if writing:
            return
        raise UserError(f"no activation store at {url}; create one with `fv-remote extract --store {url}`")
    if files.isfile():
        raise UserError(f"{url} is a file, not an activation store (a Zarr folder); give the store's folder")
    if _has_markers(files):
        return
    names = sorted(posixpath.basename(str(p).rstrip("/")) for p in files.fs.ls(files.root, detail=False))
    if not names:
        if writing:
            return
        raise UserError(f"{url} is an empty folder, not an activation store; create one with `fv-remote extract "
                        f"--store {url}`")
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise UserError(f"{url} is not an activation store: a folder holding {shown}, with no zarr.json; "
                    + ("give a new or empty folder for the store" if writing else "give the store's folder"))
