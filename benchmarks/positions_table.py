"""What an exported vector will do: zero-shot accuracy with the FV and the FFV at positions `last` vs `all` (a
llama.cpp control vector's rule), each at its best scale on validation pairs, on Todd et al.'s six tasks
(smollm2-135m).

    python benchmarks/positions_table.py --fv-dir out/todd6 --ffv-dir out/todd6_ffv \
        --data-dir ../shared/data/todd_fv/abstractive

The FVs come from `fv-remote run TASKS --data-dir ... --out out/todd6` (run first for the tasks that have none), the
FFVs from `fv-remote finetune --task T --fv out/todd6/T.fv.safetensors --out out/todd6_ffv/T.ffv.safetensors`
(--ffv-dir is optional: without it only FV columns).
Per task and positions: `evaluate.scale_sweep` on the validation split (at most 50 zero-shot prompts) over --scales,
the best (ties: the smaller scale), then the zero-shot test columns of `evaluate_task` (the test split, at most 200 or --n-test,
the same prompts as `fv-remote evaluate`) at that scale. Prints a markdown table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TASKS = ["antonym", "capitalize", "country-capital", "english-french", "present-past", "singular-plural"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fv-dir", default="out/todd6")
    ap.add_argument("--ffv-dir", default="", help="folder of TASK.ffv.safetensors (optional)")
    ap.add_argument("--data-dir", default="../shared/data/todd_fv/abstractive")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--scales", default="0.25,0.5,1,2,4,8")
    ap.add_argument("--n-test", type=int, default=None, help="test prompts per task (default: the split, at most 200)")
    ap.add_argument("--json", default="out/positions_table.json")
    args = ap.parse_args()

    import torch

    from fv_remote.data import load_task
    from fv_remote.fv.evaluate import best_scale, evaluation_conditions, scale_sweep
    from fv_remote.models.loading import load_model
    from fv_remote.fv.steering import score_conditions
    from fv_remote.data.tasks import prepare_task
    from fv_remote.fv.vectors import FunctionVector

    torch.set_num_threads(1)
    model = load_model("smollm2-135m")
    scales = [float(s) for s in args.scales.split(",")]
    rows = []
    for task in args.tasks.split(","):
        t0 = time.time()
        vectors = {"fv": FunctionVector.load(Path(args.fv_dir) / f"{task}.fv.safetensors")}
        if args.ffv_dir:
            vectors["ffv"] = FunctionVector.load(Path(args.ffv_dir) / f"{task}.ffv.safetensors")
        prepared = prepare_task(model.tokenizer, load_task(task, data_dir=args.data_dir), seed=0, min_pairs=12)
        row = {"task": task, "layer": vectors["fv"].layer}
        n_test = min(args.n_test, len(prepared.splits.test)) if args.n_test else None  # never repeat queries
        for kind, vec in vectors.items():
            row[f"{kind}_layer"] = vec.layer
            for positions in ("last", "all"):
                sweep = scale_sweep(model, prepared, vec, scales, positions=positions)
                scale = best_scale(sweep)
                n, _, conds = evaluation_conditions(model, prepared, vec, n_test=n_test, scale=scale,
                                                      positions=positions)
                zero, with_vec = score_conditions(model, [conds["zero_shot"], conds["zero_shot_fv"]])
                row.update({"n_test": n, "zero_shot": zero, f"{positions}_{kind}_scale": scale,
                            f"{positions}_{kind}": with_vec, f"{positions}_{kind}_valid": sweep[scale],
                            f"{positions}_{kind}_sweep": sweep})
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_sweep")}), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"scales": scales, "rows": rows}, indent=2) + "\n")
    kinds = ["fv", "ffv"] if args.ffv_dir else ["fv"]
    cols = [f"{pos}_{kind}" for kind in kinds for pos in ("last", "all")]
    print("\n| task | n test | layer | zero-shot | " + " | ".join(f"+{c.split('_')[1].upper()} {c.split('_')[0]} (scale)"
                                                         for c in cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['task']} | {r['n_test']} | {r['layer']} | {r['zero_shot']:.2f} | "
              + " | ".join(f"{r[c]:.2f} ({r[c + '_scale']:g})" for c in cols) + " |")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ["zero_shot", *cols]}
    print(f"| mean | | | {mean['zero_shot']:.3f} | " + " | ".join(f"{mean[c]:.3f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
