"""How each head-selection method's cost grows with the number of heads per layer.

Tiny random Llama configs with 4, 8, 16, 32 and 64 heads per layer and everything else fixed (4 layers, d_model 256,
so head_dim = 256 / heads and one forward costs the same FLOPs whatever the head count): the time per prompt of
every method that scores heads (`fv_remote.fv.cma`'s fast / cached_batch / invoke_per_head / naive, and
`fv_remote.fv.attribution`), on the same BENCH_HEADS_PROMPTS (default 2) ten-shot prompts. What grows is the method's
own work per head.

  seconds[method][heads]  = seconds per prompt
  growth[method]          = log-log slope of seconds over heads, 4 -> 64 (1.0: linear in the heads; 0: flat)
  vs_fast_at_64[method]   = seconds / fast CMA's seconds, 64 heads per layer
"""

import math
import os
import sys
from pathlib import Path

import torch

from _common import DTYPES, Timer, emit, log, options, setup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

HEADS = [int(h) for h in os.environ.get("BENCH_HEADS", "4,8,16,32,64").split(",")]
N_PROMPTS = int(os.environ.get("BENCH_HEADS_PROMPTS", "2"))
METHODS = ("fast", "cached_batch", "invoke_per_head", "naive", "attribution")
D_MODEL, N_LAYERS = 256, 4


def tiny(n_heads: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fv_remote.models.loading import wrap_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=2 * D_MODEL,
                         num_hidden_layers=N_LAYERS, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                         head_dim=D_MODEL // n_heads, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    hf = LlamaForCausalLM(config).eval().to(options().device, DTYPES[options().dtype])
    hf.requires_grad_(False)
    return wrap_model(hf, tokenizer, name=f"tiny-llama-{n_heads}h", source="random")


def main() -> None:
    from conftest import _tiny_tokenizer

    from fv_remote.fv import cma
    from fv_remote.fv.attribution import attribution_prompt

    env = setup()
    tokenizer = _tiny_tokenizer()
    words = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog"]
    prompts = ["".join(f"Q: {words[(i + j) % 12]}\nA: {words[(i + j + 5) % 12]}\n\n" for j in range(10))
               + f"Q: {words[i]}\nA:" for i in range(N_PROMPTS)]
    fns = {**cma.CMA_FUNCTIONS, "attribution": attribution_prompt}
    seconds = {m: {} for m in METHODS}
    for n_heads in HEADS:
        model = tiny(n_heads, tokenizer)
        ad = model.adapter
        means = torch.randn(ad.n_layers, ad.n_heads, ad.head_dim, generator=torch.Generator().manual_seed(1))
        means = means.to(model.hf.device, model.hf.dtype)
        fns["fast"](model, prompts[0], 5, means)  # warm-up
        for method in METHODS:
            with Timer() as t:
                for text in prompts:
                    fns[method](model, text, 5, means)
            seconds[method][n_heads] = round(t.seconds / N_PROMPTS, 4)
        log(f"{n_heads} heads/layer: " + ", ".join(f"{m} {seconds[m][n_heads]:.3f}s" for m in METHODS))
    lo, hi = HEADS[0], HEADS[-1]
    emit({
        "bench": "heads",
        "growth": {m: round(math.log(seconds[m][hi] / seconds[m][lo]) / math.log(hi / lo), 2) for m in METHODS},
        "vs_fast_at_max_heads": {m: round(seconds[m][hi] / seconds["fast"][hi], 2) for m in METHODS},
        "seconds_per_prompt": seconds,
        "model": "tiny-llama (random)", "heads_per_layer": HEADS, "layers": N_LAYERS, "d_model": D_MODEL, "prompts": N_PROMPTS,
        **env,
    })


if __name__ == "__main__":
    main()
