"""Shared fixtures: a tiny offline tokenizer, tiny random models of every supported family, and the real model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a Hub lookup here hangs rather than failing

import pytest
import torch

from support.fake_device import register as _register_fake_device

_register_fake_device()  # before any backward of the process (autograd sizes its device queues once)

TINY_SIZES = dict(n_layers=3, n_heads=4, d_model=64)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Q: hot\nA: cold\n\nQ: up\nA: down\n\nQ: big\nA: small", "the quick brown fox jumps over the lazy dog"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny_tokenizer()


def tiny_config(family: str, vocab_size: int):
    """A 3-layer, 4-head random config per family; Gemma/Qwen3/gpt-oss use head_dim != d_model / n_heads on purpose.

    MoE families get 4 experts, 2 per token. gpt-oss and OLMo 3 get a 6-token sliding window on layers 0 and 2, so
    the test prompts (longer than that) really exercise the window (and the fast CMA's fallback for it)."""
    import transformers as T

    L, H, D = TINY_SIZES["n_layers"], TINY_SIZES["n_heads"], TINY_SIZES["d_model"]
    common = dict(vocab_size=vocab_size, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=L,
                  num_attention_heads=H)
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)  # where the default ids lie outside the tiny vocab
    configs = {
        "llama": lambda: T.LlamaConfig(**common, num_key_value_heads=2),
        "mistral": lambda: T.MistralConfig(**common, num_key_value_heads=2),
        "qwen2": lambda: T.Qwen2Config(**common, num_key_value_heads=2),
        "qwen3": lambda: T.Qwen3Config(**common, num_key_value_heads=2, head_dim=24),
        "gemma2": lambda: T.Gemma2Config(**common, num_key_value_heads=2, head_dim=24),
        "gemma3": lambda: T.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=24),
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab_size, n_embd=D, n_layer=L, n_head=H),
        "gptj": lambda: T.GPTJConfig(vocab_size=vocab_size, n_embd=D, n_layer=L, n_head=H, rotary_dim=8),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),
        "olmo": lambda: T.OlmoConfig(**common),
        "olmo2": lambda: T.Olmo2Config(**common, **ids),
        "olmo3": lambda: T.Olmo3Config(**common, **ids, sliding_window=6, layer_types=list(SLIDING_LAYERS)),
        "phi3": lambda: T.Phi3Config(**common, **ids, num_key_value_heads=2),
        "mixtral": lambda: T.MixtralConfig(**common, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=16, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=32),
        "gpt_oss": lambda: T.GptOssConfig(**common, num_key_value_heads=2, head_dim=24, num_local_experts=4,
                                          num_experts_per_tok=2, sliding_window=6, layer_types=list(SLIDING_LAYERS)),
    }
    return configs[family]()


SLIDING_LAYERS = ("sliding_attention", "full_attention", "sliding_attention")
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2", "gptj", "gpt_neox", "olmo", "olmo2",
                 "olmo3", "phi3", "mixtral", "qwen3_moe", "gpt_oss")
# Families whose attention output goes through an RMSNorm before the residual add.
POST_NORM_FAMILIES = ("gemma2", "gemma3", "olmo2", "olmo3")
# head_dim != d_model / n_heads in these tiny configs.
WIDE_HEAD_FAMILIES = {"gemma2": 24, "gemma3": 24, "qwen3": 24, "gpt_oss": 24}


def make_tiny_model(family: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from fv_remote.models.loading import wrap_model

    torch.manual_seed(seed)
    config = tiny_config(family, len(tokenizer))
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.requires_grad_(False)
    return wrap_model(hf, tokenizer, name=f"tiny-{family}", source="random")


@pytest.fixture(params=TINY_FAMILIES)
def tiny_model(request, tiny_tokenizer):
    return make_tiny_model(request.param, tiny_tokenizer)


@pytest.fixture(scope="session")
def smollm2():
    """The real offline model (fetched and cached by `make test` / `fv-remote models pull`)."""
    from fv_remote.models.loading import load_model

    return load_model("smollm2-135m")


def run_cli(*args: str, timeout: int = 600):
    """Run `fv-remote ARGS` in a subprocess as a user would; returns the CompletedProcess (text mode)."""
    import subprocess
    import sys

    code = "from fv_remote.cli.app import main; main()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def assert_one_line_error(proc, *needles: str):
    """A user mistake: non-zero exit, one `error:` line on stderr naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
