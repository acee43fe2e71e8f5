"""Extraction into the Zarr store on a tiny model: round trip, exactly-once resume, refusal to mix settings."""

import numpy as np
import pytest
import torch

from fv_remote.data import RelationTask
from fv_remote.core.errors import UserError
from fv_remote.fv.extract import extract, mean_head_activations, trace_heads
from fv_remote.store.activations import ActivationStore

from conftest import make_tiny_model

WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
TASK = RelationTask("toy", [(a, b) for a in WORDS for b in WORDS if a < b][:60])


@pytest.fixture
def model(tiny_tokenizer):
    return make_tiny_model("llama", tiny_tokenizer)


class Interrupt(Exception):
    pass


def test_store_round_trip_equals_trace(model, tmp_path):
    store = ActivationStore(str(tmp_path / "s.zarr"))
    extract(model, TASK, store, n_prompts=6, n_shots=2, batch_size=4)
    ds = store.open("toy")
    assert dict(ds["head_out"].sizes) == {"prompt": 6, "layer": 3, "head": 4, "d_head": 16}
    texts = [str(t) for t in ds["text"].values]
    ids = [int(i) for i in ds["answer_token"].values]
    direct = trace_heads(model, texts, ids)
    np.testing.assert_allclose(ds["head_out"].values, direct["heads"][:, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(ds["answer_prob"].values, direct["answer_prob"].numpy(), rtol=1e-5)
    attrs = store.attrs("toy")
    assert attrs["model"] == "tiny-llama" and attrs["n_complete"] == 6 and "command" in attrs


def test_resume_after_interruption_writes_each_prompt_once(model, tmp_path):
    url = str(tmp_path / "r.zarr")
    reference = ActivationStore(str(tmp_path / "ref.zarr"))
    extract(model, TASK, reference, n_prompts=10, n_shots=2, batch_size=3)

    def stop_after_first_batch(done, total):
        if done >= 3:
            raise Interrupt

    store = ActivationStore(url)
    with pytest.raises(Interrupt):
        extract(model, TASK, store, n_prompts=10, n_shots=2, batch_size=3, progress=stop_after_first_batch)
    assert store.n_complete("toy") == 3
    result = extract(model, TASK, store, n_prompts=10, n_shots=2, batch_size=3)
    assert result.n_new == 7 and result.n_complete == 10
    ds, ref = store.open("toy"), reference.open("toy")
    assert list(ds["prompt"].values) == list(range(10))
    assert list(ds["query"].values) == list(ref["query"].values)
    np.testing.assert_allclose(ds["head_out"].values, ref["head_out"].values, atol=1e-6)
    # A rerun with nothing left to do adds nothing.
    assert extract(model, TASK, store, n_prompts=10, n_shots=2, batch_size=3).n_new == 0


def test_half_written_batch_is_trimmed(model, tmp_path):
    """A crash between writing arrays and committing n_complete leaves extra rows: they are dropped, then redone."""
    import zarr

    url = str(tmp_path / "h.zarr")
    store = ActivationStore(url)
    extract(model, TASK, store, n_prompts=4, n_shots=2, batch_size=4)
    group = zarr.open_group(url, mode="r+", path="toy")
    group["head_out"].resize((7, *group["head_out"].shape[1:]))  # uncommitted garbage rows
    group["correct"].resize((6,))
    extract(model, TASK, store, n_prompts=8, n_shots=2, batch_size=4)
    ds = store.open("toy")
    assert ds.sizes["prompt"] == 8 and group["head_out"].shape[0] == 8 and group["correct"].shape[0] == 8
    assert list(ds["prompt"].values) == list(range(8))


def test_refuses_other_model_or_settings(model, tiny_tokenizer, tmp_path):
    store = ActivationStore(str(tmp_path / "m.zarr"))
    extract(model, TASK, store, n_prompts=2, n_shots=2)
    with pytest.raises(UserError, match="seed"):
        extract(model, TASK, store, n_prompts=4, n_shots=2, seed=1)
    other = make_tiny_model("gpt2", tiny_tokenizer)
    with pytest.raises(UserError, match="model"):
        extract(other, TASK, store, n_prompts=4, n_shots=2)
    renamed = RelationTask("toy", list(reversed(TASK.pairs)))
    with pytest.raises(UserError, match="pairs_sha256"):
        extract(model, renamed, store, n_prompts=4, n_shots=2)


def test_fsspec_memory_url_and_mean(model):
    store = ActivationStore("memory://fv-test/s.zarr")
    extract(model, TASK, store, n_prompts=5, n_shots=2)
    ds = store.open("toy")
    mean_all = mean_head_activations(store, "toy", only_correct=False)
    np.testing.assert_allclose(mean_all.values, ds["head_out"].values.mean(0), atol=1e-6)
    correct = ds["correct"].values
    if correct.any():
        expected = ds["head_out"].values[correct].mean(0)
        np.testing.assert_allclose(mean_head_activations(store, "toy").values, expected, atol=1e-6)
    else:
        with pytest.raises(UserError, match="none of"):
            mean_head_activations(store, "toy")


def test_missing_store_and_task_messages(tmp_path):
    store = ActivationStore(str(tmp_path / "none.zarr"))
    with pytest.raises(UserError, match="fv-remote extract"):
        store.open("antonym")


def test_bad_counts(model, tmp_path):
    store = ActivationStore(str(tmp_path / "c.zarr"))
    for kwargs in ({"n_prompts": 0}, {"n_prompts": -3}, {"batch_size": 0}, {"n_shots": -1}):
        with pytest.raises(UserError):
            extract(model, TASK, store, **{"n_prompts": 2, **kwargs})
    assert torch.is_tensor(trace_heads(model, ["Q: a\nA:"], [1])["heads"])


def test_prompt_i_does_not_depend_on_run_length():
    """Resuming with a larger --n-prompts must extend the same prompt sequence, not start a different one."""
    from fv_remote.data import build_prompts

    for kind in ("clean", "shuffled", "zero_shot"):
        short = build_prompts(TASK.pairs, 5, n_shots=3, kind=kind, seed=4)
        long = build_prompts(TASK.pairs, 40, n_shots=3, kind=kind, seed=4)
        assert [p.text for p in short] == [p.text for p in long[:5]]
