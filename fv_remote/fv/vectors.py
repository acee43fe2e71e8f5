"""Function vectors: choose the top heads by AIE, project their mean outputs to the residual stream, save/load.

FV = sum over top heads of W_O[:, slot(h)] @ mean(l, h): the head's mean output placed in its own slot (zeros
elsewhere) and pushed through the output projection. The projection's bias is left out on purpose: it does not
belong to any head, and adding it once per head would scale with k. Where a family normalises the attention output
before the residual add (Gemma 2/3, OLMo 2/3), each head's projection is carried through that norm, linearised at
the layer's mean attention output, so every FV is in residual-stream units (ARCHITECTURE.md, "FV units").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from safetensors.torch import save_file

from fv_remote.core.version import __version__
from fv_remote.core.errors import UserError
from fv_remote.execution.executor import executor_of, stage_session
from fv_remote.models.loading import LoadedModel

Heads = list[tuple[int, int]]


def top_heads(aie: xr.DataArray | torch.Tensor | np.ndarray, k: int | None = 10,
              share: float | None = None) -> list[tuple[int, int, float]]:
    """Heads sorted by AIE: the top `k`, or the fewest whose positive AIE adds up to `share` of the total."""
    values = np.asarray(aie.values if isinstance(aie, xr.DataArray) else aie, dtype=np.float64)
    n_layers, n_heads = values.shape
    order = np.argsort(-values, axis=None)
    ranked = [(int(i // n_heads), int(i % n_heads), float(values.flat[i])) for i in order]
    if share is not None:
        if not 0 < share <= 1:
            raise UserError(f"--share must be in (0, 1], got {share}")
        positive = np.clip(values, 0, None)
        total = positive.sum()
        if total <= 0:
            raise UserError("no head has a positive AIE; cannot select heads by cumulative share")
        cum = np.cumsum(np.clip([r[2] for r in ranked], 0, None)) / total
        k = int(np.searchsorted(cum, share) + 1)
    if k is None or k <= 0:
        raise UserError(f"k must be a positive number of heads, got {k}")
    if k > n_layers * n_heads:
        raise UserError(f"k={k} is larger than the number of heads ({n_layers} layers x {n_heads} = "
                        f"{n_layers * n_heads})")
    return ranked[:k]


def probe_ids() -> torch.Tensor:
    """A one-token input [1, 1] for the trace a projection runs in (`traces.projection`): its values are never used,
    only the dtype and device of the activations it produces."""
    return torch.zeros(1, 1, dtype=torch.long)


def output_weight(module: Any) -> torch.Tensor:
    """The output projection as a [d_model, n_heads*head_dim] matrix (GPT-2's Conv1D stores it transposed)."""
    weight = module.weight
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def projection_plan(model: LoadedModel, means: torch.Tensor, heads: Heads) -> dict[str, Any]:
    """The plain arguments of `traces.projection.project_heads` for `heads` (envoys of `model.lm`, tensors), so the
    FV stage and the fit session build the same call."""
    ad, lm = model.adapter, model.lm
    layers = [layer for layer, _ in heads]
    plan: dict[str, Any] = dict(sites=[ad.head_site(lm, layer) for layer in layers], layers=layers,
                                heads=[head for _, head in heads],
                                means=torch.stack([means[layer, head].float() for layer, head in heads]),
                                head_width=ad.head_width, head_dim=ad.head_dim)
    if ad.has_post_attn_norm:
        plan["norms"] = [ad.post_attn_norm(lm, layer) for layer in layers]
        plan["layer_means"] = torch.stack([means[layer].reshape(-1).float() for layer in sorted(set(layers))])
        plan["norm_eps"] = ad.norm_eps
    return plan


def head_vectors(model: LoadedModel, means: torch.Tensor, heads: Heads) -> torch.Tensor:
    """Each head's mean output in residual-stream units: [len(heads), d_model].

    W_O[:, slot] @ mean, the head's share of the attention output; in post-norm families (Gemma 2/3, OLMo 2/3) then
    through the post-attention norm, linearised at the layer's mean attention output (the attention output of all
    heads' means, `traces.projection.linearised_norm`; ARCHITECTURE.md, "FV units").

    One body wherever it runs (locally, or one NDIF request whose weights stay on the server): a tiny trace calls
    each head's output projection (and norm) on its mean (`traces.projection.project_heads`, no weight read: NDIF's
    sandbox holds none); only the means travel.
    """
    if not heads:
        raise UserError("no heads to project")
    import nnsight

    from fv_remote.traces.projection import project_heads

    lm, plan, probe = model.lm, projection_plan(model, means, heads), probe_ids()
    session = executor_of(model).session
    with stage_session(model):
        with lm.trace(input_ids=probe):
            vecs = project_heads(**plan).save()
        vecs = vecs.cpu()
        if session:
            vecs = nnsight.save(vecs)
    return vecs


APPLY_META = "apply"  # meta key: "replace" for a vector patched in at the last token (task vectors), else add
DIRECTIONS_META = "directions"  # meta key of an imported control vector's further layers: {layer: list of floats}


@dataclass
class FunctionVector:
    """A steering vector plus where it came from; also the format for fine-tuned vectors (kind="ffv")."""

    vector: torch.Tensor  # [d_model]
    model: str
    task: str
    layer: int  # where to add it (the best layer of a sweep once one ran)
    heads: Heads = field(default_factory=list)
    head_means: torch.Tensor | None = None  # [k, head_dim], for distributed steering
    head_vectors: torch.Tensor | None = None  # [k, d_model]
    kind: str = "fv"
    meta: dict[str, Any] = field(default_factory=dict)
    # A vector that is patched in (meta["apply"] == "replace": task vectors) records the mean zero-shot residual at
    # its layer: what replacing takes away on average, so `vector - base` is its additive equivalent (export).
    base: torch.Tensor | None = None

    @property
    def apply(self) -> str:
        """How steering uses the vector: "add" (FVs, FFVs, ICV, mean-diff, PCA) or "replace" (task vectors)."""
        value = self.meta.get(APPLY_META) if isinstance(self.meta, dict) else None
        return "replace" if value == "replace" else "add"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"vector": self.vector.detach().float().contiguous().cpu()}
        if self.heads:
            tensors["heads"] = torch.tensor(self.heads, dtype=torch.int64)
        for name in ("head_means", "head_vectors", "base"):
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.detach().float().contiguous().cpu()
        metadata = {"model": self.model, "task": self.task, "layer": str(self.layer), "kind": self.kind,
                    "library_version": __version__, "meta": json.dumps(self.meta, default=str)}
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FunctionVector":
        """A vector file; anything inconsistent in it (a vector that is not [d_model] floats, heads that are not
        (layer, head) pairs, per-head parts of the wrong size, metadata we do not write) is a UserError naming the
        file, never an exception deep inside steering."""
        from fv_remote.core.checks import read_safetensors

        tensors, metadata = read_safetensors(path, "function-vector")
        if "vector" not in tensors or "model" not in metadata:
            from fv_remote.core.kinds import wrong_kind

            raise wrong_kind(path, "a function-vector file (no 'vector' tensor or model metadata)")
        try:
            heads = [(int(h[0]), int(h[1])) for h in tensors["heads"].tolist()] if "heads" in tensors else []
            vec = cls(vector=tensors["vector"], model=metadata["model"], task=metadata.get("task", ""),
                      layer=int(metadata.get("layer", 0)), heads=heads, head_means=tensors.get("head_means"),
                      head_vectors=tensors.get("head_vectors"), kind=metadata.get("kind", "fv"),
                      meta=json.loads(metadata.get("meta", "{}")), base=tensors.get("base"))
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError) as exc:
            raise UserError(f"{path} is not a valid function-vector file ({type(exc).__name__}: {exc})") from None
        k, v, means, per_head = len(heads), vec.vector, vec.head_means, vec.head_vectors
        problem = None
        if v.ndim != 1 or v.numel() == 0 or not v.is_floating_point():
            problem = f"its vector has shape {list(v.shape)} ({v.dtype}), not [d_model] floats"
        elif not isinstance(vec.meta, dict):
            problem = f"its 'meta' metadata is a {type(vec.meta).__name__}, not an object"
        elif k and tensors["heads"].shape[-1] != 2:  # rows parsed above: each must be exactly a pair
            problem = "its heads are not (layer, head) pairs"
        elif means is not None and (means.ndim != 2 or means.shape[0] != k):
            problem = f"head_means has shape {list(means.shape)} for {k} heads"
        elif per_head is not None and (per_head.ndim != 2 or per_head.shape[0] != k or per_head.shape[1] != v.shape[0]):
            problem = f"head_vectors has shape {list(per_head.shape)} for {k} heads"
        elif vec.base is not None and vec.base.shape != v.shape:
            problem = f"base has shape {list(vec.base.shape)}, the vector {list(v.shape)}"
        if problem:
            raise UserError(f"{path} is not a valid function-vector file: {problem}")
        return vec

    def check_model(self, model: LoadedModel) -> None:
        """Refuse a vector made for another model (a silent shape match would give meaningless numbers)."""
        if self.model != model.model_id or self.vector.shape[-1] != model.adapter.d_model:
            raise UserError(f"this {self.kind.upper()} was made for model {self.model!r} "
                            f"(d_model {self.vector.shape[-1]}), not {model.model_id!r} "
                            f"(d_model {model.adapter.d_model})")


def build_function_vector(model: LoadedModel, task: str, means: torch.Tensor, aie: xr.DataArray,
                          k: int | None = 10, share: float | None = None, layer: int | None = None,
                          meta: dict | None = None) -> FunctionVector:
    """FV from the top heads. `layer` defaults to L/3, only a starting guess: run a sweep to pick the real one.

    On NDIF the projection is one request (see `head_vectors`).
    """
    ranked = top_heads(aie, k=k, share=share)
    heads = [(layer_, head) for layer_, head, _ in ranked]
    return assemble_function_vector(model, task, means, ranked, head_vectors(model, means, heads), layer,
                                    meta)


def assemble_function_vector(model: LoadedModel, task: str, means: torch.Tensor,
                             ranked: list[tuple[int, int, float]], vecs: torch.Tensor, layer: int | None = None,
                             meta: dict | None = None) -> FunctionVector:
    """The FunctionVector of `ranked` heads (from `top_heads`) whose projected means are `vecs` [k, d_model]."""
    ad = model.adapter
    heads = [(layer_, head) for layer_, head, _ in ranked]
    vecs = vecs.float()
    layer = ad.check_layer(ad.n_layers // 3 if layer is None else layer)
    head_means = torch.stack([means[l_, h_] for l_, h_ in heads]).float()
    info = {"aie": [round(a, 6) for _, _, a in ranked], **(meta or {})}
    return FunctionVector(vector=vecs.sum(0), model=model.model_id, task=task, layer=layer, heads=heads,
                          head_means=head_means, head_vectors=vecs, meta=info)


def directions(fv: FunctionVector) -> dict[int, torch.Tensor]:
    """{layer: vector} of a vector: its own layer, plus any further layers of an imported control vector."""
    found = {int(fv.layer): fv.vector}
    extra = fv.meta.get(DIRECTIONS_META) if isinstance(fv.meta, dict) else None
    if isinstance(extra, dict):
        for layer, values in extra.items():
            found[int(layer)] = values.float() if isinstance(values, torch.Tensor) else \
                torch.tensor(values, dtype=torch.float32)
    return found
