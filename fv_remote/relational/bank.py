"""A relation bank: fine-tuned function vectors for many relations in one safetensors file.

File layout: tensors `vectors` [N, d_model] (float32) and `layers` [N] (int64); metadata `format`
("fv-remote-bank"), `model`, `names` (JSON list), `entries` (JSON list of per-relation dicts: task, category,
relation_words, layer, init, n_train, n_valid, valid_acc, trained_pairs (the hashes of the pairs it was trained
and validated on, `relational.overlap`; absent in banks from before), ...), `settings` (JSON) and `library_version`.

Vectors may sit at different layers (e.g. a bank merged from FFVs fine-tuned at each FV's own layer);
`fv-remote bank build` trains every relation at one common layer by default, so that composite vectors are
genuine single vectors and cosines between bank vectors compare like with like.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fv_remote.core.version import __version__
from fv_remote.core.errors import UserError, did_you_mean
from fv_remote.models.loading import LoadedModel
from fv_remote.fv.vectors import FunctionVector

FORMAT = "fv-remote-bank"
BUILD_HINT = "fv-remote bank build --out {path}"


@dataclass
class BankEntry:
    name: str
    vector: torch.Tensor  # [d_model]
    layer: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class RelationBank:
    """FFVs of one model, one entry per relation, in one safetensors file (`save`/`load`; `build_bank` fills it)."""

    model: str
    entries: list[BankEntry] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def vectors(self) -> torch.Tensor:
        if not self.entries:
            return torch.empty(0)
        return torch.stack([e.vector.float() for e in self.entries])

    @property
    def layers(self) -> list[int]:
        return [e.layer for e in self.entries]

    def get(self, name: str) -> BankEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise UserError(f"no relation {name!r} in the bank{did_you_mean(name, self.names)}; "
                        f"it has {len(self)}: {', '.join(self.names[:8])}{', ...' if len(self) > 8 else ''}")

    def add(self, entry: BankEntry) -> None:
        """Add or replace (same name) an entry."""
        self.entries = [e for e in self.entries if e.name != entry.name] + [entry]

    def add_vector(self, fv: FunctionVector, name: str | None = None, **meta: Any) -> None:
        if fv.model != self.model:
            raise UserError(f"vector for model {fv.model!r} cannot join a bank for {self.model!r}")
        info = {"kind": fv.kind, **{k: v for k, v in fv.meta.items() if k in ("init", "n_train", "n_valid",
                                                                             "best_valid_acc", "best_valid_loss",
                                                                             "best_step", "trained_pairs")}, **meta}
        self.add(BankEntry(name or fv.task, fv.vector.detach().float().clone(), int(fv.layer), info))

    def function_vector(self, name: str) -> FunctionVector:
        """One entry as an FFV (steer with it, evaluate it, decode it)."""
        entry = self.get(name)
        return FunctionVector(vector=entry.vector, model=self.model, task=entry.name, layer=entry.layer,
                              kind="ffv", meta=dict(entry.meta))

    def check_model(self, model: LoadedModel) -> None:
        d = self.vectors.shape[-1] if self.entries else model.adapter.d_model
        if self.model != model.model_id or d != model.adapter.d_model:
            raise UserError(f"this bank was built for model {self.model!r} (d_model {d}), not {model.model_id!r} "
                            f"(d_model {model.adapter.d_model}); build one for it with "
                            f"`fv-remote bank build --model {model.name} --out BANK.safetensors`")
        for entry in self.entries:
            model.adapter.check_layer(entry.layer)

    def require_entries(self, path: str | Path = "BANK.safetensors") -> "RelationBank":
        if not self.entries:
            raise UserError(f"the relation bank {path} is empty; build one with `{BUILD_HINT.format(path=path)}`")
        return self

    def save(self, path: str | Path) -> Path:
        if self.entries:
            tensors = {"vectors": self.vectors.contiguous(),
                       "layers": torch.tensor(self.layers, dtype=torch.int64)}
        else:
            tensors = {"vectors": torch.zeros(0, 1), "layers": torch.zeros(0, dtype=torch.int64)}
        metadata = {"format": FORMAT, "model": self.model, "names": json.dumps(self.names),
                    "entries": json.dumps([e.meta for e in self.entries], default=str),
                    "settings": json.dumps(self.settings, default=str), "library_version": __version__}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        return tmp.replace(path)  # a crash mid-write never leaves a half-written bank; `_add` notes it as kept

    @classmethod
    def load(cls, path: str | Path, require: bool = True) -> "RelationBank":
        """Read a bank; `require` refuses a missing or empty one with the command that builds it."""
        from fv_remote.core.checks import read_safetensors

        path = Path(path)
        if not path.exists():
            raise UserError(f"no relation bank at {path}; build one with `{BUILD_HINT.format(path=path)}`")
        tensors, metadata = read_safetensors(path, "relation-bank")
        if metadata.get("format") != FORMAT or "vectors" not in tensors:
            from fv_remote.core.kinds import wrong_kind

            raise wrong_kind(path, "a relation bank", "add a single vector to a bank with `fv-remote bank build`"
                             if "vector" in tensors else "")
        try:
            names = json.loads(metadata.get("names", "[]"))
            metas = json.loads(metadata.get("entries", "[]"))
            settings = json.loads(metadata.get("settings", "{}"))
            vectors, layers = tensors["vectors"], tensors["layers"].tolist()
            if not isinstance(names, list) or vectors.ndim != 2 or len(layers) != vectors.shape[0] or \
                    (names and len(names) != vectors.shape[0]) or not isinstance(metas, list):
                raise ValueError("names, vectors and layers do not match")
            entries = [BankEntry(str(n), vectors[i], int(layers[i]), metas[i] if i < len(metas) else {})
                       for i, n in enumerate(names)]
            bank = cls(str(metadata["model"]), entries, settings if isinstance(settings, dict) else {})
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
            raise UserError(f"{path} is a damaged relation bank ({type(exc).__name__}: {exc})") from None
        for entry in entries:
            if not torch.isfinite(entry.vector).all():
                raise UserError(f"{path}: the vector of relation {entry.name!r} has NaN/inf values; rebuild it "
                                f"(`{BUILD_HINT.format(path=path)}` after removing the file)")
        return bank.require_entries(path) if require else bank


def info(bank: RelationBank) -> dict[str, Any]:
    """A summary for `fv-remote bank info --json` (`trained_pairs`: how many pairs an entry records having been
    trained and validated on, `relational.overlap`; None for entries built before the record)."""
    from fv_remote.relational.overlap import n_recorded

    rows = []
    for e in bank.entries:
        rows.append({"name": e.name, "layer": e.layer, "norm": round(float(e.vector.norm()), 4),
                     "category": e.meta.get("category", ""), "n_train": e.meta.get("n_train"),
                     "valid_acc": e.meta.get("best_valid_acc"),
                     "zero_shot_valid_acc": e.meta.get("zero_shot_valid_acc"),
                     "init": e.meta.get("init"), "relation_words": e.meta.get("relation_words", []),
                     "trained_pairs": n_recorded(e.meta)})  # None: built before the record (overlap unknown)
    return {"model": bank.model, "n": len(bank), "d_model": int(bank.vectors.shape[-1]) if bank.entries else None,
            "layers": sorted(set(bank.layers)), "settings": bank.settings, "entries": rows}
