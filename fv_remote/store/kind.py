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
from fv_remote.core.kinds import has_store_markers, is_store  # noqa: F401 - is_store: this module's API too

def require_store(url: str, writing: bool = False) -> None:
    """Refuse a path that is not an activation store with one line naming what is there instead. `writing`
    (extract, run): a path that does not exist yet or an empty folder is fine (the store is created there)."""
    from fv_remote.store.integrity import Files

    files = Files(url)
    if not files.exists():
        if writing:
            return
        raise UserError(f"no activation store at {url}; create one with `fv-remote extract --store {url}`")
    if files.isfile():
        raise UserError(f"{url} is a file, not an activation store (a Zarr folder); give the store's folder")
    if has_store_markers(files.fs, files.root):
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
