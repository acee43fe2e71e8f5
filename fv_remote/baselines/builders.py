"""The vectors the field compares FVs against, from paired residual reads (`fv_remote.baselines.residuals`).

Every builder takes `icl` and `zero_shot` [N, L, d_model] (row i: the n-shot and the zero-shot prompt of the same
query, last token, block outputs) and returns one candidate per layer [L, d_model]; the fit stage chooses the layer
(and scale) on validation pairs. Pure tensor arithmetic, no model: each is checked against hand-computed answers.

- task-vector (Hendel, Geva & Globerson 2023): mean n-shot residual at layer L, *patched in* (replaces) the zero-shot
  prompt's last token at L.
- mean-diff (CAA-style, Rimsky et al. 2024): mean n-shot residual minus mean zero-shot residual at L, added.
- pca (repeng's `pca_diff`): the leading principal direction of the centred paired differences at L, signed so the
  differences project positively on average, scaled to their RMS projection; added.
- icv (in-context vectors, Liu, Ye, Xing & Zou 2023): the differences of all layers concatenated, the leading
  principal direction of the centred differences plus their mean (as the authors' code does: centring alone would
  lose the mean), split back per layer; added at every layer (or one) with a scale chosen on validation.
"""

from __future__ import annotations

import torch

from fv_remote.core.errors import UserError

METHODS = ("task-vector", "icv", "mean-diff", "pca")  # besides "fv" (fv_remote.fv)
APPLY = {"task-vector": "replace", "icv": "add", "mean-diff": "add", "pca": "add"}
PAPERS = {
    "task-vector": "Hendel, Geva & Globerson 2023, In-Context Learning Creates Task Vectors",
    "icv": "Liu, Ye, Xing & Zou 2023, In-context Vectors",
    "mean-diff": "Rimsky et al. 2024, Steering Llama 2 via Contrastive Activation Addition",
    "pca": "repeng (Vogel 2024), PCA of paired differences; Zou et al. 2023, Representation Engineering",
}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"unknown vector method {method!r}; use fv or one of {', '.join(METHODS)}")
    return method


def _check(icl: torch.Tensor, zero_shot: torch.Tensor | None = None) -> None:
    if icl.ndim != 3 or icl.shape[0] < 1:
        raise UserError(f"residual reads must be [prompts, layers, d_model], got {list(icl.shape)}")
    if zero_shot is not None and zero_shot.shape != icl.shape:
        raise UserError(f"n-shot reads {list(icl.shape)} and zero-shot reads {list(zero_shot.shape)} do not pair up")


def task_vectors(icl: torch.Tensor) -> torch.Tensor:
    """[L, d]: the mean n-shot residual per layer."""
    _check(icl)
    return icl.double().mean(0).float()


def mean_diff(icl: torch.Tensor, zero_shot: torch.Tensor) -> torch.Tensor:
    """[L, d]: mean n-shot residual minus mean zero-shot residual, per layer."""
    _check(icl, zero_shot)
    return (icl.double().mean(0) - zero_shot.double().mean(0)).float()


def leading_direction(diffs: torch.Tensor) -> torch.Tensor:
    """The unit first principal direction of the rows of `diffs` [N, D] (centred), signed so that the rows' mean
    projects on it non-negatively (a PC's sign is arbitrary; this makes the vector point from zero-shot to n-shot)."""
    if diffs.shape[0] < 2:
        raise UserError(f"a principal direction needs at least 2 paired prompts, got {diffs.shape[0]}")
    x = diffs.double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    u = vh[0]
    if float(mean @ u) < 0 or (float(mean @ u) == 0 and float((x @ u).sum()) < 0):
        u = -u
    return u


def pca_vectors(icl: torch.Tensor, zero_shot: torch.Tensor) -> torch.Tensor:
    """[L, d]: per layer the leading direction of the paired differences, times the RMS of their projections on it
    (a vector in residual-stream units; the fit stage scales it)."""
    _check(icl, zero_shot)
    diffs = (icl - zero_shot).double()
    out = []
    for layer in range(diffs.shape[1]):
        u = leading_direction(diffs[:, layer])
        rms = float((diffs[:, layer] @ u).pow(2).mean().sqrt())
        out.append(u * rms)
    return torch.stack(out).float()


def icv(icl: torch.Tensor, zero_shot: torch.Tensor) -> torch.Tensor:
    """[L, d]: the in-context vector, leading direction of all layers' differences concatenated plus their mean."""
    _check(icl, zero_shot)
    n, n_layers, d = icl.shape
    diffs = (icl - zero_shot).double().reshape(n, n_layers * d)
    vector = leading_direction(diffs) + diffs.mean(0)
    return vector.reshape(n_layers, d).float()


def build(method: str, icl: torch.Tensor, zero_shot: torch.Tensor) -> torch.Tensor:
    """The method's per-layer candidates [L, d]."""
    check_method(method)
    if method == "task-vector":
        return task_vectors(icl)
    if method == "mean-diff":
        return mean_diff(icl, zero_shot)
    if method == "pca":
        return pca_vectors(icl, zero_shot)
    return icv(icl, zero_shot)
