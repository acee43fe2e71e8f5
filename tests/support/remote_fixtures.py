"""Shared set-up for the remote tests: the tiny model named like a hosted repo, a fake Hugging Face Hub cache holding
the repo's config and tokenizer (what a remote user downloads; no weights), a loopback NDIF server hosting a copy of
the local model with its real weights, and the client pointed at that server."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import make_tiny_model
from .loopback_ndif import LoopbackNDIF


def hosted_tiny_model(tokenizer: Any, repo: str) -> Any:
    """The tiny llama (seed 3) with real weights, named like the hosted repo (so FVs made here fit the remote copy)."""
    return dataclasses.replace(make_tiny_model("llama", tokenizer, seed=3), name=repo)


def write_hub_cache(root: str | Path, repo: str, hf: Any, tokenizer: Any) -> str:
    """Write `repo`'s config (from the HF model `hf`) and `tokenizer` as a Hub cache snapshot under `root`."""
    root = Path(root)
    commit = hashlib.sha1(repo.encode()).hexdigest()
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    hf.config.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    return str(root)


def print_sizes(sizes: dict[str, tuple[int, int]]) -> None:
    """The per-stage payload/result size table (shown with pytest -s)."""
    width = max(len(k) for k in sizes) if sizes else 10
    print("\nloopback NDIF, per stage: payload bytes / result bytes")
    for stage, (payload, result) in sizes.items():
        print(f"  {stage:<{width}}  {payload:>8,}  {result:>8,}")


@contextlib.contextmanager
def serve_copy(local_model: Any, tokenizer: Any, repo: str, hang_s: float = 1.0,
               sizes: dict[str, tuple[int, int]] | None = None) -> Iterator[LoopbackNDIF]:
    """A loopback NDIF server hosting a deep copy of `local_model` as `repo`; on exit, the `sizes` table if given."""
    from fv_remote.models.loading import wrap_model

    hosted = wrap_model(copy.deepcopy(local_model.hf), tokenizer, name=repo)
    with LoopbackNDIF({repo: hosted.lm}, hang_s=hang_s) as srv:
        yield srv
    if sizes is not None:
        print_sizes(sizes)


def point_client_at(server: LoopbackNDIF, monkeypatch: Any, hub_cache: str, jobs_dir: Path | None = None
                    ) -> LoopbackNDIF:
    """Per test: reset `server`, point the client at it (no API key), keep `--no-wait` job files in `jobs_dir` if
    given, and make the CLI load remote models from the fake Hub cache instead of the default one."""
    from fv_remote.execution import hosted

    server.reset()
    monkeypatch.setenv("NDIF_HOST", server.host)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    if jobs_dir is not None:
        monkeypatch.setenv("FV_REMOTE_JOBS", str(jobs_dir))
    monkeypatch.setattr(hosted, "load_remote_model", functools.partial(hosted.load_remote_model,
                                                                       cache_dir=hub_cache))
    return server


def hosted_model_fixtures(repo: str, hang_s: float = 1.0, sizes: dict[str, tuple[int, int]] | None = None
                          ) -> tuple[Any, Any, Any, Any]:
    """Module-scoped fixtures `local` (hosted_tiny_model), `hub_cache`, `server` (serve_copy) and `remote_model` (the
    weightless client copy) for a test module hosting `repo`; bind them at module level under those names."""
    from fv_remote import execution as R

    @pytest.fixture(scope="module")
    def local(tiny_tokenizer):
        return hosted_tiny_model(tiny_tokenizer, repo)

    @pytest.fixture(scope="module")
    def hub_cache(local, tiny_tokenizer, tmp_path_factory):
        return write_hub_cache(tmp_path_factory.mktemp("hf-cache"), repo, local.hf, tiny_tokenizer)

    @pytest.fixture(scope="module")
    def server(local, tiny_tokenizer):
        with serve_copy(local, tiny_tokenizer, repo, hang_s=hang_s, sizes=sizes) as srv:
            yield srv

    @pytest.fixture(scope="module")
    def remote_model(hub_cache):
        return R.load_remote_model(repo, cache_dir=hub_cache)

    return local, hub_cache, server, remote_model


def ndif_fixture() -> Any:
    """A function-scoped `ndif` fixture: the module's loopback `server`, reset, with the client pointed at it and
    `--no-wait` job files in the test's tmp_path/jobs (bind it at module level as `ndif`)."""

    @pytest.fixture
    def ndif(server, monkeypatch, hub_cache, tmp_path):
        return point_client_at(server, monkeypatch, hub_cache, tmp_path / "jobs")

    return ndif


def toy_vector_fixtures(task: Any) -> tuple[Any, Any, Any]:
    """Module-scoped fixtures `prepared` (the toy task for the tiny tokenizer), `means_aie` (seeded random head means
    and scores) and `fv` (top-3 heads at layer 1, x4: strong enough to move a random model's top-1 tokens)."""
    import torch

    from fv_remote.data.tasks import prepare_task
    from fv_remote.fv.vectors import build_function_vector

    @pytest.fixture(scope="module")
    def prepared(tiny_tokenizer):
        return prepare_task(tiny_tokenizer, task, seed=0, min_pairs=4)

    @pytest.fixture(scope="module")
    def means_aie(local):
        ad = local.adapter
        gen = torch.Generator().manual_seed(1)
        means = torch.randn(ad.n_layers, ad.n_heads, ad.head_dim, generator=gen)
        return means, torch.rand(ad.n_layers, ad.n_heads, generator=gen).numpy()

    @pytest.fixture(scope="module")
    def fv(local, means_aie):
        means, aie = means_aie
        vec = build_function_vector(local, "toy", means, aie, k=3, layer=1)
        vec.vector, vec.head_means = vec.vector * 4, vec.head_means * 4
        return vec

    return prepared, means_aie, fv


def assert_same_decoding(got: Any, want: Any, tol: float) -> None:
    """Remote `decode_many` results equal the local ones: ranks, forms and top tokens exactly, logits within tol."""
    import numpy as np

    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.ranks, g.forms, [t for t, _ in g.top]) == (w.ranks, w.forms, [t for t, _ in w.top])
        np.testing.assert_allclose([v for _, v in g.top], [v for _, v in w.top], atol=tol, rtol=0)
