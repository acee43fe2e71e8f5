"""Post-norm FV definitions side by side on a stored run (issue 13; ARCHITECTURE.md, "FV units").

For each task in a store written by `fv-remote run` (means + AIE), the top-k heads' FV under three definitions:
`frozen` (what every stage uses: the post-attention norm with its scale frozen at the mean attention output),
`jacobian` (the norm's full Jacobian at the mean attention output) and `none` (W_O[:, slot] @ mean, no norm: the FV
before issue 13); each gets its own validation layer sweep and the usual test evaluation.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fv_norm_variants.py --model gemma3-270m \
        --store out/gemma6/store.zarr --tasks present-past --data-dir ../shared/data/todd_fv/abstractive
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("frozen", "jacobian", "none")


def variant_vectors(model, means, heads, variant: str):
    import torch

    from fv_remote.traces.projection import linearised_norm
    from fv_remote.fv.vectors import output_weight

    ad, rows = model.adapter, []
    for layer, head in heads:
        site = ad.head_site(model.hf, layer)
        u = output_weight(site).float()[:, head * ad.head_dim:(head + 1) * ad.head_dim] @ means[layer, head]
        norm = ad.post_attn_norm(model.hf, layer)
        if variant != "none" and norm is not None:
            with torch.no_grad():
                anchor = site(means[layer].reshape(1, -1))[0]
                u = linearised_norm(norm, u.view(1, -1), anchor, torch.float32, ad.norm_eps,
                                    radial=variant == "jacobian")[0]
        rows.append(u)
    return torch.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--store", required=True)
    ap.add_argument("--tasks", required=True, help="comma-separated")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from fv_remote.fv.cma import load_aie
    from fv_remote.data import load_task
    from fv_remote.fv.evaluate import best_layer, evaluate_task, layer_sweep
    from fv_remote.fv.extract import mean_heads_tensor
    from fv_remote.models.loading import load_model
    from fv_remote.store.activations import ActivationStore
    from fv_remote.data.tasks import prepare_task
    from fv_remote.fv.vectors import assemble_function_vector, head_vectors, top_heads

    model = load_model(args.model)
    store = ActivationStore(args.store)
    results = {}
    for task in args.tasks.split(","):
        prepared = prepare_task(model.tokenizer, load_task(task, args.data_dir), seed=0, min_pairs=12)
        means = mean_heads_tensor(store, task)
        ranked = top_heads(load_aie(store, task), k=args.k)
        heads = [(layer, head) for layer, head, _ in ranked]
        for variant in args.variants.split(","):
            start = time.time()
            vecs = variant_vectors(model, means, heads, variant)
            if variant == "frozen":  # the definition the stages use, through the library's own path
                assert (vecs - head_vectors(model, means, heads)).abs().max() <= 1e-3 * vecs.abs().max()
            fv = assemble_function_vector(model, task, means, ranked, vecs)
            sweep = layer_sweep(model, prepared, fv)
            fv.layer = best_layer(sweep)
            row = evaluate_task(model, prepared, fv).as_json()
            row.update(variant=variant, fv_norm=float(fv.vector.norm()), sweep_max=max(sweep.values()),
                       seconds=round(time.time() - start, 1))
            results.setdefault(task, {})[variant] = row
            print(json.dumps({"task": task, **row}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.model_id, "results": results}, indent=1))


if __name__ == "__main__":
    main()
