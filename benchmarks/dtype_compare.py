"""fp32 vs bf16 tables for issue 24 from finished runs (no model is loaded):

1. per task: FV layer, zero-shot+FV, shuffled+FV, ICL (each dtype's `run --json`), CMA top-10 overlap and Spearman
   rho over all heads (the two stores' AIE, `fv_remote.fv.cma.load_aie`);
2. per stage: wall seconds and peak RSS from `/usr/bin/time -f %e_s_%M_KB` lines at the end of each stage's log.

  python benchmarks/dtype_compare.py --runs out/dtype6/smollm2-135m --stages out/stages/smollm2-135m

`--runs DIR` holds DIR/float32.json, DIR/bfloat16.json and the stores DIR/{float32,bfloat16}/store.zarr (what
`fv-remote --dtype DT run TASKS --out DIR/DT --json DIR/DT.json` writes); `--stages DIR` holds DIR/DT/STAGE.log.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

DTYPES = ("float32", "bfloat16")
STAGES = ("extract", "cma", "fit", "evaluate", "residuals")


def run_table(runs: Path) -> None:
    import numpy as np
    from scipy.stats import spearmanr

    from fv_remote.fv.cma import load_aie
    from fv_remote.fv.vectors import top_heads
    from fv_remote.store.activations import ActivationStore

    rows = {dt: {r["task"]: r for r in json.loads((runs / f"{dt}.json").read_text())["results"]} for dt in DTYPES}
    print("| task | FV layer fp32 / bf16 | zero-shot+FV fp32 / bf16 | shuffled+FV fp32 / bf16 | ICL fp32 / bf16 | "
          "CMA top-10 overlap | CMA rho (all heads) |")
    print("|---|---|---|---|---|---|---|")
    for task in rows["float32"]:
        a, b = rows["float32"][task], rows["bfloat16"].get(task)
        if b is None:
            continue
        aies = [load_aie(ActivationStore(str(runs / dt / "store.zarr")), task) for dt in DTYPES]
        tops = [{(x, y) for x, y, _ in top_heads(aie, k=10)} for aie in aies]
        rho = spearmanr(np.ravel(aies[0].values), np.ravel(aies[1].values)).statistic
        print(f"| {task} ({a['n_test']}) | {a['layer']} / {b['layer']} | {a['zero_shot_fv']:.2f} / "
              f"{b['zero_shot_fv']:.2f} | {a['shuffled_fv']:.2f} / {b['shuffled_fv']:.2f} | {a['icl']:.2f} / "
              f"{b['icl']:.2f} | {len(tops[0] & tops[1])}/10 | {rho:.3f} |")


def stage_table(stages: Path) -> None:
    print("| stage | fp32 wall s | bf16 wall s | fp32 / bf16 | fp32 peak RSS MiB | bf16 peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for stage in STAGES:
        got = []
        for dt in DTYPES:
            log = stages / dt / f"{stage}.log"
            found = re.findall(r"([\d.]+)_s_(\d+)_KB", log.read_text()) if log.exists() else []
            got.append((float(found[-1][0]), int(found[-1][1]) / 1024) if found else None)
        if None in got:
            continue
        (t32, m32), (t16, m16) = got  # type: ignore[misc]
        print(f"| {stage} | {t32:.1f} | {t16:.1f} | {t32 / t16:.2f} | {m32:,.0f} | {m16:,.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path)
    ap.add_argument("--stages", type=Path)
    args = ap.parse_args()
    if args.runs:
        run_table(args.runs)
    if args.stages:
        stage_table(args.stages)


if __name__ == "__main__":
    main()
