"""Tracing overhead: nnsight extraction of every head vs the same forward with plain PyTorch hooks.

One batch of BENCH_TRACE_BATCH (default 16) ten-shot clean prompts; both sides read all 30 head-site inputs at the
last token and the answer statistics, with identical tokenisation (left padding, mask-derived position ids). The
sides alternate within each repetition; the ratio is the median of per-repetition ratios (robust to load drift).

  overhead_vs_hooks          = nnsight (fv_remote.fv.extract.trace_heads) / plain forward + forward-pre-hooks
  overhead_vs_plain_forward  = nnsight / plain forward without hooks
  max_abs_diff               = max |head outputs (nnsight) - head outputs (hooks)|
"""

import os
import statistics

import torch

from _common import Timer, emit, load, log, setup, task

from fv_remote.fv.extract import trace_heads
from fv_remote.traces.heads import answer_stats

TASK = os.environ.get("BENCH_TASK", "present-past")
BATCH = int(os.environ.get("BENCH_TRACE_BATCH", "16"))
REPS = int(os.environ.get("BENCH_TRACE_REPS", "9"))


def main() -> None:
    env = setup()
    model = load()
    ad = model.adapter
    _, prepared = task(model, TASK)
    prompts = prepared.prompts("train", BATCH, kind="clean", n_shots=10)
    texts, answers = [p.text for p in prompts], prepared.ids(prompts)
    tok = model.tokenizer
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True).to(model.hf.device)
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    ids = torch.tensor(answers, device=model.hf.device)
    sites = [ad.head_site(model.hf, layer) for layer in range(ad.n_layers)]

    def plain(hooks: bool):
        captured = []
        handles = []
        if hooks:
            for site in sites:
                handles.append(site.register_forward_pre_hook(
                    lambda module, args: captured.append(args[0][:, -1].detach().clone())))
        try:
            with torch.no_grad():
                logits = model.hf(**enc, position_ids=position_ids).logits[:, -1]
            prob, top1, _ = answer_stats(logits, ids)
        finally:
            for h in handles:
                h.remove()
        heads = torch.stack(captured, 1).view(len(texts), ad.n_layers, ad.n_heads, ad.head_dim) if hooks else None
        return heads, prob, top1

    def nns():
        with torch.no_grad():
            return trace_heads(model, texts, answers)

    nns(), plain(True), plain(False)  # warm-up
    ratios_hooks, ratios_plain = [], []
    t_n, t_h, t_p = [], [], []
    for rep in range(REPS):
        order = [("n", nns), ("h", lambda: plain(True)), ("p", lambda: plain(False))]
        if rep % 2:
            order.reverse()
        times = {}
        for key, fn in order:
            with Timer() as t:
                fn()
            times[key] = t.seconds
        t_n.append(times["n"])
        t_h.append(times["h"])
        t_p.append(times["p"])
        ratios_hooks.append(times["n"] / times["h"])
        ratios_plain.append(times["n"] / times["p"])
        log(f"rep {rep}: nnsight {times['n']:.3f}s hooks {times['h']:.3f}s plain {times['p']:.3f}s")
    out_n = nns()
    heads_h, prob_h, _ = plain(True)
    emit({
        "bench": "tracing",
        "overhead_vs_hooks": round(statistics.median(ratios_hooks), 3),
        "overhead_vs_plain_forward": round(statistics.median(ratios_plain), 3),
        "max_abs_diff": float(f"{float((out_n['heads'][:, 0] - heads_h).abs().max()):.3g}"),
        "batch": BATCH, "tokens": int(enc["input_ids"].shape[1]), "reps": REPS,
        "nnsight_s": round(statistics.median(t_n), 3), "hooks_s": round(statistics.median(t_h), 3),
        "plain_s": round(statistics.median(t_p), 3), "model": model.model_id, **env,
    })


if __name__ == "__main__":
    main()
