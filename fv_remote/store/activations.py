"""The activation store: Zarr v3 through xarray, one group per task, appended one batch of prompts at a time.

Commit point: after every appended batch the group's attribute `n_complete` is advanced, and that is the only
thing that makes the batch part of the store. Readers read every array up to `n_complete` and ignore whatever lies
beyond it (a batch half written when a run died or the disk filled up), so they never see a half-written append;
the next writer (or `fv-remote store repair`) trims those rows and each prompt is stored exactly once. Writers hold
a cross-process lock (`filelock`, in `.fv-remote/` inside the store); after each commit the metadata of every node
is backed up to `.fv-remote/manifest.json` so `repair` can restore a damaged `zarr.json`. A store records the
model, revision and prompt template it holds and refuses tasks from another. Any fsspec URL works (local path,
memory://, s3://, gs://); the writer lock exists for local paths only.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import xarray as xr
import zarr

from fv_remote.core.version import __version__
from fv_remote.core.checks import note_kept
from fv_remote.core.errors import UserError, os_error_message
from fv_remote.store.integrity import BOOKKEEPING, STORE_IDENTITY_KEYS, describe_rows

PROMPT_DIM = "prompt"
CHUNK_PROMPTS = 32
# Settings that must match for a rerun to append to an existing group (otherwise the data would mix).
IDENTITY_KEYS = ("model", "n_layers", "n_heads", "head_dim", "task", "pairs_sha256", "n_shots", "seed", "template",
                 "positions")
# 2: every chunk is stored (write_empty_chunks), so a missing chunk file always means damage.
STORE_FORMAT = 2


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [sys.argv[0].rsplit("/", 1)[-1], *sys.argv[1:]])


def _encode_attr(value: Any) -> Any:
    # Zarr attributes are JSON; keep structured values readable rather than repr strings.
    if isinstance(value, (list, tuple)):
        return [_encode_attr(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


def local_path(url: str) -> Path | None:
    """The folder of a local store (plain path or file:// URL); None for other fsspec URLs."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" in url:
        return None
    return Path(url).expanduser()


def _damaged(url: str, what: str, exc: BaseException) -> UserError:
    return UserError(f"store {url}: {what} is damaged ({type(exc).__name__}: {str(exc)[:160]}); "
                     f"`fv-remote store verify {url}` lists the damage, `fv-remote store repair {url}` mends it")


@dataclass
class ActivationStore:
    """A Zarr store (path or fsspec URL) holding one group per task."""

    url: str
    _lock: Any = field(default=None, init=False, repr=False, compare=False)

    # -- opening ---------------------------------------------------------------------------------------------
    def _check_not_file(self) -> None:
        path = local_path(self.url)
        if path is not None and path.is_file():
            raise UserError(f"{self.url} is a file, not an activation store (a Zarr folder); give a folder path "
                            "for --store")

    def _open_group(self, path: str | None = None, mode: Literal["r", "r+"] = "r") -> zarr.Group | None:
        """The group at `path` (None: the root), None when it does not exist; damage becomes a UserError."""
        self._check_not_file()
        try:
            return zarr.open_group(self.url, mode=mode, zarr_format=3, path=path)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeNotFoundError):
            return None
        except OSError as exc:
            msg = os_error_message(exc, f"store {self.url}", "read")
            if msg:
                raise UserError(msg) from None
            raise
        except (ValueError, TypeError, KeyError) as exc:  # zarr.json that does not parse or lacks fields
            where = f"{path}/zarr.json" if path else "zarr.json"
            raise _damaged(self.url, where, exc) from None

    def _root(self, mode: Literal["r", "r+"] = "r") -> zarr.Group:
        root = self._open_group(None, mode)
        if root is None:
            raise UserError(f"no activation store at {self.url}; create one with `fv-remote extract`")
        return root

    def exists(self) -> bool:
        try:
            return self._open_group(None) is not None
        except UserError:
            return False

    def tasks(self) -> list[str]:
        try:
            return sorted(k for k in self._root().group_keys() if not k.startswith("."))
        except (ValueError, TypeError, KeyError) as exc:
            raise _damaged(self.url, "a task group's zarr.json", exc) from None

    def has_task(self, task: str) -> bool:
        """Whether a group exists at `task` (a task name, or a nested path such as `antonym/cma`)."""
        return self._open_group(task) is not None

    def subgroups(self, task: str) -> list[str]:
        """The task's nested groups (`<task>/cma`, `<task>/attribution`, `<task>/lrp`, `<task>/residual`, ...)."""
        group = self._open_group(task)
        if group is None:
            return []
        try:
            return [f"{task}/{k}" for k in sorted(group.group_keys()) if not k.startswith(".")]
        except (ValueError, TypeError, KeyError) as exc:
            raise _damaged(self.url, f"{task}'s zarr.json", exc) from None

    def attrs(self, task: str) -> dict[str, Any]:
        return dict(self._group(task).attrs)

    def _group(self, task: str, hint: str | None = None, mode: Literal["r", "r+"] = "r") -> zarr.Group:
        group = self._open_group(task, mode)
        if group is None:
            self._root()
            have = ", ".join(self.tasks()) or "none"
            name = task.split("/")[0]
            hint = hint or f"fv-remote extract --task {name} --store {self.url}"
            raise UserError(f"store {self.url} has no {task!r} (tasks: {have}); run `{hint}` first")
        return group

    def _commit_point(self, group: zarr.Group, task: str) -> int:
        n = group.attrs.get("n_complete", 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise _damaged(self.url, f"{task}/zarr.json", ValueError(f"n_complete={n!r} is not a count"))
        return n

    def n_complete(self, task: str) -> int:
        group = self._open_group(task)
        if group is None:
            return 0
        return self._commit_point(group, task)

    def open(self, task: str, hint: str | None = None) -> xr.Dataset:
        """The group's dataset (lazy), cut to the committed prompts; `hint` is the command that creates it.

        Whatever lies past the commit point (an interrupted append, arrays of different lengths) is ignored.
        Damage inside the committed prompts (a missing chunk, an array cut short, a damaged zarr.json) is an
        error naming the task and the prompt range, never NaN or fill values read as data.
        """
        from fv_remote.store.integrity import scan

        group = self._group(task, hint)
        n = self._commit_point(group, task)
        problems = [p for p in scan(self.url, full=False, only=task).damage
                    if p.group == task and p.kind != "uncommitted"]
        if problems:
            raise UserError(f"store {self.url} is damaged: {problems[0].line()}"
                            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                            + f"; `fv-remote store repair {self.url}` drops the damaged prompts (rerun the stage "
                            "to redo them)")
        try:
            return self._open_cut(task, group, n)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - coordinates are read at open: an undecodable chunk is damage
            raise _damaged(self.url, f"task {task!r}", exc) from None

    def _open_cut(self, task: str, group: zarr.Group, n: int) -> xr.Dataset:
        lengths = {name: arr.shape[0] for name, arr in group.arrays()
                   if arr.metadata.zarr_format == 3 and (arr.metadata.dimension_names or (None,))[0] == PROMPT_DIM}
        cut = {PROMPT_DIM: slice(0, n)}
        if len(set(lengths.values())) <= 1:
            ds = xr.open_zarr(self.url, group=task, consolidated=False, zarr_format=3)
            return ds.isel(cut)
        # A half-written append: arrays of different lengths. Open each one alone, cut it, put them together.
        parts = []
        for name in lengths:
            drop = [other for other in lengths if other != name]
            part = xr.open_zarr(self.url, group=task, consolidated=False, zarr_format=3, drop_variables=drop)
            parts.append(part.isel(cut))
        ds = xr.merge(parts, compat="override", join="override", combine_attrs="override")
        return ds.set_coords([c for c in ds.data_vars if c == PROMPT_DIM])

    def require(self, ds: xr.Dataset, task: str, *names: str) -> xr.Dataset:
        """`ds` (from `open(task)`) must hold `names`: an array gone from the store is damage, not a KeyError."""
        missing = [n for n in names if n not in ds.variables]
        if missing:
            raise UserError(f"store {self.url} is damaged: {task} has no {', '.join(missing)} array; `fv-remote store "
                            f"verify {self.url}` lists the damage (rerun the stage into a new store if repair cannot "
                            "restore it)")
        return ds

    def finite_values(self, task: str, data: xr.DataArray) -> np.ndarray:
        """`data` (read from `task`) as numpy; an unreadable chunk or a NaN/inf is an error with the prompts."""
        try:
            values = np.asarray(data.values)
        except Exception as exc:  # noqa: BLE001 - a chunk that does not decode is damage, not a bug
            raise _damaged(self.url, f"{task}/{data.name}", exc) from None
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            if PROMPT_DIM in data.dims:
                axis = data.dims.index(PROMPT_DIM)
                rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
                bad = np.asarray(data[PROMPT_DIM].values)[~np.isfinite(rows).all(1)]
                where = f"prompts {describe_rows(bad)}"
            else:
                where = "its values"
            raise UserError(f"store {self.url}: {task}/{data.name} has NaN/inf in {where}; "
                            f"`fv-remote store repair {self.url}` drops them (rerun the stage to redo them)")
        return values

    # -- identity --------------------------------------------------------------------------------------------
    def store_identity(self) -> dict[str, Any]:
        """Model, revision and template of the store: recorded at the root, else (older stores) read off the
        first task group that has them."""
        root = self._open_group(None)
        if root is None:
            return {}
        recorded = dict(cast(dict, root.attrs.get("store_identity") or {}))
        if recorded:
            return recorded
        found: dict[str, Any] = {}
        for task in self.tasks():
            for path in (task, *self.subgroups(task)):
                group = self._open_group(path)
                if group is None:
                    continue
                for key in STORE_IDENTITY_KEYS:
                    if key not in found and key in group.attrs:
                        found[key] = group.attrs[key]
        return found

    def check_compatible(self, task: str, identity: dict[str, Any]) -> None:
        """Refuse to add prompts produced under other settings (another model, revision, template, seed...):
        for the store as a whole, and for the task's group."""
        stored_identity = self.store_identity()
        for key in STORE_IDENTITY_KEYS:
            if key in identity and key in stored_identity and _encode_attr(identity[key]) != stored_identity[key]:
                tasks = ", ".join(self.tasks()) or "none"
                raise UserError(
                    f"store {self.url} holds activations with {key}={stored_identity[key]!r} (tasks: {tasks}), "
                    f"not {_encode_attr(identity[key])!r}: one store holds one model, revision and template; "
                    "use another --store"
                )
        if not self.has_task(task):
            return
        stored = self.attrs(task)
        for key in IDENTITY_KEYS:
            if key in identity and key in stored and _encode_attr(identity[key]) != stored[key]:
                raise UserError(
                    f"store {self.url} task {task!r} was written with {key}={stored[key]!r}, "
                    f"not {identity[key]!r}; use another --store or the same settings"
                )

    # -- writing ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self):
        """Hold the store's writer lock (re-entrant): a second process writing the same store gets a clear error
        instead of interleaved appends. Write errors a user can fix (permissions, full disk) become one line."""
        try:
            with self._writer_lock():
                yield
        except OSError as exc:
            msg = os_error_message(exc, f"store {self.url}", "write to")
            if msg is None:
                raise
            raise UserError(msg + ("; the committed prompts are intact, rerun the same command to resume"
                                   if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "")) from None

    @contextlib.contextmanager
    def _writer_lock(self):
        path = local_path(self.url)
        if path is None:  # object stores and memory://: no cross-process lock
            yield
            return
        from filelock import FileLock, Timeout

        self._check_not_file()
        if self._lock is None:
            book = path / BOOKKEEPING
            book.mkdir(parents=True, exist_ok=True)
            if not (path / "zarr.json").exists():
                zarr.open_group(self.url, mode="a", zarr_format=3)
            if not (book / "zarr.json").exists():
                (book / "zarr.json").write_text(json.dumps({
                    "zarr_format": 3, "node_type": "group",
                    "attributes": {"fv_remote": "bookkeeping: writer lock and metadata backup"}}))
            self._lock = FileLock(str(book / "writer.lock"), timeout=0, is_singleton=True, thread_local=False)
        lock = self._lock
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise UserError(f"store {self.url} is being written by another process ({self._holder(path)}); wait for "
                            "it to finish, or use another --store") from None
        try:
            if lock.lock_counter == 1:
                holder = {"pid": os.getpid(), "command": command_line(),
                          "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
                (path / BOOKKEEPING / "writer.json").write_text(json.dumps(holder))
            yield
        finally:
            lock.release()

    def _holder(self, path: Path) -> str:
        try:
            info = json.loads((path / BOOKKEEPING / "writer.json").read_text())
            return f"pid {info['pid']}, `{info['command']}`, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "unknown process"

    def trim(self, task: str) -> int:
        """Drop rows past `n_complete` (an interrupted append). Returns the number of committed prompts."""
        with self.writing():
            if not self.has_task(task):
                return 0
            group = self._group(task, mode="r+")
            n = self._commit_point(group, task)
            for name, arr in group.arrays():
                dims = (arr.metadata.dimension_names if arr.metadata.zarr_format == 3 else None) or ()
                if dims and dims[0] == PROMPT_DIM and arr.shape[0] != n:
                    if arr.shape[0] < n:
                        raise UserError(f"store {self.url} is damaged: {task}/{name} holds {arr.shape[0]} of the "
                                        f"{n} committed prompts; run `fv-remote store repair {self.url}`")
                    arr.resize((n, *arr.shape[1:]))
            return n

    repair = trim  # the name extract/cma used before `fv-remote store repair` existed

    def _refuse_non_finite(self, task: str, batch: xr.Dataset) -> None:
        for name, var in batch.data_vars.items():
            values = np.asarray(var.values)
            if values.dtype.kind not in "fc" or np.isfinite(values).all():
                continue
            where = ""
            if var.dims and var.dims[0] == PROMPT_DIM:
                rows = values.reshape(values.shape[0], -1)
                bad = np.asarray(batch[PROMPT_DIM].values)[~np.isfinite(rows).all(1)]
                where = f" for prompts {describe_rows(bad)}"
            raise UserError(f"the model produced NaN/inf in {name!r}{where} of {task!r}; nothing of this batch was "
                            f"stored (try float32: half precision overflows on some models)")

    def append(self, task: str, batch: xr.Dataset, attrs: dict[str, Any]) -> int:
        """Append a batch along `prompt`; create the group on first use. Returns the new `n_complete`."""
        attrs = {k: _encode_attr(v) for k, v in attrs.items()}
        self._refuse_non_finite(task, batch)
        with self.writing():
            self.check_compatible(task, attrs)
            n_before = self.trim(task)
            first = batch[PROMPT_DIM].values[0] if batch.sizes.get(PROMPT_DIM) else None
            if first is not None and int(first) != n_before:
                raise UserError(f"out-of-order append to {task!r}: store has {n_before} prompts, batch starts at "
                                f"{first}")
            batch = batch.copy()
            if n_before == 0 and not self.has_task(task):
                batch.attrs = {}
                encoding = {
                    name: {"chunks": (CHUNK_PROMPTS, *var.shape[1:])}
                    for name, var in batch.data_vars.items()
                    if var.dims and var.dims[0] == PROMPT_DIM
                }
                batch.to_zarr(self.url, group=task, mode="w-", zarr_format=3, consolidated=False,
                              encoding=encoding, write_empty_chunks=True)
                group = self._group(task, mode="r+")
                group.attrs.update({**attrs, "library_version": __version__, "command": command_line(),
                                    "store_format": STORE_FORMAT,
                                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
            else:
                # xarray rewrites the group's attributes on append: hand it the current ones (old n_complete
                # included), so a crash mid-append still leaves a consistent commit point.
                batch.attrs = self.attrs(task)
                batch.to_zarr(self.url, group=task, append_dim=PROMPT_DIM, zarr_format=3, consolidated=False,
                              write_empty_chunks=True)
                group = self._group(task, mode="r+")
            n_after = n_before + batch.sizes[PROMPT_DIM]
            # Written last: this is the commit point of the batch.
            group.attrs["n_complete"] = n_after
            note_kept(f"store {self.url} {task}", f"{n_after} committed prompts of {task!r} in {self.url} (rerun "
                      "the same command to resume from there)")
            self._record_identity(attrs)
            self._backup_metadata()
        return n_after

    def _record_identity(self, attrs: dict[str, Any]) -> None:
        root = self._root(mode="r+")
        recorded = dict(cast(dict, root.attrs.get("store_identity") or {}))
        missing = {k: attrs[k] for k in STORE_IDENTITY_KEYS if k in attrs and k not in recorded}
        if missing:
            root.attrs["store_identity"] = {**self.store_identity(), **recorded, **missing}

    def _backup_metadata(self) -> None:
        from fv_remote.store.integrity import write_manifest

        write_manifest(self.url)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "identity": self.store_identity(), "tasks": {}}
        for task in self.tasks():
            for path in (task, *self.subgroups(task)):
                if path == task and self.n_complete(task) == 0 and self.subgroups(task):
                    continue  # a plain parent (e.g. only residual reads were stored for this task)
                try:
                    ds = self.open(path)
                except UserError as exc:
                    out["tasks"][path] = {"error": str(exc)}
                    continue
                attrs = self.attrs(path)
                out["tasks"][path] = {
                    "n_complete": self.n_complete(path),
                    "variables": {name: {"dims": list(v.dims), "shape": list(v.shape), "dtype": str(v.dtype)}
                                  for name, v in ds.data_vars.items()},
                    "attrs": {k: v for k, v in attrs.items() if k != "n_complete"},
                }
        return out
