"""The learned CFV combiner: an affine map z = W·(logp/T) + b over a bank's relation profile before the softmax, and
its file format (safetensors). Trained by `analogy.train_combiner`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from fv_remote.relational.bank import RelationBank
from fv_remote.core.errors import UserError


@dataclass
class Combiner:
    """Learned affine map on the temperature-scaled log-prob profile before the softmax: softmax(W·s + b)."""

    weight: torch.Tensor  # [N, N]
    bias: torch.Tensor  # [N]
    names: list[str]
    temperature: float = 1.0
    meta: dict = field(default_factory=dict)

    @classmethod
    def identity(cls, names: list[str], temperature: float = 1.0) -> "Combiner":
        n = len(names)
        return cls(torch.eye(n), torch.zeros(n), list(names), temperature)

    def logits(self, logp: torch.Tensor) -> torch.Tensor:
        return (logp / self.temperature) @ self.weight.T + self.bias

    def check_bank(self, bank: RelationBank) -> None:
        if self.names != bank.names:
            raise UserError(f"this combiner was trained on a bank with {len(self.names)} relations "
                            f"({', '.join(self.names[:4])}, ...), not this bank ({len(bank)}): retrain it")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().float().contiguous(),
                   "bias": self.bias.detach().float().contiguous()}
        save_file(tensors, str(path), metadata={"format": "fv-remote-combiner", "names": json.dumps(self.names),
                                       "temperature": str(self.temperature), "meta": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Combiner":
        from fv_remote.core.checks import read_safetensors

        t, md = read_safetensors(path, "combiner")
        if md.get("format") != "fv-remote-combiner":
            from fv_remote.core.kinds import wrong_kind

            raise wrong_kind(path, "a combiner file", "save one with `fv-remote analogy --train-combiner`")
        return cls(t["weight"], t["bias"], json.loads(md["names"]), float(md["temperature"]),
                   json.loads(md.get("meta", "{}")))
