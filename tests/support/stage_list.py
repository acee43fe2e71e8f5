"""The stage list on one model, small: extract -> cma (fast, attribution, and lrp where the family has rules) -> fit
(+ sweep) -> steer -> residuals -> fit --method (task vector, ICV, mean-diff, PCA) -> evaluate (+ sweep, distributed) -> steer (score, generate) -> finetune -> bank build -> decode ->
analogy (+ align's relation profiles). Returns the numbers each stage produced, so a run on another device, dtype
or placement can be compared with a plain CPU float32 run (tests/models/test_placement_devices.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "relational"
WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
PAIRS = [(a, b) for a in WORDS for b in WORDS if a != b][:40]
LRP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _np(x: Any) -> np.ndarray:
    return np.asarray(torch.as_tensor(x).detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x,
                      dtype=np.float64)


def run_stages(model: Any, folder: Path, family: str = "", upto: str = "analogy",
               cma_methods: tuple[str, ...] = ("fast", "attribution", "lrp")) -> dict[str, Any]:
    """Every stage on `model`, results (arrays and floats) by name; `upto="steer"` stops after steering."""
    from fv_remote.baselines.builders import METHODS
    from fv_remote.baselines.fit import fit_vector
    from fv_remote.baselines.residuals import load_residuals, read_residual_stream
    from fv_remote.data import RelationTask, load_task, read_mc_analogies
    from fv_remote.data.tasks import prepare_task
    from fv_remote.fv.cma import load_aie, run_cma
    from fv_remote.fv.evaluate import evaluate, fit_function_vector
    from fv_remote.fv.extract import extract, mean_heads_tensor
    from fv_remote.fv.steering import Steer, generate_many, last_logits, top1_accuracy
    from fv_remote.relational.analogy import AnalogySettings, relation_profile, run_analogies
    from fv_remote.relational.bank import RelationBank
    from fv_remote.relational.bank_build import build_bank
    from fv_remote.relational.decode import decode_many
    from fv_remote.relational.ffv import FinetuneSettings, train_ffv
    from fv_remote.store.activations import ActivationStore

    out: dict[str, Any] = {}
    task = RelationTask("toy", PAIRS)
    prepared = prepare_task(model.tokenizer, task, seed=0, min_pairs=4)
    store = ActivationStore(str(folder / "store.zarr"))
    extract(model, task, store, n_prompts=4, n_shots=3, batch_size=2)
    out["extract.head_out"] = _np(store.open("toy")["head_out"].values)
    means = mean_heads_tensor(store, "toy", only_correct=False)
    out["means"] = _np(means)
    for method in cma_methods:
        if method.startswith("lrp") and family not in LRP_FAMILIES:
            continue
        run_cma(model, prepared, store, means, n_prompts=2, n_shots=3, method=method)
        source = "cma" if method == "fast" else method
        out[f"cma.{method}"] = _np(load_aie(store, "toy", 2, source=source).values)
    aie = load_aie(store, "toy", 2, source="cma")
    fv, sweep = fit_function_vector(model, prepared, means, aie, k=3, sweep=True, n_prompts=4, batch_size=4)
    out["fit.vector"], out["fit.layer"] = _np(fv.vector), fv.layer
    out["fit.sweep"] = _np([sweep[k] for k in sorted(sweep)]) if sweep else _np([])
    fv.vector = fv.vector * 4  # strong enough to move a random model's top-1 tokens
    steer = Steer(fv, scale=1.0)
    texts = ["Q: hot\nA:", "Q: the quick brown\nA:", "Q: up\nA: down\n\nQ: big\nA:"]
    out["steer.logits"] = _np(last_logits(model, texts, steer))
    out["steer.all"] = _np(last_logits(model, texts, Steer(fv, scale=1.0, positions="all")))
    out["steer.distributed"] = _np(last_logits(model, texts, Steer(fv, scale=4.0, distributed=True)))
    read_residual_stream(model, task, store, n_prompts=3, n_shots=3, batch_size=2)
    reads = load_residuals(store, "toy")
    out["residuals.icl"], out["residuals.zero_shot"] = _np(reads.icl), _np(reads.zero_shot)
    for method in METHODS:
        vec, vec_sweep = fit_vector(model, prepared, reads, method, n_prompts=4, batch_size=4)
        out[f"fit.{method}"], out[f"fit.{method}.layer"] = _np(vec.vector), vec.layer
        out[f"fit.{method}.sweep"] = _np([vec_sweep[k] for k in sorted(vec_sweep)])
        out[f"steer.{method}"] = _np(last_logits(model, texts, Steer(vec)))
    if upto == "steer":
        return out
    out["steer.accuracy"] = top1_accuracy(model, texts, [5, 6, 7], steer)
    out["generate"] = generate_many(model, [(texts[0], None), (texts[0], steer),
                                           (texts[1], Steer(fv, positions="all"))], max_new_tokens=3)
    ev = evaluate(model, prepared, fv, n_test=4, n_shots=3, sweep=True, sweep_batch_size=4)
    sc = ev.scores
    out["evaluate"] = _np([sc.zero_shot, sc.zero_shot_fv, sc.shuffled, sc.shuffled_fv, sc.icl, sc.layer])
    # tiny random models seldom beat their start: keep it on purpose (the numbers across devices are the point)
    settings = FinetuneSettings(steps=3, lr=0.5, eval_every=2, allow_unchanged=True)
    run = train_ffv(model, prepared, fv, init="fv", layer=1, n_train=4, n_valid=4, settings=settings)
    out["finetune.vector"] = _np(run.result.ffv.vector)
    out["finetune.loss"] = _np(run.result.history["train_loss"])
    bank_path = folder / "bank.safetensors"
    build_bank(model, [load_task(FIX / "opposites.json"), load_task(FIX / "echo.json")], bank_path, layer=1,
               n_train=4, n_valid=4, settings=FinetuneSettings(steps=2, lr=0.5, allow_unchanged=True))
    bank = RelationBank.load(bank_path)
    out["bank.vectors"] = _np(bank.vectors)
    decoded = decode_many(model, [("fv", fv.vector), ("ffv", run.result.ffv.vector)], words=["cold", "dog"], k=5)
    out["decode.top"] = [[t for t, _ in d.top] for d in decoded]
    out["decode.logits"] = _np([[v for _, v in d.top] for d in decoded])
    out["profile"] = _np(relation_profile(model, bank, [("hot", "cold"), ("dog", "dog")]))
    items = read_mc_analogies(FIX / "mc.jsonl")
    res = run_analogies(model, bank, items, AnalogySettings(n_boot=20))
    out["analogy"] = res.as_json()
    return out


def compare(got: dict[str, Any], want: dict[str, Any], atol: float, skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the results that differ (arrays beyond atol; anything else unequal)."""
    bad = []
    for key, value in want.items():
        if key in skip or key not in got:
            continue
        other = got[key]
        if isinstance(value, np.ndarray):
            if value.shape != np.shape(other) or not np.allclose(other, value, atol=atol, rtol=0):
                diff = np.abs(np.asarray(other) - value).max() if value.shape == np.shape(other) else "shape"
                bad.append(f"{key} (max diff {diff})")
        elif value != other:
            bad.append(f"{key}: {other!r} != {value!r}")
    return bad
