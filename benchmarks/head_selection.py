"""Which heads, how many, one layer or distributed: exact CMA vs gradient attribution vs AttnLRP (issue 15).

For each head ranking (exact fast CMA, gradient x activation attribution, AttnLRP via lxt, and the Fast & Faithful FV
paper's attention x gradient variant) and each k in --ks, on each task:

- the FV of the top-k heads added at one layer (chosen per task, method and k by the zero-shot validation sweep,
  --n-sweep validation pairs, all layers), and the same heads' means added in their own slots at their own layers
  (distributed steering, scale 1); zero-shot top-1 accuracy on the test split (at most --n-test pairs);
- rank agreement with the exact CMA: Spearman rho over all heads and the overlap of the top-k sets;
- cost per prompt of each scorer (timed here on the first --n-time prompts per task, interleaved);
- a paired bootstrap (scipy.stats.bootstrap, 10,000 resamples, percentile 95% interval) of distributed minus
  single-layer accuracy per method and k: each test prompt is a unit (both modes see the same prompts), weighted
  1 / (n_test of its task x n_tasks) so the statistic is the mean over tasks, as in the table.

Scores come from the store (`fv-remote cma --method ...` computes and stores them; this script calls the same
`run_cma`, so missing prompts are scored and stored first). Outputs: <out>/results.json, <out>/accuracy_vs_k.png
and markdown tables on stdout. `--report` redraws the tables and the PNG from results.json without the model.

  python benchmarks/head_selection.py --store out/todd6/store.zarr --out out/head_selection
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = ("antonym", "capitalize", "country-capital", "english-french", "present-past", "singular-plural")
METHODS = ("cma", "attribution", "lrp", "lrp_attention")
LABELS = {"cma": "exact CMA", "attribution": "gradient attribution", "lrp": "AttnLRP (lxt)",
          "lrp_attention": "paper variant (attention x grad)"}
MODES = ("single", "distributed")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def scorers(model, prepared, means):
    from fv_remote.fv import cma
    from fv_remote.fv import lrp
    from fv_remote.fv.attribution import attribution_prompt

    sep = prepared.template.separator
    return {"cma": lambda p, a: cma.cma_prompt_fast(model, p["shuffled"], a, means),
            "attribution": lambda p, a: attribution_prompt(model, p["shuffled"], a, means),
            "lrp": lambda p, a: lrp.lrp_prompt(model, p["clean"], a),
            "lrp_attention": lambda p, a: lrp.lrp_attention_prompt(model, p["clean"], a, lrp.demo_end(p["clean"], sep))}


def run(args) -> dict:
    import torch
    from scipy.stats import spearmanr

    from fv_remote.fv.cma import load_aie, run_cma
    from fv_remote.data import load_task
    from fv_remote.fv.evaluate import best_layer, layer_sweep
    from fv_remote.fv.extract import mean_heads_tensor
    from fv_remote.models.loading import load_model
    from fv_remote.fv.steering import Condition, Steer, logits_conditions
    from fv_remote.store.activations import ActivationStore
    from fv_remote.data.tasks import prepare_task
    from fv_remote.fv.vectors import build_function_vector, top_heads

    torch.set_num_threads(1)
    model = load_model(args.model)
    store = ActivationStore(args.store)
    ks = [int(k) for k in args.ks.split(",")]
    out = {"model": model.model_id, "store": args.store, "ks": ks, "methods": list(METHODS),
           "n_scores": args.n_scores, "n_test_cap": args.n_test, "n_time": args.n_time, "n_sweep": args.n_sweep,
           "tasks": {}}
    seconds = {m: 0.0 for m in METHODS}
    n_timed = 0
    for name in args.tasks.split(","):
        t0 = time.time()
        prepared = prepare_task(model.tokenizer, load_task(name, data_dir=args.data_dir), seed=0, min_pairs=12)
        means = mean_heads_tensor(store, name)
        aie = {}
        for method in METHODS:
            if method == "cma":
                run_cma(model, prepared, store, means, n_prompts=args.n_scores)  # no-op when stored
            else:
                run_cma(model, prepared, store, means, n_prompts=args.n_scores, method=method)
            aie[method] = load_aie(store, name, args.n_scores, source=method)
        # Cost per prompt, interleaved on the same prompts (the stored scores above may come from earlier runs).
        shuffled = prepared.prompts("train", args.n_time, kind="shuffled", n_shots=10, seed_offset=1)
        clean = prepared.prompts("train", args.n_time, kind="clean", n_shots=10, seed_offset=1)
        fns = scorers(model, prepared, means)
        for s, c in zip(shuffled, clean):
            pair = {"shuffled": s.text, "clean": c.text}
            for method, fn in fns.items():
                start = time.perf_counter()
                fn(pair, prepared.answer_token[s.answer])
                seconds[method] += time.perf_counter() - start
            n_timed += 1
        exact = aie["cma"].values.reshape(-1)
        row = {"rho": {m: float(spearmanr(exact, aie[m].values.reshape(-1)).statistic) for m in METHODS},
               "overlap": {}, "runs": {}}
        test = prepared.prompts("test", min(len(prepared.splits.test), args.n_test), kind="zero_shot", n_shots=0,
                                seed_offset=2)
        texts, ids = [p.text for p in test], torch.tensor(prepared.ids(test))
        base = logits_conditions(model, [Condition(texts, None, ids.tolist())])[0].argmax(-1) == ids
        row["n_test"], row["zero_shot"] = len(texts), float(base.float().mean())
        cache: dict[tuple, dict] = {}
        exact_top = {k: {(a, b) for a, b, _ in top_heads(aie["cma"], k=k)} for k in ks}
        for method in METHODS:
            row["overlap"][method], row["runs"][method] = {}, {}
            for k in ks:
                heads = tuple(sorted((a, b) for a, b, _ in top_heads(aie[method], k=k)))
                row["overlap"][method][str(k)] = len(exact_top[k] & set(heads))
                if heads not in cache:
                    fv = build_function_vector(model, name, means, aie[method], k=k)
                    sweep = layer_sweep(model, prepared, fv, n_prompts=args.n_sweep)
                    layer = best_layer(sweep)
                    single, dist = logits_conditions(model, [
                        Condition(texts, Steer(fv, layer=layer), ids.tolist()),
                        Condition(texts, Steer(fv, distributed=True), ids.tolist())])
                    cache[heads] = {"layer": layer, "valid_best": sweep[layer],
                                    "single": (single.argmax(-1) == ids).int().tolist(),
                                    "distributed": (dist.argmax(-1) == ids).int().tolist()}
                row["runs"][method][str(k)] = cache[heads]
                r = cache[heads]
                log(f"{name} {method} k={k}: layer {r['layer']}, single {np.mean(r['single']):.2f}, "
                    f"distributed {np.mean(r['distributed']):.2f}, overlap {row['overlap'][method][str(k)]}/{k}")
        out["tasks"][name] = row
        log(f"{name}: done in {time.time() - t0:.0f} s; rho " +
            ", ".join(f"{m} {v:.3f}" for m, v in row["rho"].items()))
    out["seconds_per_prompt"] = {m: s / max(n_timed, 1) for m, s in seconds.items()}
    out["n_timed"] = n_timed
    return out


def summarise(data: dict) -> dict:
    """Means over tasks, and the paired bootstrap of distributed minus single-layer."""
    from scipy.stats import bootstrap

    tasks, ks = list(data["tasks"]), data["ks"]
    summary = {}
    for method in data["methods"]:
        for k in ks:
            runs = [data["tasks"][t]["runs"][method][str(k)] for t in tasks]
            single = np.concatenate([np.array(r["single"], float) for r in runs])
            dist = np.concatenate([np.array(r["distributed"], float) for r in runs])
            weight = np.concatenate([np.full(len(r["single"]), 1 / (len(r["single"]) * len(tasks))) for r in runs])

            def diff(d, s, w, axis=-1):
                return (w * (d - s)).sum(axis) / w.sum(axis)

            ci = bootstrap((dist, single, weight), diff, paired=True, vectorized=True, n_resamples=10_000,
                           method="percentile", random_state=0).confidence_interval
            summary[f"{method}/{k}"] = {
                "single": float(np.mean([np.mean(r["single"]) for r in runs])),
                "distributed": float(np.mean([np.mean(r["distributed"]) for r in runs])),
                "diff": float(diff(dist, single, weight)), "ci": [float(ci.low), float(ci.high)],
                "overlap": float(np.mean([data["tasks"][t]["overlap"][method][str(k)] for t in tasks])),
            }
    return summary


def plot(data: dict, summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = data["ks"]
    base = np.mean([row["zero_shot"] for row in data["tasks"].values()])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode, title in zip(axes, MODES, ("single-layer FV (layer by validation sweep)",
                                              "distributed (each head's mean in its own slot)")):
        for method in data["methods"]:
            ax.plot(ks, [summary[f"{method}/{k}"][mode] for k in ks], marker="o", label=LABELS[method])
        ax.axhline(base, color="grey", linestyle="--", label="no vector")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k (top heads)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"zero-shot accuracy, mean over {len(data['tasks'])} tasks")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{data['model']}: head selection methods", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(data: dict, summary: dict) -> str:
    ks, tasks = data["ks"], list(data["tasks"])
    cost = data["seconds_per_prompt"]
    lines = ["| method | k | single-layer | distributed | distributed - single [95% CI] | top-k overlap with CMA "
             "| Spearman rho vs CMA | s / prompt (x fast CMA) |", "|---|---|---|---|---|---|---|---|"]
    for method in data["methods"]:
        rho = np.mean([data["tasks"][t]["rho"][method] for t in tasks])
        for k in ks:
            s = summary[f"{method}/{k}"]
            lines.append(f"| {LABELS[method]} | {k} | {s['single']:.3f} | {s['distributed']:.3f} | {s['diff']:+.3f} "
                         f"[{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}] | {s['overlap']:.1f} / {k} | {rho:.3f} | "
                         f"{cost[method]:.2f} ({cost[method] / cost['cma']:.2f}) |")
    lines += ["", "Per task (zero-shot accuracy single / distributed, FV layer; rho vs CMA):", "",
              "| task | n test | no vector | method | rho | " + " | ".join(f"k={k}" for k in ks) + " |",
              "|---|---|---|---|---|" + "---|" * len(ks)]
    for t in tasks:
        row = data["tasks"][t]
        for method in data["methods"]:
            cells = [f"{np.mean(r['single']):.2f} / {np.mean(r['distributed']):.2f} (L{r['layer']})"
                     for r in (row["runs"][method][str(k)] for k in ks)]
            lines.append(f"| {t} | {row['n_test']} | {row['zero_shot']:.2f} | {LABELS[method]} | "
                         f"{row['rho'][method]:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="out/todd6/store.zarr")
    parser.add_argument("--out", default="out/head_selection")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--data-dir", default="/work/shared/data/todd_fv/abstractive")
    parser.add_argument("--ks", default="5,10,20,40")
    parser.add_argument("--n-scores", type=int, default=25, help="prompts per task for every head ranking")
    parser.add_argument("--n-test", type=int, default=100, help="test pairs per task, at most")
    parser.add_argument("--n-time", type=int, default=3, help="prompts per task timed for the cost column")
    parser.add_argument("--n-sweep", type=int, default=25, help="validation pairs per task for the layer sweep")
    parser.add_argument("--report", action="store_true", help="tables and PNG from <out>/results.json only")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report:
        data = json.loads((out / "results.json").read_text())
    else:
        data = run(args)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(data))
    summary = summarise(data)
    png = plot(data, summary, out / "accuracy_vs_k.png")
    print(report(data, summary))
    print(f"\nresults: {out / 'results.json'}; plot: {png}")


if __name__ == "__main__":
    main()
