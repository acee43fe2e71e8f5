"""Store integrity: readers stop at the commit point; damage is found (`store verify`), reported with the task and
prompt range, and undone (`store repair`) with every committed prompt bit-identical; one store, one model; one
writer at a time; a write killed or failing at any point leaves a store that reads and resumes exactly."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from fv_remote.data import PromptTemplate, RelationTask
from fv_remote.core.errors import UserError
from fv_remote.fv.extract import extract, mean_heads_tensor
from fv_remote.store.integrity import scan
from fv_remote.store.activations import ActivationStore

from support.cli_harness import invoke, one_error_line, save_tiny_model

WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
PAIRS = [(a, b) for a in WORDS for b in WORDS if a < b][:60]
TASK = RelationTask("toy", PAIRS)
N = 40  # two chunks of 32 prompts: chunk 0 holds prompts 0-31, chunk 1 prompts 32-39
SETTINGS = dict(n_shots=2, batch_size=8)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model folder, its dataset file, and a reference store of N prompts (never modified)."""
    from fv_remote.models.loading import load_model

    root = tmp_path_factory.mktemp("integrity")
    folder = save_tiny_model(root / "tiny")
    data = root / "toy.json"
    data.write_text(json.dumps([{"input": a, "output": b} for a, b in PAIRS]))
    model = load_model(str(folder))
    ref = root / "ref.zarr"
    extract(model, TASK, ActivationStore(str(ref)), n_prompts=N, **SETTINGS)
    ref48 = root / "ref48.zarr"
    extract(model, TASK, ActivationStore(str(ref48)), n_prompts=48, **SETTINGS)
    return {"root": root, "model": model, "folder": str(folder), "data": str(data), "ref": ref, "ref48": ref48}


def fresh(env, tmp_path, name="s.zarr") -> Path:
    target = tmp_path / name
    shutil.copytree(env["ref"], target)
    return target


def snapshot(path, group="toy") -> dict[str, np.ndarray]:
    ds = ActivationStore(str(path)).open(group)
    return {name: np.asarray(var.values) for name, var in ds.variables.items()}


def assert_identical(a: dict, b: dict, n: int | None = None) -> None:
    assert set(a) == set(b)
    for name in a:
        x, y = a[name], b[name]
        if n is not None and x.ndim and name not in ("layer", "head", "position"):
            x, y = x[:n], y[:n]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype.kind in "fiub":
            assert x.tobytes() == y.tobytes(), name  # bit-identical, not just close
        else:
            assert list(x) == list(y), name


def cli_extract(env, store, n=N):
    return invoke("extract", "-t", env["data"], "-s", store, "-m", env["folder"], "--n-prompts", n, "--n-shots", 2,
                  "--batch-size", 8)


def chunk(store: Path, array: str, index: int) -> Path:
    files = sorted(p for p in (store / "toy" / array / "c").rglob("*") if p.is_file())
    return [p for p in files if p.relative_to(store / "toy" / array / "c").parts[0] == str(index)][0]


# --- a half-written append ------------------------------------------------------------------------------------


def half_written_append(store: Path) -> None:
    """What a run killed mid-append (or a full disk) leaves: arrays grown to different lengths, rows never
    committed, some filled with garbage."""
    group = zarr.open_group(str(store), mode="r+", path="toy")
    head = group["head_out"]
    head.resize((N + 8, *head.shape[1:]))
    head[N:] = np.full((8, *head.shape[1:]), 7.0, dtype=head.dtype)
    group["correct"].resize((N + 5,))
    group["answer_prob"].resize((N + 3,))


def test_half_written_append_is_invisible_then_repaired(env, tmp_path):
    store = fresh(env, tmp_path)
    before = snapshot(store)
    half_written_append(store)
    # Every reader reads up to the commit point.
    assert_identical(snapshot(store), before)
    means = mean_heads_tensor(ActivationStore(str(store)), "toy", only_correct=False)
    assert torch_finite(means)
    info = invoke("store", "info", store)
    assert info.code == 0 and not info.traceback, info.describe()
    assert "40 prompts" in info.stdout and "past the commit point" in info.stderr
    # verify flags it, repair drops exactly the uncommitted rows and says so.
    check = invoke("store", "verify", store)
    one_error_line(check, "store repair")
    assert "past the commit point" in check.stdout and "prompts 40-47" in check.stdout
    fixed = invoke("store", "repair", store)
    assert fixed.code == 0, fixed.describe()
    assert "uncommitted" in fixed.stdout and "head_out" in fixed.stdout
    assert invoke("store", "verify", store).code == 0
    assert_identical(snapshot(store), before)
    # ... and a resumed run continues bit-identically to one that was never interrupted.
    assert cli_extract(env, store, 48).code == 0
    assert_identical(snapshot(store), snapshot(env["ref48"]))


def torch_finite(t) -> bool:
    import torch

    return bool(torch.isfinite(t).all())


# --- a deleted chunk -------------------------------------------------------------------------------------------


def test_deleted_chunk_is_an_error_with_the_prompt_range_then_repaired(env, tmp_path):
    store = fresh(env, tmp_path)
    before = snapshot(store)
    chunk(store, "head_out", 1).unlink()  # prompts 32-39
    s = ActivationStore(str(store))
    with pytest.raises(UserError, match=r"toy.*head_out.*prompts 32-39"):
        s.open("toy")
    with pytest.raises(UserError, match="store repair"):
        mean_heads_tensor(s, "toy", only_correct=False)  # was: a NaN mean, and `fit` saved an FV of norm nan
    one_error_line(invoke("store", "info", store), "store repair")
    check = invoke("store", "verify", store)
    one_error_line(check)
    assert "head_out: chunk file(s) missing [prompts 32-39]" in check.stdout
    fixed = invoke("store", "repair", store)
    assert fixed.code == 0 and "dropped committed prompts 32-39" in fixed.stdout, fixed.describe()
    assert invoke("store", "verify", store).code == 0
    assert s.n_complete("toy") == 32
    assert_identical(snapshot(store), before, n=32)
    assert cli_extract(env, store).code == 0  # the rerun redoes the dropped prompts
    assert_identical(snapshot(store), before)


# --- truncated metadata ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", ["toy/head_out/zarr.json", "toy/zarr.json", "zarr.json"])
def test_truncated_zarr_json_is_restored_with_every_prompt(env, tmp_path, doc):
    store = fresh(env, tmp_path)
    before = snapshot(store)
    meta = store / doc
    meta.write_bytes(meta.read_bytes()[:25])
    for args in (("store", "info", store), ("cma", "-t", env["data"], "-s", store, "-m", env["folder"])):
        one_error_line(invoke(*args), "store")
    check = invoke("store", "verify", store)
    one_error_line(check)
    assert f"{doc} is not valid JSON" in check.stdout and "backup can restore it" in check.stdout
    fixed = invoke("store", "repair", store)
    assert fixed.code == 0 and f"restored {doc}" in fixed.stdout, fixed.describe()
    assert invoke("store", "verify", store).code == 0
    assert_identical(snapshot(store), before)  # all 40 committed prompts, bit for bit


def test_deleted_array_metadata_is_restored(env, tmp_path):
    store = fresh(env, tmp_path)
    before = snapshot(store)
    (store / "toy" / "answer_prob" / "zarr.json").unlink()
    one_error_line(invoke("store", "verify", store))
    assert invoke("store", "repair", store).code == 0
    assert_identical(snapshot(store), before)


# --- NaN / inf -------------------------------------------------------------------------------------------------


def test_non_finite_values_are_reported_and_never_used(env, tmp_path):
    store = fresh(env, tmp_path)
    before = snapshot(store)
    group = zarr.open_group(str(store), mode="r+", path="toy")
    row = np.asarray(group["head_out"][5])
    row[0, 0, 0] = np.nan
    group["head_out"][5] = row
    s = ActivationStore(str(store))
    with pytest.raises(UserError, match=r"NaN/inf in prompts 5\b"):
        mean_heads_tensor(s, "toy", only_correct=False)
    check = invoke("store", "verify", store)
    one_error_line(check)
    assert "NaN/inf values in prompts 5" in check.stdout
    fixed = invoke("store", "repair", store)
    assert "dropped committed prompts 5-39" in fixed.stdout, fixed.describe()
    assert_identical(snapshot(store), before, n=5)


def test_append_refuses_non_finite_batches(env, tmp_path):
    store = fresh(env, tmp_path)
    s = ActivationStore(str(store))
    batch = s.open("toy").isel(prompt=slice(0, 2)).load().assign_coords(prompt=[N, N + 1])
    batch["head_out"][1, 0, 0, 0] = np.inf
    with pytest.raises(UserError, match=r"NaN/inf in 'head_out' for prompts 41 of 'toy'; nothing"):
        s.append("toy", batch, s.attrs("toy"))
    assert s.n_complete("toy") == N and zarr.open_group(str(store), path="toy")["head_out"].shape[0] == N


# --- one store, one model; one writer ---------------------------------------------------------------------------


def test_store_refuses_a_task_from_another_model_or_template(env, tmp_path, tiny_tokenizer):
    from conftest import make_tiny_model

    store = ActivationStore(str(fresh(env, tmp_path)))
    other_task = RelationTask("other", list(reversed(PAIRS)))
    other_model = make_tiny_model("gpt2", tiny_tokenizer)
    with pytest.raises(UserError, match="holds activations with model="):
        extract(other_model, other_task, store, n_prompts=2, n_shots=2)
    with pytest.raises(UserError, match="template"):
        extract(env["model"], other_task, store, n_prompts=2, n_shots=2,
                template=PromptTemplate(query="Input: {x}\nOutput:"))
    assert store.tasks() == ["toy"]
    extract(env["model"], other_task, store, n_prompts=2, n_shots=2)  # same model and template: fine
    assert store.store_identity()["model"] == env["folder"]


def test_second_writer_gets_a_clear_message(env, tmp_path):
    store = fresh(env, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom fv_remote.store.activations import ActivationStore\n"
         f"s = ActivationStore({str(store)!r}); cm = s.writing(); cm.__enter__()\n"
         "print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_error_line(cli_extract(env, store, 48), "being written by another process", f"pid {holder.pid}")
        assert "another --store" in line
        assert ActivationStore(str(store)).n_complete("toy") == N  # readers are never blocked
    finally:
        holder.kill()
        holder.wait()
    assert cli_extract(env, store, 48).code == 0


def test_store_written_before_these_checks(env, tmp_path, tiny_tokenizer):
    """An older store (no .fv-remote/ backup, no recorded identity, empty chunks not stored) still verifies, reads
    and resumes; its identity is taken from its tasks, so another model is still refused."""
    from conftest import make_tiny_model

    store = fresh(env, tmp_path)
    shutil.rmtree(store / ".fv-remote")
    root = zarr.open_group(str(store), mode="r+")
    del root.attrs["store_identity"]
    group = zarr.open_group(str(store), mode="r+", path="toy")
    del group.attrs["store_format"]
    check = invoke("store", "verify", store)
    assert check.code == 0 and "no metadata backup" in check.stdout, check.describe()
    s = ActivationStore(str(store))
    with pytest.raises(UserError, match="holds activations with model="):
        extract(make_tiny_model("gpt2", tiny_tokenizer), RelationTask("b", PAIRS), s, n_prompts=2, n_shots=2)
    assert cli_extract(env, store, 48).code == 0
    assert_identical(snapshot(store), snapshot(env["ref48"]))
    assert (store / ".fv-remote" / "manifest.json").is_file() and s.store_identity()["model"] == env["folder"]


# --- faults at every write ---------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands for a process killed at that instant (not an Exception: nothing may catch it)."""


def count_writes(monkeypatch, fail_at: int | None, exc: BaseException | None = None) -> dict:
    """Patch every write the store makes (zarr's and the metadata backup's); the `fail_at`-th raises `exc`."""
    from zarr.storage import LocalStore

    from fv_remote.store import integrity

    state = {"n": 0}
    real_set, real_write = LocalStore.set, integrity.Files.write

    def tick():
        state["n"] += 1
        if fail_at is not None and state["n"] == fail_at:
            raise exc or Killed()

    async def set_(self, key, value):
        tick()
        return await real_set(self, key, value)

    def write(self, key, data):
        tick()
        return real_write(self, key, data)

    monkeypatch.setattr(LocalStore, "set", set_)
    monkeypatch.setattr(integrity.Files, "write", write)
    return state


def test_killed_at_every_write_boundary_resumes_bit_identical(env, tmp_path, monkeypatch):
    """Extend a 40-prompt store to 48; die at the k-th write for every k: the store always reads its committed
    prompts, verify finds nothing worse than an uncommitted append, and the resumed run equals an uninterrupted one."""
    model, reference = env["model"], snapshot(env["ref48"])
    with monkeypatch.context() as m:
        state = count_writes(m, None)
        extract(model, TASK, ActivationStore(str(fresh(env, tmp_path, "count.zarr"))), n_prompts=48, **SETTINGS)
    total = state["n"]
    assert total >= 10
    for k in range(1, total + 1):
        store = fresh(env, tmp_path, f"k{k}.zarr")
        s = ActivationStore(str(store))
        with monkeypatch.context() as m:
            count_writes(m, k)
            with pytest.raises(Killed):
                extract(model, TASK, s, n_prompts=48, **SETTINGS)
        n = s.n_complete("toy")
        assert n in (N, 48), k
        assert_identical(snapshot(store), reference, n=n)
        assert {p.kind for p in scan(str(store)).damage} <= {"uncommitted"}, (k, scan(str(store)).damage)
        extract(model, TASK, s, n_prompts=48, **SETTINGS)
        assert_identical(snapshot(store), reference)
        assert not scan(str(store)).damage
        shutil.rmtree(store)


def test_cma_killed_at_every_write_boundary_resumes_bit_identical(env, tmp_path, monkeypatch):
    """The same for `cma` (one append per prompt): 1 stored prompt extended to 3, a death at every write."""
    from fv_remote.fv.cma import run_cma
    from fv_remote.data.tasks import prepare_task

    model = env["model"]
    prepared = prepare_task(model.tokenizer, TASK)
    base = fresh(env, tmp_path, "base.zarr")
    means = mean_heads_tensor(ActivationStore(str(base)), "toy", only_correct=False)
    run_cma(model, prepared, ActivationStore(str(base)), means, n_prompts=1, n_shots=2)
    ref = tmp_path / "ref.zarr"
    shutil.copytree(base, ref)
    with monkeypatch.context() as m:
        state = count_writes(m, None)
        run_cma(model, prepared, ActivationStore(str(ref)), means, n_prompts=3, n_shots=2)
    reference = snapshot(ref, "toy/cma")
    for k in range(1, state["n"] + 1):
        store = tmp_path / f"c{k}.zarr"
        shutil.copytree(base, store)
        s = ActivationStore(str(store))
        with monkeypatch.context() as m:
            count_writes(m, k)
            with pytest.raises(Killed):
                run_cma(model, prepared, s, means, n_prompts=3, n_shots=2)
        n = s.n_complete("toy/cma")
        assert 1 <= n <= 3, k
        assert_identical(snapshot(store, "toy/cma"), reference, n=n)
        assert {p.kind for p in scan(str(store)).damage} <= {"uncommitted"}, (k, scan(str(store)).damage)
        run_cma(model, prepared, s, means, n_prompts=3, n_shots=2)
        assert_identical(snapshot(store, "toy/cma"), reference)
        shutil.rmtree(store)


@pytest.mark.parametrize("code,needle", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"),
                                         (errno.EACCES, "permission denied")])
def test_disk_full_or_read_only_is_one_line_and_keeps_the_store(env, tmp_path, monkeypatch, code, needle):
    store = fresh(env, tmp_path)
    exc = PermissionError(code, os.strerror(code)) if code == errno.EACCES else OSError(code, os.strerror(code))
    with monkeypatch.context() as m:
        count_writes(m, 3, exc)
        one_error_line(cli_extract(env, store, 48), needle, str(store))
    assert ActivationStore(str(store)).n_complete("toy") == N
    assert_identical(snapshot(store), snapshot(env["ref"]))
    assert cli_extract(env, store, 48).code == 0
    assert_identical(snapshot(store), snapshot(env["ref48"]))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder(env, tmp_path):
    store = fresh(env, tmp_path)
    for p in [store, *store.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        one_error_line(cli_extract(env, store, 48), "permission denied")
        assert invoke("store", "info", store).code == 0  # reading a read-only store is fine
    finally:
        for p in [store, *store.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_sigkill_mid_run_then_resume(env, tmp_path):
    """A real SIGKILL of `fv-remote extract` after its first commit: the store reads, verifies, and resumes."""
    store = tmp_path / "kill.zarr"
    code = "from fv_remote.cli.app import main; main()"
    args = ["extract", "-t", env["data"], "-s", str(store), "-m", env["folder"], "--n-prompts", "48", "--n-shots",
            "2", "--batch-size", "1"]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    s = ActivationStore(str(store))
    deadline = time.time() + 120
    while time.time() < deadline and (not (store / "toy" / "zarr.json").exists() or s.n_complete("toy") < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n = s.n_complete("toy")
    assert 3 <= n <= 48
    assert_identical(snapshot(store), snapshot(env["ref48"]), n=n)
    assert {p.kind for p in scan(str(store)).damage} <= {"uncommitted"}
    assert cli_extract(env, store, 48).code == 0
    assert_identical(snapshot(store), snapshot(env["ref48"]))


# --- paths that are not stores -----------------------------------------------------------------------------------


def test_plain_file_and_corrupt_metadata_are_one_line(env, tmp_path):
    plain = tmp_path / "plain.zarr"
    plain.write_text("not a store")
    for args in (("store", "info", plain), ("store", "verify", plain), ("store", "repair", plain)):
        one_error_line(invoke(*args), "is a file")
    one_error_line(cli_extract(env, plain), "is a file")
    assert plain.read_text() == "not a store"
    one_error_line(invoke("store", "verify", tmp_path / "none.zarr"), "no activation store")
