"""Head-score cost per prompt: AttnLRP (lxt rules), the paper's attention variant and gradient attribution vs the
fast exact CMA, on the same prompts, interleaved (smollm2-135m, BENCH_TASK default present-past).

BENCH_LRP_PROMPTS (default 10) ten-shot prompts: the shuffled ones CMA and attribution score and the clean ones
(same queries and demonstrations) LRP scores; all 270 heads; one warm-up prompt per method first, untimed.

  cost_ratio_lrp_vs_fast_cma           = LRP seconds per prompt / fast exact CMA seconds per prompt
  cost_ratio_lrp_attention_vs_fast_cma = the same for the Fast & Faithful FV paper's variant
  cost_ratio_gradient_vs_fast_cma      = the same for gradient x (mean - corrupted) attribution
  *_forwards                            = seconds per prompt / seconds of one plain forward of the prompt
  projection_llama31_70b               = the token-layer count model below, fitted to nothing, for 80 x 64 heads

Cost model (compute-bound, per prompt of T tokens, L layers, H heads; unit = one token through one layer):
fast CMA = T L (the prompt) + sum over heads of the layers from the head's up (one last-token copy each)
         = T L + H L (L + 1) / 2, i.e. 1 + H (L + 1) / (2 T) prompt forwards, growing with the number of heads;
gradient / LRP = (T - 1) L (the prefix, no gradients) + ~3 L (last token forward + backward)
         = ~1 + 2 / T forwards, whatever the number of heads.
"""

import os

import torch

from _common import Timer, emit, load, log, means_for, setup, task

from fv_remote.fv import cma

from fv_remote.fv import lrp
from fv_remote.fv.attribution import attribution_prompt

TASK = os.environ.get("BENCH_TASK", "present-past")
N_PROMPTS = int(os.environ.get("BENCH_LRP_PROMPTS", "10"))


def forwards(n_heads: int, n_layers: int, tokens: float) -> dict:
    """Predicted cost per prompt in prompt forwards (the cost model in the docstring)."""
    cma_fw = 1 + n_heads * (n_layers + 1) / (2 * tokens)
    grad_fw = 1 + 2 / tokens
    return {"fast_cma_forwards": round(cma_fw, 2), "gradient_or_lrp_forwards": round(grad_fw, 3),
            "fast_cma_vs_lrp": round(cma_fw / grad_fw, 1)}


def main() -> None:
    env = setup()
    model = load()
    ad = model.adapter
    relation, prepared = task(model, TASK)
    means = means_for(model, relation)
    shuffled = prepared.prompts("train", N_PROMPTS, kind="shuffled", n_shots=10, seed_offset=1)
    clean = prepared.prompts("train", N_PROMPTS, kind="clean", n_shots=10, seed_offset=1)
    separator = prepared.template.separator
    runs = {
        "fast_cma": lambda s, c, a: cma.cma_prompt_fast(model, s, a, means),
        "gradient": lambda s, c, a: attribution_prompt(model, s, a, means),
        "lrp": lambda s, c, a: lrp.lrp_prompt(model, c, a),
        "lrp_attention": lambda s, c, a: lrp.lrp_attention_prompt(model, c, a, lrp.demo_end(c, separator)),
    }
    timers = {name: Timer() for name in [*runs, "forward"]}
    first = (shuffled[0].text, clean[0].text, prepared.answer_token[shuffled[0].answer])
    for fn in runs.values():  # warm-up
        fn(*first)
    tokens = []
    for i, (s, c) in enumerate(zip(shuffled, clean)):
        answer = prepared.answer_token[s.answer]
        for name, fn in runs.items():
            with timers[name]:
                fn(s.text, c.text, answer)
        ids = model.tokenizer(c.text, return_tensors="pt").input_ids
        tokens.append(ids.shape[1])
        with timers["forward"], torch.no_grad():
            model.hf(input_ids=ids, logits_to_keep=1)
        log(f"prompt {i + 1}/{N_PROMPTS}: " + ", ".join(f"{k} {t.seconds:.1f}s" for k, t in timers.items()))
    per = {name: t.seconds / N_PROMPTS for name, t in timers.items()}
    mean_tokens = sum(tokens) / len(tokens)
    emit({
        "bench": "lrp",
        "cost_ratio_lrp_vs_fast_cma": round(per["lrp"] / per["fast_cma"], 3),
        "cost_ratio_lrp_attention_vs_fast_cma": round(per["lrp_attention"] / per["fast_cma"], 3),
        "cost_ratio_gradient_vs_fast_cma": round(per["gradient"] / per["fast_cma"], 3),
        **{f"{name}_forwards": round(per[name] / per["forward"], 2) for name in runs},
        **{f"{name}_s_per_prompt": round(per[name], 3) for name in [*runs, "forward"]},
        "predicted_smollm2": forwards(ad.n_heads, ad.n_layers, mean_tokens),
        "projection_llama31_70b": {"layers": 80, "heads": 64, "tokens": round(mean_tokens),
                                   **forwards(64, 80, mean_tokens)},
        "heads": ad.n_layers * ad.n_heads, "prompts": N_PROMPTS, "mean_tokens": round(mean_tokens, 1), "task": TASK,
        "model": model.model_id, **env,
    })


if __name__ == "__main__":
    main()
