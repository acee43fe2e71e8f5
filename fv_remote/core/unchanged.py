"""Is a kept result just its starting point? An optimisation whose best checkpoint is its initialisation (step 0 won
the validation, or every step moved it by float noise only) returns something that looks like a trained result and
is not one: a zero FFV saved as "the fine-tuned vector", an identity combiner reported as "learned".

"Equal within float noise" is `torch.allclose`'s rule with its default tolerances (rtol 1e-5, atol 1e-8 per
coordinate), in its norm form when only distances are known: ||kept - start|| <= atol * sqrt(d) + rtol * ||start||.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fv_remote.core.errors import UserError

RTOL, ATOL = 1e-5, 1e-8  # torch.allclose's defaults
ALLOW = "--allow-unchanged"


def within_noise(distance: float, start_norm: float, d: int) -> bool:
    """A kept vector `distance` away from a start of norm `start_norm` (d coordinates) equals it within noise."""
    return bool(distance <= ATOL * math.sqrt(max(d, 1)) + RTOL * start_norm)


def ffv_unchanged(out: dict[str, Any], d: int, n_valid: int) -> bool:
    """Whether a fine-tuning run (`ffv_session.run_jobs`' per-job output) kept its starting vector.

    `kept_moved` (||kept - start||) decides; a job file written before it existed falls back on the kept step:
    with validation, step 0 is the starting vector itself (it is validated before the first step)."""
    kept = out.get("kept_moved")
    if kept is not None:
        return within_noise(float(kept), float(out.get("init_norm") or 0.0), d)
    return bool(n_valid and int(out.get("best_step", -1)) == 0)


def unchanged_message(task: str, out: dict[str, Any], lr: float, steps: int) -> str:
    """The one line that refuses an unchanged FFV: why, and what to try."""
    what = f"fine-tuning {task!r}" if task else "fine-tuning"
    if int(out.get("best_step", -1)) == 0:
        why = ("no step did better on the validation pairs than the start (kept step 0 of "
               f"{len(out.get('history', {}).get('step', [])) or steps})")
        fix = f"try a smaller --lr (now {lr:g}; the steps made it worse), more --steps, or check the data"
    else:
        why = f"every step moved it by float noise only (||kept - start|| = {float(out.get('kept_moved') or 0):.3g})"
        fix = f"try a larger --lr (now {lr:g}) or more --steps, or check the data"
    return (f"{what}: the kept vector is its starting vector: {why}; {fix}; {ALLOW} keeps it on purpose (a "
            "baseline); nothing was saved")


def check_ffv_kept(task: str, out: dict[str, Any], d: int, n_valid: int, lr: float, steps: int,
                   allow: bool) -> bool:
    """Refuse (UserError) an FFV equal to its start unless `allow`; returns whether it is unchanged."""
    same = ffv_unchanged(out, d, n_valid)
    if same and not allow:
        raise UserError(unchanged_message(task, out, lr, steps))
    return same


def combiner_unchanged(comb: Any) -> bool:
    """A learned combiner that kept its starting map (identity weight, zero bias): it is the plain softmax CFV."""
    n = comb.weight.shape[0]
    return bool(torch.allclose(comb.weight.float(), torch.eye(n), rtol=RTOL, atol=ATOL)
                and torch.allclose(comb.bias.float(), torch.zeros(n), rtol=RTOL, atol=ATOL))


def weight_norms(module: Any) -> list[float]:
    """Every trainable parameter's norm: a cheap fingerprint (no copy of the weights) to tell whether training
    changed a model at all."""
    return [float(p.detach().float().norm()) for p in module.parameters()]


def check_model_trained(before: list[float], after: list[float], losses: list[float], lr: float,
                        allow: bool = False) -> None:
    """A fully fine-tuned model must have finite losses and weights that moved (graft train)."""
    if not all(math.isfinite(x) for x in losses) or not all(math.isfinite(x) for x in after):
        raise UserError(f"fine-tuning diverged (a loss or a weight is not finite): lower --lr (now {lr:g}); "
                        "nothing was saved")
    same = all(abs(a - b) <= ATOL + RTOL * abs(b) for a, b in zip(after, before))
    if same and not allow:
        raise UserError(f"the fine-tuned model equals the base model within float noise: training did not change "
                        f"it; try a larger --lr (now {lr:g}) or more --epochs; {ALLOW} keeps it; nothing was saved")


def zero_vector_note(vec: Any, path: Any) -> str | None:
    """A note for a vector that is all zeros (an FFV kept at its zero start on purpose): adding it changes nothing,
    so every "with the vector" number equals the one without."""
    v = vec.vector
    if v.numel() and not bool(v.any()) and (getattr(vec, "head_means", None) is None or not bool(vec.head_means.any())):
        return (f"{path} is all zeros (meta: unchanged={vec.meta.get('unchanged')}): steering with it changes "
                "nothing, so its columns equal the ones without it")
    return None
