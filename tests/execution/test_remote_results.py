"""What each remote stage's request sends back through the loopback NDIF server: exactly the values its client code
reads, nothing else.

Like NDIF, the loopback server returns every variable of a session body whose object was marked saved, matched by
object id: a KV cache, hidden states or the last batch's logits saved only to leave a trace come back too unless the
body clears them, and ids of freed saved objects get reused, so any leftover variable may come back on a real
server (e.g. the last batch's logits once `.cpu()` copied the saved tensor off the GPU). Per stage (see
`remote_catalog.STAGES`) this checks the returned names, that the body left no variable it created holding an
object besides those, and that the remote result equals the local one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from support.remote_catalog import STAGES, Stage, expected_per_request, harness, measure, returned_values

TOL = 1e-4


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    with harness(tmp_path_factory.mktemp("remote-results")) as env:
        yield env


def _same(got, want, path: str = "result") -> None:
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=lambda m: f"{path}: {m}")
    elif isinstance(want, np.ndarray):
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=path)
        else:
            assert (got == want).all(), path
    elif dataclasses.is_dataclass(want):
        _same(dataclasses.asdict(got), dataclasses.asdict(want), path)
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            _same(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert abs(got - want) <= TOL or (np.isnan(got) and np.isnan(want)), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_stage_returns_exactly_what_it_reads(h, stage: Stage):
    m = measure(h, stage)
    assert len(m.names) == stage.n_requests, f"{stage.name}: {len(m.names)} requests"
    for i, (names, left, expected) in enumerate(zip(m.names, m.left, expected_per_request(stage))):
        assert names == expected, f"{stage.name}, request {i}: returned {m.values[i]}"
        assert set(left) <= expected, f"{stage.name}, request {i}: the body left {left} bound"
    _same(m.result, stage.run(h, False))


def test_a_leftover_saved_value_is_caught(h):
    """The check itself: a body that keeps the KV cache and logits it saved to leave a trace sends them back, and
    the job reports them as left bound."""
    import nnsight

    from fv_remote.execution import NDIF, stage_session

    h.server.reset()
    lm = h.remote.lm
    ids = torch.tensor([[1, 2, 3]])
    with stage_session(h.remote.using(NDIF())):
        with lm.trace(input_ids=ids, use_cache=True):
            cache = lm.output.past_key_values.save()
            logits = lm.output.logits[:, -1].save()
        top = logits.argmax(-1).cpu()
        top = nnsight.save(top)
    job = h.server.jobs[-1]
    assert set(returned_values(job)) == {"top", "cache", "logits"}
    assert set(job.left_locals) == {"top", "cache", "logits"}
    assert top.shape == (1,) and cache is not None
