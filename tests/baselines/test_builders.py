"""The builders' arithmetic against answers computed by hand (no model)."""

from __future__ import annotations

import pytest
import torch

from fv_remote.baselines.builders import build, icv, leading_direction, mean_diff, pca_vectors, task_vectors
from fv_remote.core.errors import UserError


def _reads():
    # 4 paired prompts, 2 layers, d=3: n-shot = zero-shot + (1 + t_i) along e0 at layer 0, + 2 e1 at layer 1
    zero = torch.arange(24, dtype=torch.float32).reshape(4, 2, 3) / 10
    t = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    icl = zero.clone()
    icl[:, 0, 0] += 1 + t
    icl[:, 1, 1] += 2
    return icl, zero, t


def test_task_vector_is_the_mean_n_shot_residual():
    icl, _, _ = _reads()
    torch.testing.assert_close(task_vectors(icl), icl.mean(0))


def test_mean_diff_by_hand():
    icl, zero, _ = _reads()
    want = torch.zeros(2, 3)
    want[0, 0], want[1, 1] = 1.0, 2.0  # the t_i average out
    torch.testing.assert_close(mean_diff(icl, zero), want)


def test_pca_direction_sign_and_scale_by_hand():
    icl, zero, t = _reads()
    got = pca_vectors(icl, zero)
    # layer 0: the differences vary only along e0 -> direction +e0, RMS projection sqrt(mean((1 + t)^2))
    rms0 = float(((1 + t) ** 2).mean().sqrt())
    torch.testing.assert_close(got[0], torch.tensor([rms0, 0.0, 0.0]), atol=1e-6, rtol=0)
    # layer 1: constant differences (no variance): any unit direction is a PC; RMS projection <= |2 e1|
    assert float(got[1].norm()) <= 2.0 + 1e-6


def test_leading_direction_flips_to_the_mean():
    diffs = torch.tensor([[-3.0, 0.0], [-1.0, 0.0], [-2.0, 0.1]])
    u = leading_direction(diffs)
    assert float(u[0]) < 0  # the rows point along -e0, so must the direction
    with pytest.raises(UserError, match="at least 2"):
        leading_direction(diffs[:1])


def test_icv_is_leading_direction_plus_mean_over_all_layers():
    icl, zero, t = _reads()
    got = icv(icl, zero)
    # concatenated differences [N, 6]: (1 + t_i) at index 0, 2 at index 4; centred, only index 0 varies
    want = torch.zeros(2, 3)
    want[0, 0] = 1.0 + 1.0  # unit direction e0 + mean 1
    want[1, 1] = 2.0  # mean only
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_shapes_and_bad_input():
    icl, zero, _ = _reads()
    for method in ("task-vector", "icv", "mean-diff", "pca"):
        assert build(method, icl, zero).shape == (2, 3)
    with pytest.raises(UserError, match="unknown vector method"):
        build("steer", icl, zero)
    with pytest.raises(UserError, match="do not pair up"):
        mean_diff(icl, zero[:3])
    with pytest.raises(UserError, match="prompts, layers, d_model"):
        task_vectors(icl[0])
