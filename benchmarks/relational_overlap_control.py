"""A control for `fv-remote align --exclude-trained`: is the drop in ρ about the entries trained on a row's pairs,
or would leaving out any entry do the same?

One relation profile (as `align` computes it), then Spearman ρ (a) with every entry, (b) with each row's
overlapping entries left out (what `--exclude-trained` prints), (c) with as many *other* entries left out per row,
chosen at random among the entries that share no pair with the row and have a record (`--draws` draws; mean and
range), so (b) - (c) is what the training pairs themselves account for.

    .venv/bin/python benchmarks/relational_overlap_control.py --ratings out/overlap/semeval_ratings.csv \\
        --bank out/overlap/bank.safetensors
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratings", required=True)
    ap.add_argument("--bank", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="weights")
    ap.add_argument("--draws", type=int, default=20)
    args = ap.parse_args()

    from fv_remote.models.loading import load_model
    from fv_remote.relational.align import read_ratings, similarities, spearman
    from fv_remote.relational.analogy import AnalogySettings, relation_profile
    from fv_remote.relational.bank import RelationBank
    from fv_remote.relational.overlap import find_overlap

    bank = RelationBank.load(args.bank)
    rows = read_ratings(args.ratings)
    model = load_model(args.model)
    pairs = sorted({p for r in rows for p in (r.pair1, r.pair2)})
    profile = relation_profile(model, bank, pairs, AnalogySettings())
    index = {p: i for i, p in enumerate(pairs)}
    logp1, logp2 = profile[[index[r.pair1] for r in rows]], profile[[index[r.pair2] for r in rows]]
    ratings = [r.rating for r in rows]
    overlap = find_overlap(bank, [(r.pair1, r.pair2) for r in rows])
    own = overlap.mask()

    def rho(mask: torch.Tensor | None) -> float:
        return spearman(similarities(bank, logp1, logp2, args.method, exclude=mask).tolist(), ratings)

    recorded = [j for j, e in enumerate(bank.entries) if "trained_pairs" in e.meta]
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(args.draws):
        other = torch.zeros_like(own)
        for i, hits in enumerate(overlap.hits):
            free = [j for j in recorded if j not in hits]
            pick = torch.randperm(len(free), generator=gen)[:len(hits)].tolist()
            other[i, [free[k] for k in pick]] = True
        draws.append(rho(other))
    print(f"{len(rows)} rows, {overlap.n_overlapping} sharing a pair; method {args.method}")
    print(f"every entry: rho = {rho(None):.3f}")
    print(f"each row's overlapping entries left out: rho = {rho(own):.3f}")
    print(f"as many other recorded entries left out (mean of {args.draws} draws): rho = {np.mean(draws):.3f} "
          f"[{min(draws):.3f}, {max(draws):.3f}]")


if __name__ == "__main__":
    main()
