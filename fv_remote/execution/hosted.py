"""Weightless local copies of NDIF-hosted models: the architecture on the meta device plus the tokenizer."""

from __future__ import annotations

import os
from typing import Any

from fv_remote.core.errors import UserError


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")


def _canonical_repo_id(repo_id: str) -> None:
    """nnsight canonicalises the repo id through the Hub when minting a model key; offline, trust the given id."""
    from nnsight.modeling import huggingface

    if _offline():
        huggingface._ID_CACHE.setdefault(repo_id, repo_id)


def load_remote_model(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
                      config: Any = None, tokenizer: Any = None) -> Any:
    """A LoadedModel for an NDIF-hosted repo: the architecture on the meta device (no weights) plus its tokenizer.

    The config and tokenizer come from the Hugging Face Hub or its local cache (`cache_dir`, HF_HOME); a UserError
    says so when they cannot be obtained (gated repo without a token, offline without a cached copy, typo).
    """
    from nnsight import TransformersModel
    from transformers import AutoConfig, AutoTokenizer

    from fv_remote.models.adapters import Adapter
    from fv_remote.models.loading import LoadedModel

    if "/" not in repo_id or repo_id.startswith((".", "/")):
        raise UserError(f"remote models are named by their Hugging Face repo id (org/name), got {repo_id!r}")
    hub = {"revision": revision, "cache_dir": cache_dir}
    hub = {k: v for k, v in hub.items() if v}
    where = f" (revision {revision})" if revision else ""
    hint = ("; it is read from the Hugging Face Hub or its cache (HF_HOME): check the name, log in for gated "
            "models (huggingface-cli login / HF_TOKEN), or run once online to cache it")

    def from_hub(loader, what: str):
        try:
            return loader.from_pretrained(repo_id, **hub)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot get the {what} of {repo_id!r}{where}: {str(exc).splitlines()[0]}{hint}") \
                from None

    config = config if config is not None else from_hub(AutoConfig, "config")
    tokenizer = tokenizer if tokenizer is not None else from_hub(AutoTokenizer, "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _canonical_repo_id(repo_id)
    try:
        lm = TransformersModel(repo_id, config=config, tokenizer=tokenizer, task="text-generation",
                               revision=revision)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot build the architecture of {repo_id!r} on the meta device: "
                        f"{str(exc).splitlines()[0]}") from None
    hf = lm._module
    adapter = Adapter.from_model(hf)
    return LoadedModel(name=repo_id, lm=lm, hf=hf, tokenizer=lm.tokenizer, adapter=adapter, source="ndif",
                       revision=revision or "", info={"hub_repo": repo_id, "remote": True})


def remote_repo_id(name: str) -> str:
    """The Hub repo id NDIF knows a model by: a short name (smollm2-135m) maps to its original repo."""
    from fv_remote.models.loading import RELEASES

    return RELEASES[name].hub_repo if name in RELEASES else name

