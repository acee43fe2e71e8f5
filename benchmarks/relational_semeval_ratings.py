"""Write a pair-vs-pair ratings CSV from SemEval-2012 Task 2 for `fv-remote align`.

SemEval-2012 rates, within each relation subcategory, how prototypical each word pair is of the relation
(MaxDiff scores, about -100..100). Here pair 1 = the subcategory's top-rated pair (its prototype), pair 2 = another
pair of the same subcategory, rating = pair 2's prototypicality: "how similar is this pair's relation to the
prototype's", the shape `fv-remote align` reads. A spread of pairs per subcategory (every k-th by score) keeps
the file small.

    .venv/bin/python benchmarks/relational_semeval_ratings.py --out out/relational/semeval_ratings.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

SEMEVAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "semeval2012_task2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(SEMEVAL))
    ap.add_argument("--out", default="out/relational/semeval_ratings.csv")
    ap.add_argument("--every", type=int, default=4, help="use every k-th subcategory")
    ap.add_argument("--per-category", type=int, default=15, help="pairs per subcategory")
    args = ap.parse_args()

    from fv_remote.data import read_semeval2012_ratings

    ratings = read_semeval2012_ratings(args.root)
    rows = []
    for sid in sorted(ratings)[:: args.every]:
        ranked = ratings[sid]  # best first
        proto, rest = ranked[0], ranked[1:]
        step = max(1, len(rest) // args.per_category)
        for x, y, score in rest[::step][: args.per_category]:
            rows.append((proto[0], proto[1], x, y, score, sid))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["pair1_word1", "pair1_word2", "pair2_word1", "pair2_word2", "mean_rating", "subcategory"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows from {len({r[5] for r in rows})} subcategories to {out}")


if __name__ == "__main__":
    main()
