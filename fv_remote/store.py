"""The activation store: Zarr v3 through xarray, one group per task, appended one batch of prompts at a time.

Resumability: after every appended batch the group's attribute `n_complete` is advanced. A run that dies halfway
through a batch leaves arrays longer than `n_complete`; the next open trims them back, so each prompt is stored
exactly once. Any fsspec URL works (local path, memory://, s3://, gs://).
"""

from __future__ import annotations

import datetime as _dt
import json
import shlex
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
import zarr

from fv_remote import __version__
from fv_remote.errors import UserError

PROMPT_DIM = "prompt"
CHUNK_PROMPTS = 32
# Settings that must match for a rerun to append to an existing group (otherwise the data would mix).
IDENTITY_KEYS = ("model", "n_layers", "n_heads", "head_dim", "task", "pairs_sha256", "n_shots", "seed", "template",
                 "positions")


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


@dataclass
class ActivationStore:
    """A Zarr store (path or fsspec URL) holding one group per task."""

    url: str

    # -- reading ---------------------------------------------------------------------------------------------
    def _root(self, mode: str = "r") -> zarr.Group:
        try:
            return zarr.open_group(self.url, mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeNotFoundError):
            raise UserError(f"no activation store at {self.url}; create one with `fv-remote extract`") from None

    def exists(self) -> bool:
        try:
            zarr.open_group(self.url, mode="r", zarr_format=3)
            return True
        except Exception:  # noqa: BLE001 - any failure to open means "not a store yet"
            return False

    def tasks(self) -> list[str]:
        return sorted(self._root().group_keys())

    def has_task(self, task: str) -> bool:
        """Whether a group exists at `task` (a task name, or a nested path such as `antonym/cma`)."""
        try:
            zarr.open_group(self.url, mode="r", zarr_format=3, path=task)
            return True
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeNotFoundError):
            return False

    def attrs(self, task: str) -> dict[str, Any]:
        return dict(self._group(task).attrs)

    def _group(self, task: str, hint: str | None = None) -> zarr.Group:
        root = self._root()
        if not self.has_task(task):
            have = ", ".join(sorted(root.group_keys())) or "none"
            name = task.split("/")[0]
            hint = hint or f"fv-remote extract --task {name} --store {self.url}"
            raise UserError(f"store {self.url} has no {task!r} (tasks: {have}); run `{hint}` first")
        return zarr.open_group(self.url, mode="r", zarr_format=3, path=task)

    def n_complete(self, task: str) -> int:
        if not self.has_task(task):
            return 0
        return int(self._group(task).attrs.get("n_complete", 0))

    def open(self, task: str, hint: str | None = None) -> xr.Dataset:
        """The group's dataset (lazy), cut to the completed prompts; `hint` is the command that creates it."""
        self._group(task, hint)
        ds = xr.open_zarr(self.url, group=task, consolidated=False, zarr_format=3)
        return ds.isel({PROMPT_DIM: slice(0, self.n_complete(task))})

    # -- writing ---------------------------------------------------------------------------------------------
    def check_compatible(self, task: str, identity: dict[str, Any]) -> None:
        """Refuse to append prompts produced under other settings (another model, seed, template...)."""
        if not self.has_task(task):
            return
        stored = self.attrs(task)
        for key in IDENTITY_KEYS:
            if key in identity and key in stored and _encode_attr(identity[key]) != stored[key]:
                raise UserError(
                    f"store {self.url} task {task!r} was written with {key}={stored[key]!r}, "
                    f"not {identity[key]!r}; use another --store or the same settings"
                )

    def repair(self, task: str) -> int:
        """Trim arrays that grew past `n_complete` (an interrupted append). Returns the number of prompts kept."""
        if not self.has_task(task):
            return 0
        group = zarr.open_group(self.url, mode="r+", zarr_format=3, path=task)
        n = int(group.attrs.get("n_complete", 0))
        for _, arr in group.arrays():
            dims = arr.metadata.dimension_names or ()
            if dims and dims[0] == PROMPT_DIM and arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
        return n

    def append(self, task: str, batch: xr.Dataset, attrs: dict[str, Any]) -> int:
        """Append a batch along `prompt`; create the group on first use. Returns the new `n_complete`."""
        attrs = {k: _encode_attr(v) for k, v in attrs.items()}
        n_before = self.repair(task)
        first = batch[PROMPT_DIM].values[0] if batch.sizes.get(PROMPT_DIM) else None
        if first is not None and int(first) != n_before:
            raise UserError(f"out-of-order append to {task!r}: store has {n_before} prompts, batch starts at {first}")
        batch = batch.copy()
        if n_before == 0 and not self.has_task(task):
            batch.attrs = {}
            encoding = {
                name: {"chunks": (CHUNK_PROMPTS, *var.shape[1:])}
                for name, var in batch.data_vars.items()
                if var.dims and var.dims[0] == PROMPT_DIM
            }
            batch.to_zarr(self.url, group=task, mode="w-", zarr_format=3, consolidated=False, encoding=encoding)
            group = zarr.open_group(self.url, mode="r+", zarr_format=3, path=task)
            group.attrs.update({**attrs, "library_version": __version__, "command": command_line(),
                                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        else:
            # xarray rewrites the group's attributes on append: hand it the current ones (old n_complete
            # included), so a crash mid-append still leaves a consistent commit point.
            batch.attrs = self.attrs(task)
            batch.to_zarr(self.url, group=task, append_dim=PROMPT_DIM, zarr_format=3, consolidated=False)
            group = zarr.open_group(self.url, mode="r+", zarr_format=3, path=task)
        n_after = n_before + batch.sizes[PROMPT_DIM]
        # Written last: this is the commit point of the batch.
        group.attrs["n_complete"] = n_after
        return n_after

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "tasks": {}}
        for task in self.tasks():
            ds = self.open(task)
            attrs = self.attrs(task)
            out["tasks"][task] = {
                "n_complete": self.n_complete(task),
                "variables": {name: {"dims": list(v.dims), "shape": list(v.shape), "dtype": str(v.dtype)}
                              for name, v in ds.data_vars.items()},
                "attrs": {k: v for k, v in attrs.items() if k != "n_complete"},
            }
        return out


def summary_json(store: ActivationStore) -> str:
    return json.dumps(store.summary(), indent=2, default=str)
