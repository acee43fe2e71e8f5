"""Module-scoped fixtures of a two-entry bank on the tiny llama (tests/fixtures/relational: opposites, echo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "relational"


def tiny_bank_fixtures() -> tuple[Any, Any, Any]:
    """`llama` (the tiny llama), `bank_path` (a bank built on it, 3 steps per entry) and `bank` (loaded); bind them
    at module level under those names."""
    from conftest import make_tiny_model

    from fv_remote.data import load_task
    from fv_remote.relational.bank import RelationBank
    from fv_remote.relational.bank_build import build_bank
    from fv_remote.relational.ffv import FinetuneSettings

    @pytest.fixture(scope="module")
    def llama(tiny_tokenizer):
        return make_tiny_model("llama", tiny_tokenizer)

    @pytest.fixture(scope="module")
    def bank_path(llama, tmp_path_factory):
        path = tmp_path_factory.mktemp("bank") / "bank.safetensors"
        tasks = [load_task(FIX / "opposites.json"), load_task(FIX / "echo.json")]
        # a random tiny model seldom beats its start on 4 validation pairs; the bank's plumbing is what is tested,
        # so such entries are kept on purpose (issue 26 refuses them otherwise)
        build_bank(llama, tasks, path, layer=1, n_train=6, n_valid=4,
                   settings=FinetuneSettings(steps=3, lr=0.5, allow_unchanged=True))
        return path

    @pytest.fixture(scope="module")
    def bank(bank_path):
        return RelationBank.load(bank_path)

    return llama, bank_path, bank
