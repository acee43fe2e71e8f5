"""Attribution head scores vs exact CMA: cost ratio, rank agreement, and the FV each ranking gives.

Per task (BENCH_TASKS, default present-past,singular-plural): the same 25 ten-shot shuffled-label prompts and
mean activations (100 clean prompts) for both methods; all 270 heads.

  cost_ratio_vs_exact            = exact fast CMA seconds / attribution seconds (25 prompts, same run)
  cost_ratio_vs_separate_forwards = (270 + 1) * seconds per full-prompt forward / attribution seconds per prompt
  spearman_rho                   = rank correlation of the two AIE maps (270 heads), per task
  top10_overlap                  = heads shared by the two top-10 lists
  zero_shot_acc                  = test zero-shot top-1 accuracy without an FV and with the FV built from each
                                   method's top-10 heads, each at its own best layer on a validation sweep
"""

import os

import numpy as np
import torch

from _common import Timer, emit, load, log, means_for, setup, task

from fv_remote.fv import cma
from fv_remote.fv.attribution import attribution_prompt
from fv_remote.fv.evaluate import best_layer, layer_sweep
from fv_remote.fv.steering import Steer, top1_accuracy
from fv_remote.fv.vectors import build_function_vector, top_heads

TASKS = os.environ.get("BENCH_TASKS", "present-past,singular-plural").split(",")
N_PROMPTS = int(os.environ.get("BENCH_PROMPTS", "25"))
K = 10


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(a, b).statistic)
    except ImportError:  # no ties in practice for float scores
        ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
        return float(np.corrcoef(ra, rb)[0, 1])


def fv_accuracy(model, prepared, means, aie) -> tuple[float, int]:
    fv = build_function_vector(model, prepared.name, means, aie, k=K)
    layer = best_layer(layer_sweep(model, prepared, fv))
    test = prepared.prompts("test", len(prepared.splits.test), kind="zero_shot", n_shots=0, seed_offset=2)
    return top1_accuracy(model, [p.text for p in test], prepared.ids(test), Steer(fv, layer=layer)), layer


def main() -> None:
    env = setup()
    model = load()
    ad = model.adapter
    t_exact, t_attr, t_forward = Timer(), Timer(), Timer()
    n_forward = 0
    out = {"spearman_rho": {}, "top10_overlap": {}, "zero_shot_acc": {}, "best_layer": {}}
    for name in TASKS:
        relation, prepared = task(model, name)
        means = means_for(model, relation)
        prompts = prepared.prompts("train", N_PROMPTS, kind="shuffled", n_shots=10, seed_offset=1)
        exact, attr = [], []
        for p in prompts:
            answer = prepared.answer_token[p.answer]
            with t_exact:
                exact.append(cma.cma_prompt_fast(model, p.text, answer, means)[1])
            with t_attr:
                attr.append(attribution_prompt(model, p.text, answer, means)[1])
            ids = model.tokenizer(p.text, return_tensors="pt").input_ids
            with t_forward, torch.no_grad():
                model.hf(input_ids=ids, logits_to_keep=1)
            n_forward += 1
        aie_exact = torch.stack(exact).mean(0).view(ad.n_layers, ad.n_heads)
        aie_attr = torch.stack(attr).mean(0).view(ad.n_layers, ad.n_heads)
        rho = spearman(aie_exact.flatten().numpy(), aie_attr.flatten().numpy())
        top_e = {(a, b) for a, b, _ in top_heads(aie_exact, k=K)}
        top_a = {(a, b) for a, b, _ in top_heads(aie_attr, k=K)}
        acc_e, layer_e = fv_accuracy(model, prepared, means, aie_exact)
        acc_a, layer_a = fv_accuracy(model, prepared, means, aie_attr)
        test = prepared.prompts("test", len(prepared.splits.test), kind="zero_shot", n_shots=0, seed_offset=2)
        acc_0 = top1_accuracy(model, [p.text for p in test], prepared.ids(test))
        out["spearman_rho"][name] = round(rho, 3)
        out["top10_overlap"][name] = len(top_e & top_a)
        out["zero_shot_acc"][name] = {"none": round(acc_0, 3), "cma": round(acc_e, 3), "attribution": round(acc_a, 3),
                                      "n_test": len(test)}
        out["best_layer"][name] = {"cma": layer_e, "attribution": layer_a}
        log(f"{name}: rho {rho:.3f}, top-10 overlap {len(top_e & top_a)}, zero-shot {acc_0:.2f} -> "
            f"FV(cma) {acc_e:.2f} @ {layer_e}, FV(attribution) {acc_a:.2f} @ {layer_a}")
    n_total = N_PROMPTS * len(TASKS)
    emit({
        "bench": "attribution",
        "cost_ratio_vs_exact": round(t_exact.seconds / t_attr.seconds, 2),
        "cost_ratio_vs_separate_forwards": round((ad.n_layers * ad.n_heads + 1) * (t_forward.seconds / n_forward)
                                                 / (t_attr.seconds / n_total), 1),
        **out,
        "heads": ad.n_layers * ad.n_heads, "prompts": N_PROMPTS, "k": K,
        "attribution_s_per_prompt": round(t_attr.seconds / n_total, 3),
        "exact_s_per_prompt": round(t_exact.seconds / n_total, 3),
        "forward_s": round(t_forward.seconds / n_forward, 3),
        "model": model.model_id, **env,
    })


if __name__ == "__main__":
    main()
