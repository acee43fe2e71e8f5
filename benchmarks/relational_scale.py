"""Issue 17's measurements: CFVs from a public-source bank on BATS and Google test, softmax vs learned combiner.

Protocol (nothing is chosen on a test set):
  training analogies = BATS valid + Google valid + analogies made from SemEval-2012's subcategories (stem and
  answer from one subcategory, foils from other classes); a seeded 30% of them is held aside.
  The softmax combiner's temperature and the CFV scale are chosen on the held-aside part; the learned (affine)
  combiner is trained on the rest at that temperature, early-stopped on the held-aside part, its scale chosen
  there too. Then on a seeded sample of BATS test and of Google test: no vector, one-shot Q/A, best single FFV,
  CFV (softmax), CFV (learned), one-shot Q/A + CFV; accuracies with bootstrap CIs, paired CIs of differences,
  and per-family accuracy. Relation profiles are computed once per item set and cached under --out (resumable).

Issue 25 (why does one-shot + CFV barely beat the one-shot prompt?), all chosen on the held-aside part:
  icl_qa+cfv_tuned  the one-shot prompt + CFV with its own (T, scale), not the CFV-alone's (a demonstration already
                    sets the task, so the added vector may double-count it and want a smaller scale);
  cfv_z, icl_qa+cfv_z  the relation profile standardised per bank relation (mean and sd over the training
                    analogies) before the softmax: some FFVs raise log P of every answer, so a raw profile
                    favours them for every item; a z-score asks which relation fits *this* stem unusually well.
  icl_qa+cfv_gated  the CFV added to the one-shot prompt only for relation families (BATS's four, Google's two)
                    where that beat the one-shot prompt on the validation analogies of the family.
  Per test set also: the 2x2 table of one-shot vs one-shot + CFV hits and the gain by profile confidence
  (terciles of the top softmax weight). Per-method hits are saved as they finish (a stopped run resumes).

  PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/relational_scale.py \\
      --bank out/bank_public.safetensors --data-root ../shared/data --out out/relational_scale
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


FAMILIES = ("1_Inflectional_morphology", "2_Derivational_morphology", "3_Encyclopedic_semantics",
            "4_Lexicographic_semantics", "semantic", "syntactic")  # BATS's four, Google's two


def diagnose(families: list[tuple[str, list[int]]], correct: dict, weights, s, clean) -> dict:
    """Where one-shot + CFV gains or loses against the one-shot prompt: the 2x2 table of hits, each variant's gain
    over one-shot per family (`families`: AnalogyResult's (name, item indices); paired CIs), per tercile of the
    profile's top softmax weight, and on the items that share no word pair with any bank entry's training pairs
    (`clean`)."""
    from fv_remote.relational.analogy import bootstrap_ci

    one, both = correct["icl_qa"], correct["icl_qa+cfv"]
    table = {"both": int(((one == 1) & (both == 1)).sum()), "one_shot_only": int(((one == 1) & (both == 0)).sum()),
             "with_cfv_only": int(((one == 0) & (both == 1)).sum()), "neither": int(((one == 0) & (both == 0)).sum())}
    variants = [m for m in correct if m.startswith("icl_qa+cfv")]

    def gains(idx) -> dict:
        return {m: {"mean": float((correct[m][idx] - one[idx]).mean()),
                    "ci95": bootstrap_ci(correct[m][idx] - one[idx], s.n_boot, s.seed)} for m in variants}

    by_family = {f: {"n": len(idx), "icl_qa": float(one[idx].mean()), **gains(np.asarray(idx))}
                 for f, idx in families}
    top = weights.max(-1).values.numpy()
    cuts = np.quantile(top, [1 / 3, 2 / 3])
    tercile = np.digitize(top, cuts)
    by_confidence = {}
    for k, label in enumerate(("low", "mid", "high")):
        idx = np.flatnonzero(tercile == k)
        if len(idx):
            by_confidence[label] = {"n": int(len(idx)), "top_weight": [float(top[idx].min()), float(top[idx].max())],
                                    "icl_qa": float(one[idx].mean()), **gains(idx)}
    idx = np.flatnonzero(clean)
    no_overlap = {"n": int(len(idx)), "icl_qa": float(one[idx].mean()), **gains(idx)} if len(idx) else None
    return {"one_shot_vs_with_cfv": table, "by_family": by_family, "by_confidence": by_confidence,
            "no_overlap": no_overlap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", required=True)
    ap.add_argument("--data-root", required=True, help="folder laid out as ../shared/data")
    ap.add_argument("--out", default="out/relational_scale")
    ap.add_argument("--sources", default="semeval2012,todd", help="bank sources used (leave out BATS: its "
                                                                  "relations are the test set's)")
    ap.add_argument("--n-bats", type=int, default=250, help="seeded sample of BATS test (0: all 1,799)")
    ap.add_argument("--n-google", type=int, default=150, help="seeded sample of Google test (0: all 500)")
    ap.add_argument("--sets", default="bats_test,google_test", help="test sets to score (two processes can share "
                    "one --out once its selection.json is written, one set each)")
    ap.add_argument("--semeval-per-relation", type=int, default=1)
    ap.add_argument("--held", type=float, default=0.3)
    ap.add_argument("--limit-train", type=int, default=0, help="use only this many training analogies (smoke runs)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--combiner-lr", type=float, default=0.05, help="Adam step of the affine combiner; its inputs "
                    "are logp/T (tens of nats at T=0.25), so a step moves each logit by ~lr x sum|logp/T|")
    ap.add_argument("--skip-learned", action="store_true", help="leave out the affine combiner (issue 17: at "
                    "these sizes early stopping keeps its identity start, i.e. the softmax CFV)")
    ap.add_argument("--tune-scales", default="0.25,0.5,1,2", help="scale grid of the issue-25 variants")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=208, help="rows per forward (208 = two stems' profiles over a "
                    "104-entry bank; 1.7x faster than 48 here, same numbers to ~1e-5)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from fv_remote.relational.analogy import (AnalogyResult, AnalogySettings, _group_of, bootstrap_ci, cfv_weights,
                                              check_items, relation_profile)
    from fv_remote.relational.bank import RelationBank
    from fv_remote.relational.bank_sources import select_sources
    from fv_remote.relational.overlap import find_overlap
    from fv_remote.relational.combiner_fit import (TEMPERATURES, analogies_from_relations, choice_hits_shared,
                                                   choose_scale, choose_softmax, fit_combiner)
    from fv_remote.data import read_mc_analogies
    from fv_remote.data.sources import semeval_relations
    from fv_remote.models.loading import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.data_root)
    timing: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timing[name] = round(now - clock, 1)
        clock = now
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {timing[name]} s", flush=True)

    model = load_model(args.model, dtype=args.dtype)
    bank = select_sources(RelationBank.load(args.bank), args.sources.split(","), args.bank)
    base = AnalogySettings(n_boot=2000, seed=args.seed, batch_size=args.batch_size)
    print(f"bank: {len(bank)} relations from {args.sources}", flush=True)

    def profile(name: str, items) -> torch.Tensor:
        path = out / f"profile_{name}.pt"
        stems = [list(it.stem) for it in items]
        if path.is_file():
            saved = torch.load(path)
            if saved["stems"] == stems and saved["bank"] == bank.names and saved.get("dtype", "float32") == args.dtype:
                return saved["logp"]
        logp = relation_profile(model, bank, [it.stem for it in items], base)
        torch.save({"stems": stems, "bank": bank.names, "logp": logp, "dtype": args.dtype}, path)
        lap(f"profile {name} ({len(items)} items x {len(bank)})")
        return logp

    # --- training analogies, split into train / held-aside -------------------------------------------------
    semeval = semeval_relations(root / "semeval2012_task2").tasks
    pool = (read_mc_analogies(root / "bats" / "bats_valid.jsonl") + read_mc_analogies(root / "bats" /
                                                                                       "google_valid.jsonl")
            + analogies_from_relations(semeval, args.semeval_per_relation, 4, args.seed))
    pool, skipped = check_items(model.tokenizer, pool, base)
    random.Random(args.seed).shuffle(pool)
    if args.limit_train:
        pool = pool[:args.limit_train]
    n_held = round(args.held * len(pool))
    held, train = pool[:n_held], pool[n_held:]
    print(f"training analogies: {len(train)} train, {len(held)} held aside, {len(skipped)} skipped", flush=True)
    logp_train, logp_held = profile("train", train), profile("held", held)

    sel_path = out / "selection.json"
    sel = json.loads(sel_path.read_text()) if sel_path.is_file() else {}
    if sel.get("bank") != bank.names or sel.get("dtype", "float32") != args.dtype:
        sel = {"dtype": args.dtype}
    from fv_remote.relational.combiner_fit import Selection

    if "softmax" not in sel:  # the softmax choice does not depend on the combiner
        soft = choose_softmax(model, bank, held, logp_held, base)
        lap("choose T and scale (softmax)")
        sel.update(softmax={"temperature": soft.temperature, "scale": soft.scale, "grid": soft.grid}, dtype=args.dtype,
                   n_train=len(train), n_held=len(held), n_skipped=len(skipped), bank=bank.names)
        sel_path.write_text(json.dumps(sel, indent=1))
    soft = Selection(sel["softmax"]["temperature"], sel["softmax"]["scale"], sel["softmax"]["grid"])
    learned_ok = sel.get("learned") and sel.get("combiner_lr", 0.05) == args.combiner_lr and \
        sel.get("steps", args.steps) == args.steps
    if not args.skip_learned and not learned_ok:
        s_fit = AnalogySettings(**{**base.as_dict(), "template": base.template, "temperature": soft.temperature,
                                   "scale": soft.scale})
        comb = fit_combiner(model, bank, train, logp_train, held, logp_held, s_fit, steps=args.steps,
                            lr=args.combiner_lr)
        lap("train combiner")
        comb.save(out / "combiner.safetensors")
        learned_w = torch.softmax(comb.logits(logp_held), -1)
        lscale = choose_scale(model, bank, held, learned_w, s_fit)
        lap("choose scale (learned)")
        sel.update(learned={"temperature": soft.temperature, "scale": lscale.scale, "grid": lscale.grid,
                            "best_step": comb.meta["best_step"], "held_acc": comb.meta["held_acc"],
                            "history": comb.meta["history"]}, combiner_lr=args.combiner_lr, steps=args.steps)
        sel_path.write_text(json.dumps(sel, indent=1))

    # issue 25's variants, each (T, scale) chosen on the held-aside part
    mu, sd = logp_train.mean(0), logp_train.std(0).clamp_min(1e-6)

    def standardised(logp: torch.Tensor) -> torch.Tensor:
        return (logp - mu) / sd

    tune_scales = tuple(float(x) for x in args.tune_scales.split(","))
    variants = sel.setdefault("variants", {})
    for key, method, prof in (("icl_qa+cfv_tuned", "icl_qa+cfv", logp_held),
                              ("cfv_z", "cfv", standardised(logp_held)),
                              ("icl_qa+cfv_z", "icl_qa+cfv", standardised(logp_held))):
        if key in variants and variants[key].get("scales") == list(tune_scales):
            continue
        v = choose_softmax(model, bank, held, prof, base, TEMPERATURES, tune_scales, method)
        variants[key] = {"method": method, "temperature": v.temperature, "scale": v.scale, "grid": v.grid,
                         "scales": list(tune_scales)}
        lap(f"choose T and scale ({key})")
        sel_path.write_text(json.dumps(sel, indent=1))
    if "held_baselines" not in sel:  # what the variants are chosen against: the vector-free prompts, held aside
        q, o = (choice_hits_shared(model, bank, held, m, [(None, 1.0)], base)[0] for m in ("no_vector", "icl_qa"))
        sel["held_baselines"] = {"no_vector": float(q.mean()), "icl_qa": float(o.mean())}
        sel_path.write_text(json.dumps(sel, indent=1))
    if "family_gate" not in sel:
        # Gate by relation family, chosen on the validation analogies that carry BATS/Google families (BATS valid
        # + Google valid, train and held-aside parts alike: nothing is fitted on them here): add the CFV to the
        # one-shot prompt only for families where that beat the one-shot prompt there. Unseen families: the
        # pooled validation answer.
        val = [(it, lp) for part_items, part_logp in ((train, logp_train), (held, logp_held))
               for it, lp in zip(part_items, part_logp) if _group_of(it, "family") in FAMILIES]
        items_v = [it for it, _ in val]
        w_v = cfv_weights(torch.stack([lp for _, lp in val]), soft.temperature)
        one_v, both_v = choice_hits_shared(model, bank, items_v, "icl_qa+cfv", [(None, 1.0), (w_v, soft.scale)],
                                           base)
        gate, fams = {}, sorted({_group_of(it, "family") for it in items_v})
        for fam in fams:
            idx = [k for k, it in enumerate(items_v) if _group_of(it, "family") == fam]
            gate[fam] = {"n": len(idx), "icl_qa": float(one_v[idx].mean()), "icl_qa+cfv": float(both_v[idx].mean()),
                         "add": bool(both_v[idx].mean() > one_v[idx].mean())}
        gate["(unseen)"] = {"n": len(items_v), "icl_qa": float(one_v.mean()), "icl_qa+cfv": float(both_v.mean()),
                            "add": bool(both_v.mean() > one_v.mean())}
        sel["family_gate"] = gate
        sel_path.write_text(json.dumps(sel, indent=1))
        lap("family gate on validation")
    for fam, g in sel["family_gate"].items():
        print(f"validation {fam} (n={g['n']}): one-shot {g['icl_qa']:.3f}, + CFV {g['icl_qa+cfv']:.3f} -> "
              f"{'add' if g['add'] else 'leave out'} the CFV", flush=True)
    print(f"held-aside, no vector: {sel['held_baselines']['no_vector']:.3f}, one-shot: "
          f"{sel['held_baselines']['icl_qa']:.3f}", flush=True)
    from fv_remote.relational.analogy import Combiner

    learned = None if args.skip_learned else Combiner.load(out / "combiner.safetensors")
    t_soft, sc_soft = soft.temperature, soft.scale
    print(f"chosen: softmax T={t_soft} scale={sc_soft}" + ("" if learned is None else
          f"; learned scale={sel['learned']['scale']} (best step {sel['learned']['best_step']})"), flush=True)
    for key, v in variants.items():
        at = f"T={v['temperature']:g},scale={v['scale']:g}"
        print(f"chosen: {key} {at} (held-aside accuracy {v['grid'][at]:.3f})", flush=True)

    # --- test sets ------------------------------------------------------------------------------------------
    results = {}
    for name, file, n in (("bats_test", "bats_test.jsonl", args.n_bats), ("google_test", "google_test.jsonl",
                                                                           args.n_google)):
        if name not in args.sets.split(","):
            continue
        items = read_mc_analogies(root / "bats" / file)
        total = len(items)
        random.Random(args.seed).shuffle(items)
        if n:
            items = items[:n]
        kept, skipped = check_items(model.tokenizer, items, base)
        logp = profile(name, kept)
        w_soft = cfv_weights(logp, t_soft)
        onehot = torch.nn.functional.one_hot(w_soft.argmax(-1), len(bank)).float()

        def at(scale: float) -> AnalogySettings:
            return AnalogySettings(**{**base.as_dict(), "template": base.template, "scale": scale})

        plan = [("no_vector", "no_vector", None, base), ("icl_qa", "icl_qa", None, base),
                ("best_ffv", "best_ffv", onehot, at(sc_soft)), ("cfv", "cfv", w_soft, at(sc_soft))]
        if learned is not None:
            plan.append(("cfv_learned", "cfv", torch.softmax(learned.logits(logp), -1), at(sel["learned"]["scale"])))
        plan.append(("icl_qa+cfv", "icl_qa+cfv", w_soft, at(sc_soft)))
        for key, v in variants.items():
            prof = standardised(logp) if key.endswith("_z") else logp
            plan.append((key, v["method"], cfv_weights(prof, v["temperature"]), at(v["scale"])))
        # per-method hits saved as they finish, keyed by everything that decides them
        key_of = {"bank": bank.names, "stems": [list(it.stem) for it in kept], "selection": {
            "softmax": sel["softmax"], "variants": variants, "learned": None if learned is None else sel["learned"]}}
        part_path = out / f"{name}.hits.json"
        part = json.loads(part_path.read_text()) if part_path.is_file() else {}
        if part.get("key") != key_of:
            part = {"key": key_of, "hits": {}}
        for kind in ("query", "one_shot"):  # the methods of one prompt kind share its forwards
            todo = [(m, rows_of, w, st) for m, rows_of, w, st in plan if m not in part["hits"]
                    and (rows_of in ("icl_qa", "icl_qa+cfv")) == (kind == "one_shot")]
            if todo:
                hits = choice_hits_shared(model, bank, kept, todo[0][1], [(w, st.scale) for _, _, w, st in todo],
                                          base)
                part["hits"].update({m: h.tolist() for (m, *_), h in zip(todo, hits)})
                part_path.write_text(json.dumps(part))
                lap(f"{name} {', '.join(m for m, *_ in todo)}")
        correct = {m: np.asarray(part["hits"][m]) for m, *_ in plan}
        gate = sel["family_gate"]
        adds = np.array([gate.get(_group_of(it, "family"), gate["(unseen)"])["add"] for it in kept])
        correct["icl_qa+cfv_gated"] = np.where(adds, correct["icl_qa+cfv"], correct["icl_qa"])
        res = AnalogyResult(len(kept), len(skipped), float(sum(1 / len(it.choices) for it in kept) / len(kept)),
                            correct, w_soft, bank.names, kept, skipped, base, "softmax", "family")
        data = res.as_json()
        data["gain"] = {}  # every CFV variant against every vector-free baseline and the best single FFV, paired
        for a in [m for m in correct if "cfv" in m]:
            for b in ("no_vector", "icl_qa", "best_ffv", "cfv", "icl_qa+cfv"):
                if a != b and b in correct:
                    diff = correct[a] - correct[b]
                    data["gain"][f"{a}_minus_{b}"] = {"mean": float(diff.mean()),
                                                      "ci95": bootstrap_ci(diff, base.n_boot, base.seed)}
        clean = np.array([not hit for hit in find_overlap(bank, [[it.stem, *it.choices] for it in kept]).hits])
        data["diagnosis"] = diagnose(res._groups("family"), correct, w_soft, base, clean)
        data.update(sample=f"seeded sample of {len(items)} of {total} (seed {args.seed})" if n else f"all {total}",
                    selection=sel, bank_sources=args.sources, bank_size=len(bank))
        (out / f"{name}.json").write_text(json.dumps(data, indent=1))
        results[name] = data
    timing_path = out / "timing.json"
    old = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    timing_path.write_text(json.dumps({**old, **timing}, indent=1))
    for name, data in results.items():
        acc, ci = data["accuracy"], data["ci95"]
        print(f"\n{name}: n={data['n']} ({data['sample']}), skipped {data['n_skipped']}, chance {data['chance']:.3f}")
        for m in acc:
            print(f"  {m:12s} {acc[m]:.3f}  [{ci[m][0]:.3f}, {ci[m][1]:.3f}]")
        for k, g in data["gain"].items():
            print(f"  {k:28s} {g['mean']:+.3f}  [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]")
        methods = list(acc)
        print(f"\n| family | n | {' | '.join(methods)} | cfv − no vector |")
        print("|---|---|" + "---|" * (len(methods) + 1))
        for fam, g in data["by_group"].items():
            cells = [f"{g['accuracy'][m]:.3f} [{g['ci95'][m][0]:.2f}, {g['ci95'][m][1]:.2f}]" for m in methods]
            gain = g["gain"]["cfv_minus_no_vector"]
            print(f"| {fam} | {g['n']} | {' | '.join(cells)} | {gain['mean']:+.3f} [{gain['ci95'][0]:+.2f}, "
                  f"{gain['ci95'][1]:+.2f}] |")
        dx = data["diagnosis"]
        print(f"\none-shot vs one-shot + CFV, items: {dx['one_shot_vs_with_cfv']}")
        with_cfv = [m for m in methods if m.startswith("icl_qa+cfv")]
        print(f"\n| group | n | one-shot | {' | '.join(v + ' − one-shot' for v in with_cfv)} |")
        print("|---|---|---|" + "---|" * len(with_cfv))
        for kind in ("by_family", "by_confidence", "no_overlap"):
            groups = {"items sharing no pair with a bank entry's training pairs": dx[kind]} \
                if kind == "no_overlap" else dx[kind]
            for grp, g in groups.items():
                if g is None:
                    continue
                label = grp if kind != "by_confidence" else f"top weight {grp} ({g['top_weight'][0]:.2f}-" \
                                                        f"{g['top_weight'][1]:.2f})"
                cells = [f"{g[v]['mean']:+.3f} [{g[v]['ci95'][0]:+.2f}, {g[v]['ci95'][1]:+.2f}]" for v in with_cfv]
                print(f"| {label} | {g['n']} | {g['icl_qa']:.3f} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
