"""FV vs FFV vs FFV-from-zero vs ICL on Todd et al.'s tasks (the numbers in benchmarks/RESULTS.md).

Per task: hold out N_TEST pairs (seeded) that nothing ever trains on; run the FV pipeline (extract -> CMA -> fit ->
layer sweep) on the remaining pairs; fine-tune (a) from the FV at a layer chosen on validation pairs and (b) from
zero at a fixed layer (9 by default), each on 20 training pairs; evaluate everything on the held-out pairs with
`evaluate_task` (zero-shot, +FV, +FFV, +FFV-from-zero, 10-shot ICL). Resumable: finished pieces are reloaded.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/relational_experiment.py --out out/relational
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = ("antonym", "capitalize", "country-capital", "english-french", "present-past", "singular-plural")
TODD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "todd_fv" / "abstractive"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/relational")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--data-dir", default=str(TODD))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-train", type=int, default=20)
    ap.add_argument("--n-valid", type=int, default=30)
    ap.add_argument("--n-test", type=int, default=100, help="held-out pairs (at most half the task; >= 50)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--quick-steps", type=int, default=10)
    ap.add_argument("--layers", default="9,12,15", help="candidate FFV layers (the FV's own layer is added)")
    ap.add_argument("--zero-layer", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from fv_remote.data import RelationTask, Splits, load_task, resolve_answers
    from fv_remote.fv.steering import Steer, top1_accuracy
    from fv_remote.relational.ffv import FinetuneSettings, examples, finetune, initial_vector, select_layer, best_ffv_layer
    from fv_remote.models.loading import load_model
    from fv_remote.fv.pipeline import PipelineSettings, run_task
    from fv_remote.store.activations import ActivationStore
    from fv_remote.data.tasks import PreparedTask, prepare_task
    from fv_remote.fv.vectors import FunctionVector

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    store = ActivationStore(str(out / "store.zarr"))
    settings = FinetuneSettings(steps=args.steps, lr=args.lr, eval_every=5, patience=15, seed=args.seed)
    rows = {}
    for name in args.tasks.split(","):
        row_path = out / f"{name}.result.json"
        if row_path.exists():
            rows[name] = json.loads(row_path.read_text())
            print(f"{name}: done earlier", flush=True)
            continue
        t0 = time.time()
        task = load_task(name, data_dir=args.data_dir)
        kept, ids, _ = resolve_answers(model.tokenizer, task.pairs)
        pairs = sorted(set(kept))
        random.Random(f"{args.seed}:heldout").shuffle(pairs)
        n_test = min(args.n_test, len(pairs) // 2)
        if n_test < 50:
            raise SystemExit(f"{name}: only {len(pairs)} usable pairs, cannot hold out 50")
        test, rest = pairs[:n_test], pairs[n_test:]
        rest_task = RelationTask(name, rest, task.category, task.description, task.relation_words, task.source)

        fv_path = out / f"{name}.fv.safetensors"
        if fv_path.exists():
            fv = FunctionVector.load(fv_path)
        else:
            run = run_task(model, rest_task, store, out, PipelineSettings(seed=args.seed, n_test=20))
            fv = run.fv
        prepared = prepare_task(model.tokenizer, rest_task, seed=args.seed)
        train = examples(prepared, "train", args.n_train)
        valid = examples(prepared, "valid", args.n_valid)
        print(f"{name}: {len(pairs)} pairs, {n_test} held out; FV layer {fv.layer}; "
              f"{len(train)} train / {len(valid)} valid ({time.time() - t0:.0f}s)", flush=True)

        ffv_path = out / f"{name}.ffv.safetensors"
        if ffv_path.exists():
            ffv = FunctionVector.load(ffv_path)
        else:
            layers = sorted({int(x) for x in args.layers.split(",")} | {fv.layer})
            search = select_layer(model, train, valid, layers, lambda layer: fv.vector.clone(), settings,
                                  quick_steps=args.quick_steps)
            layer = best_ffv_layer(search)
            print(f"{name}: layer search {search} -> {layer} ({time.time() - t0:.0f}s)", flush=True)
            res = finetune(model, train, valid, fv.vector.clone(), layer, settings, task=name, init="fv", source=fv)
            ffv = res.ffv
            ffv.meta["layer_search"] = {str(k): v for k, v in search.items()}
            ffv.save(ffv_path)
            from fv_remote.relational.ffv import loss_curve

            loss_curve(res.history, out / f"{name}.ffv_loss.png", title=f"{name}: FFV (init FV) at layer {layer}")
        zero_path = out / f"{name}.ffv0.safetensors"
        if zero_path.exists():
            ffv0 = FunctionVector.load(zero_path)
        else:
            res0 = finetune(model, train, valid, initial_vector(model, "zero"), args.zero_layer, settings, task=name,
                            init="zero")
            ffv0 = res0.ffv
            ffv0.save(zero_path)
        print(f"{name}: FFV layer {ffv.layer} (valid acc {ffv.meta['best_valid_acc']:.2f}), FFV-0 layer "
              f"{ffv0.layer} (valid acc {ffv0.meta['best_valid_acc']:.2f}) ({time.time() - t0:.0f}s)", flush=True)

        full = prepare_task(model.tokenizer, task, seed=args.seed)
        held = PreparedTask(rest_task, Splits(prepared.splits.train, prepared.splits.valid, test),
                            full.answer_token, prepared.template, prepared.seed)
        # The columns of `evaluate_task` that the table needs (its shuffled 10-shot columns would triple the cost):
        # the same prompts (test split, seed offset 2), scored with the same top-1 rule.
        n = len(test)
        zero = held.prompts("test", n, kind="zero_shot", n_shots=0, seed_offset=2)
        clean = held.prompts("test", n, kind="clean", n_shots=10, seed_offset=2)
        ids = held.ids(zero)
        texts = [p.text for p in zero]
        with torch.no_grad():
            row = {"task": name, "n_test": n, "zero_shot": top1_accuracy(model, texts, ids),
                   "zero_shot_fv": top1_accuracy(model, texts, ids, Steer(fv)),
                   "zero_shot_ffv": top1_accuracy(model, texts, ids, Steer(ffv)),
                   "zero_shot_ffv0": top1_accuracy(model, texts, ids, Steer(ffv0)),
                   "icl": top1_accuracy(model, [p.text for p in clean], ids)}
        row.update({"fv_layer": fv.layer, "ffv_layer": ffv.layer, "ffv0_layer": ffv0.layer, "n_pairs": len(pairs),
                    "ffv_layer_search": ffv.meta.get("layer_search"), "seconds": round(time.time() - t0)})
        row_path.write_text(json.dumps(row, indent=2))
        rows[name] = row
        print(json.dumps(row), flush=True)

    cols = [("zero_shot", "zero-shot"), ("zero_shot_fv", "FV"), ("zero_shot_ffv", "FFV"),
            ("zero_shot_ffv0", f"FFV-from-zero (L{args.zero_layer})"), ("icl", "ICL 10-shot")]
    lines = ["| task | n test | " + " | ".join(c for _, c in cols) + " | FV layer | FFV layer |",
             "|---|---|" + "---|" * len(cols) + "---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['n_test']} | " + " | ".join(f"{r[k]:.2f}" for k, _ in cols)
                     + f" | {r['fv_layer']} | {r['ffv_layer']} |")
    means = {k: sum(r[k] for r in rows.values()) / len(rows) for k, _ in cols}
    lines.append("| **mean** | | " + " | ".join(f"**{means[k]:.3f}**" for k, _ in cols) + " | | |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "means": means, "args": vars(args)}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
