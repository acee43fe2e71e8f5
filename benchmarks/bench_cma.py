"""CMA: fast exact mediation vs one-invoke-per-head full-prompt patching vs separate forwards (smollm2-135m).

25 ten-shot shuffled-label prompts (the ones `run_cma` uses), all 270 heads, real mean activations (100 clean
prompts). The fast method runs on all 25 prompts. The baselines are far slower, so by default they run on the
first BENCH_IPH_PROMPTS prompts (default 2; all heads) interleaved with the fast method on the same prompts, and
separate forwards on BENCH_NAIVE_HEADS heads (default 18, spread over all layers) extrapolated to 270 + 1 forwards
per prompt. Set BENCH_IPH_PROMPTS=25 for the full comparison (~1 h on 2 CPU cores).

  speedup_vs_invoke_per_head    = invoke-per-head seconds / fast seconds, same prompts
  speedup_vs_separate_forwards  = (270 + 1) * seconds per separate forward / fast seconds, same prompts
  max_abs_diff                  = max |fast - reference| over every compared (prompt, head)
  fast_flops_per_s              = the fast method's matmul FLOPs (torch's counter, all prompts) / its seconds
  fast_vs_matmul_peak           = fast_flops_per_s / this machine's [2048, 2048] matmul throughput, measured in
                                  the same run before and after the timed work (the better of the two)
"""

import os

import torch

from _common import Timer, count_flops, emit, load, log, matmul_flops_per_s, means_for, setup, task

from fv_remote.fv import cma

TASK = os.environ.get("BENCH_TASK", "present-past")
N_PROMPTS = int(os.environ.get("BENCH_PROMPTS", "25"))
N_IPH = int(os.environ.get("BENCH_IPH_PROMPTS", "2"))
N_NAIVE_HEADS = int(os.environ.get("BENCH_NAIVE_HEADS", "18"))


def main() -> None:
    env = setup()
    model = load()
    relation, prepared = task(model, TASK)
    means = means_for(model, relation)
    heads = cma.all_heads(model)
    prompts = prepared.prompts("train", N_PROMPTS, kind="shuffled", n_shots=10, seed_offset=1)
    jobs = [(p.text, prepared.answer_token[p.answer]) for p in prompts]
    step = max(1, len(heads) // N_NAIVE_HEADS)
    subset = heads[step // 2::step][:N_NAIVE_HEADS]
    cma.cma_prompt_fast(model, jobs[0][0], jobs[0][1], means, heads=heads[:20])  # warm-up
    peak_start = matmul_flops_per_s()

    t_fast, t_iph, t_cached, t_naive = Timer(), Timer(), Timer(), Timer()
    t_fast_cmp = 0.0
    max_diff, max_diff_naive = 0.0, 0.0
    effects = []
    for i, (text, answer) in enumerate(jobs):
        with Timer() as one:
            base, fast = cma.cma_prompt_fast(model, text, answer, means)
        t_fast.seconds += one.seconds
        effects.append(fast)
        if i >= N_IPH:
            continue
        t_fast_cmp += one.seconds
        with t_iph:
            _, ref = cma.cma_prompt_invoke_per_head(model, text, answer, means)
        with t_cached:
            _, cached = cma.cma_prompt_cached_batch(model, text, answer, means)
        with t_naive:
            _, naive = cma.cma_prompt_naive(model, text, answer, means, heads=subset)
        idx = torch.tensor([heads.index(h) for h in subset])
        max_diff = max(max_diff, float((fast - ref).abs().max()), float((cached - ref).abs().max()))
        max_diff_naive = max(max_diff_naive, float((fast[idx] - naive).abs().max()))
        log(f"prompt {i}: fast {one.seconds:.2f}s, invoke-per-head {t_iph.seconds:.1f}s so far, "
            f"max|diff| {max_diff:.2e}")
    per_forward = t_naive.seconds / (N_IPH * (len(subset) + 1))  # naive runs one unpatched forward too
    attn = model.hf.config._attn_implementation
    model.hf.set_attn_implementation("eager")
    fast_flops = sum(count_flops(lambda: cma.cma_prompt_fast(model, text, answer, means)) for text, answer in jobs)
    model.hf.set_attn_implementation(attn)
    peak_end = matmul_flops_per_s()
    peak = max(peak_start, peak_end)  # the machine's limit: the better of the two (load varies on a shared CPU)
    aie = torch.stack(effects).mean(0).view(model.adapter.n_layers, model.adapter.n_heads)
    top = torch.topk(aie.flatten(), 3).indices.tolist()
    emit({
        "bench": "cma",
        "speedup_vs_invoke_per_head": round(t_iph.seconds / t_fast_cmp, 2),
        "speedup_vs_separate_forwards": round(per_forward * (len(heads) + 1) * N_IPH / t_fast_cmp, 2),
        "speedup_vs_previous_fast": round(t_cached.seconds / t_fast_cmp, 2),
        "max_abs_diff": float(f"{max(max_diff, max_diff_naive):.3g}"),
        "fast_flops_per_s": float(f"{fast_flops / t_fast.seconds:.4g}"),
        "fast_vs_matmul_peak": round(fast_flops / t_fast.seconds / peak, 3),
        "matmul_flops_per_s": float(f"{peak:.4g}"),
        "matmul_flops_per_s_start_end": [float(f"{peak_start:.4g}"), float(f"{peak_end:.4g}")],
        "fast_flops_per_prompt": fast_flops // N_PROMPTS,
        "heads": len(heads),
        "prompts": N_PROMPTS,
        "baseline_prompts": N_IPH,
        "separate_forwards_estimated_from_heads": len(subset),
        "fast_s_per_prompt": round(t_fast.seconds / N_PROMPTS, 3),
        "invoke_per_head_s_per_prompt": round(t_iph.seconds / N_IPH, 2),
        "separate_forward_s": round(per_forward, 3),
        "task": TASK, "model": model.model_id,
        "top_heads": [(i // model.adapter.n_heads, i % model.adapter.n_heads) for i in top],
        **env,
    })


if __name__ == "__main__":
    main()
