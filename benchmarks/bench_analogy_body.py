"""Issue 12: analogy's local first-token path (cached prefixes shared by the bank's vectors) vs the stage's one
session body (`analogy_session`) run locally, on smollm2-135m with a seeded random bank (8 relations at layer 12)
and the first BENCH_ANALOGY_ITEMS (default 24) BATS multiple-choice items. Both modes: mc (first-token scores) and
generative.

  <mode>_local_over_body = body seconds / local path seconds (> 1.2: the local path is kept as a capability of the
  local executor); <mode>_max_abs_diff = max |local - body| over the weights and scores
"""

import os

import torch

from _common import Timer, emit, load, log, setup

from fv_remote.relational.analogy import AnalogySettings, _local_scores, analogy_session, check_items
from fv_remote.relational.bank import RelationBank
from fv_remote.data import read_mc_analogies
from fv_remote.fv.vectors import FunctionVector

N_ITEMS = int(os.environ.get("BENCH_ANALOGY_ITEMS", "24"))
DATA = os.environ.get("BENCH_ANALOGY_DATA", "/work/shared/data/bats/bats_test.jsonl")


def main() -> None:
    env = setup()
    model = load()
    gen = torch.Generator().manual_seed(0)
    bank = RelationBank(model.model_id)
    for i in range(8):
        bank.add_vector(FunctionVector(vector=4 * torch.randn(model.adapter.d_model, generator=gen),
                                       model=model.model_id, task=f"r{i}", layer=12, kind="ffv"))
    record = {"bench": "analogy_body"}
    methods = ("cfv", "no_vector", "best_ffv", "icl", "icl_qa")
    for mode in ("mc", "generative"):
        s = AnalogySettings(mode=mode).check()
        kept, _ = check_items(model.tokenizer, read_mc_analogies(DATA)[:N_ITEMS], s)
        with Timer() as t_local:
            w_a, sc_a = _local_scores(model, bank, kept, s, None, methods, None)
        with Timer() as t_body:
            w_b, sc_b = analogy_session(model, bank, kept, s, None, methods, False)
        diff = max([float((w_a - w_b).abs().max())] + [float((sc_a[m].float() - sc_b[m].float()).abs().max())
                                                       for m in methods])
        log(f"{mode}: local {t_local.seconds:.2f}s, body {t_body.seconds:.2f}s, max|diff| {diff:.2e}")
        record.update({f"{mode}_local_over_body": round(t_body.seconds / t_local.seconds, 2),
                       f"{mode}_local_s": round(t_local.seconds, 2), f"{mode}_body_s": round(t_body.seconds, 2),
                       f"{mode}_max_abs_diff": float(f"{diff:.3g}"), f"{mode}_items": len(kept)})
    emit({**record, "model": model.model_id, **env})


if __name__ == "__main__":
    main()
