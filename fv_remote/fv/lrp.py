"""LRP head scores: AttnLRP relevance of every head (lxt's rules), and the Fast & Faithful FV paper's variant.

Two scores per head, both for the answer's logit at the prompt's last token, on clean ten-shot prompts (there is no
intervention to measure, so the relevance explains the prediction the model makes from correct demonstrations):

- `lrp`: the AttnLRP relevance of head h's output at the last token, `R_h = sum(z_h * g_h)` over its `head_dim`
  slice of the output projection's input, where `g` is the gradient under AttnLRP's backward rules. lxt's
  "efficient" implementation states each rule as a modified gradient, so that activation x modified gradient *is*
  the relevance at any tensor: identity rule through RMSNorm (its scale is a constant), identity rule on the MLP's
  activation function and the uniform rule on its gate x up product, and the uniform rule through the two matmuls
  of attention (query and key gradients / 4, value / 2).
- `lrp_attention` (the Fast & Faithful FV paper, `ma-pham/fast-faithful-fv`): the same backward, read at the
  attention probabilities instead: `A * dlogit/dA` of the last token's row, clamped at zero, summed over the key
  positions of the demonstrations, per head. (The paper sums towards the tokens of a task instruction; in an ICL
  prompt the demonstrations carry the task.)

Both are exact with the prompt's prefix run once without gradients: nothing at the last token reaches an earlier
position, so the relevance of a last-token quantity only ever flows through the last position (as in
`fv_remote.fv.attribution`).

**How lxt is used.** lxt 2.1 applies its rules by patching model classes module-wide (`lxt.efficient.monkey_patch`)
and was written for transformers 4.5x. Two things stop that here: its package imports a ViT entry that needs
torchvision (no CPU wheel matching torch 2.13 on this index), and its attention patch replaces transformers'
`ALL_ATTENTION_FUNCTIONS` registry by a plain dict, which transformers 5's attention (`.get_interface`) cannot use.
So `attnlrp_rules` takes lxt's rule functions (`lxt.efficient.patches.rms_norm_forward`, `gated_mlp_forward`,
`lxt.efficient.rules.divide_gradient`) and applies them to one model's module *instances* for the duration of a
`with` block: norms and MLPs get lxt's forwards, and the query/key/value projections' outputs go through
`divide_gradient` (4, 4, 2) — the same factors lxt's attention wrapper applies to the post-RoPE states (RoPE is
linear, so scaling a gradient before or after it is the same). Nothing module-wide is changed, and the instances
get their own forwards back on exit.

Local only: NDIF runs the server's unmodified modules, so these rules cannot run there (`run_cma` says so).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fv_remote.core.errors import UserError
from fv_remote.models.loading import LoadedModel

# Families whose blocks are exactly what lxt's Llama rules were written for: RMSNorm `weight * x / rms(x)`, a gated
# MLP `down(act(gate(x)) * up(x))`, separate q/k/v/o projections. (Gemma's norm is `(1 + weight) * ...`, GPT-2's
# is a LayerNorm with a plain MLP, Phi-3 fuses gate and up, MoE families route: lxt has other rules or none.)
LRP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
METHODS = ("lrp", "lrp_attention")
REMOTE_REFUSAL = ("--method {method} cannot run on NDIF: AttnLRP needs lxt's modified backward rules inside the "
                  "model's norms, MLPs and attention, and a remote request runs the server's unmodified modules; "
                  "run it without --remote, or use the gradient method (--method attribution, local) or the exact "
                  "fast CMA (--remote)")


def _lxt() -> tuple[types.ModuleType, types.ModuleType]:
    """lxt's rule modules (`lxt.efficient.rules`, `lxt.efficient.patches`) without running `lxt.efficient`'s
    package init, which imports every model entry of lxt's registry (its ViT entry needs torchvision)."""
    if "lxt.efficient.patches" not in sys.modules:
        try:
            import lxt
        except ImportError:
            raise UserError("LRP head scores need the `lxt` package (LRP eXplains Transformers): "
                            "pip install --no-deps 'lxt>=2.1'") from None
        if "lxt.efficient" not in sys.modules:
            package = types.ModuleType("lxt.efficient")
            package.__path__ = [str(Path(lxt.__file__).parent / "efficient")]
            sys.modules["lxt.efficient"] = package
    return importlib.import_module("lxt.efficient.rules"), importlib.import_module("lxt.efficient.patches")


def check_lrp_model(model: LoadedModel) -> None:
    family = getattr(model.hf.config, "model_type", "")
    if family not in LRP_FAMILIES:
        raise UserError(f"LRP head scores support the {', '.join(LRP_FAMILIES)} families (lxt's Llama rules), not "
                        f"{family!r}; use --method attribution (gradient) or the exact CMA")


def _set_forward(module: torch.nn.Module, fn, saved: list) -> None:
    saved.append((module, module.__dict__.get("forward", None)))
    module.forward = types.MethodType(fn, module)


@contextmanager
def attnlrp_rules(model: LoadedModel) -> Iterator[None]:
    """Within the block, backward passes of `model.hf` follow AttnLRP (lxt's rules; see the module docstring)."""
    check_lrp_model(model)
    rules, patches = _lxt()
    saved: list[tuple[torch.nn.Module, Any]] = []
    handles = []
    factors = {"q_proj": 4, "k_proj": 4, "v_proj": 2}
    try:
        for name, module in model.hf.named_modules():
            kind = type(module).__name__
            if kind.endswith("RMSNorm"):
                if not hasattr(module, "variance_epsilon"):
                    raise UserError(f"{kind} at {name} is not the RMSNorm lxt's rule is written for")
                _set_forward(module, patches.rms_norm_forward, saved)
            elif kind.endswith("MLP") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
                _set_forward(module, patches.gated_mlp_forward, saved)
            elif name.rsplit(".", 1)[-1] in factors and ".self_attn." in f".{name}":
                factor = factors[name.rsplit(".", 1)[-1]]
                handles.append(module.register_forward_hook(
                    lambda _m, _i, out, f=factor: rules.divide_gradient(out, f)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, forward in reversed(saved):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _prefix_inputs(model: LoadedModel, ids: torch.Tensor) -> dict:
    """The prompt's prefix run once without gradients; the inputs that then compute only its last token."""
    n_tokens = ids.shape[1]
    if n_tokens < 2:
        raise UserError("LRP head scores need prompts of at least two tokens")
    with torch.no_grad():
        cache = model.hf(input_ids=ids[:, :-1], use_cache=True).past_key_values
    return dict(past_key_values=cache, attention_mask=torch.ones(1, n_tokens, dtype=torch.long, device=ids.device),
                position_ids=torch.full((1, 1), n_tokens - 1, dtype=torch.long, device=ids.device), use_cache=True)


def lrp_prompt(model: LoadedModel, text: str, answer_id: int, means: torch.Tensor | None = None
               ) -> tuple[float, torch.Tensor]:
    """(answer logit, AttnLRP relevance of every head's last-token output [L * H], `all_heads` order).

    `means` is unused (the signature of `fv_remote.fv.cma.PromptScorer`)."""
    ad, hf = model.adapter, model.hf
    ids = model.tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    inputs = _prefix_inputs(model, ids)
    outputs: list[torch.Tensor] = []
    hooks = [ad.head_site(hf, layer).register_forward_pre_hook(lambda _m, args: outputs.append(args[0]))
             for layer in range(ad.n_layers)]
    try:
        with attnlrp_rules(model), torch.enable_grad():
            embeds = hf.get_input_embeddings()(ids[:, -1:]).detach().requires_grad_(True)
            logit = hf(inputs_embeds=embeds, logits_to_keep=1, **inputs).logits[0, -1, answer_id]
            grads = torch.autograd.grad(logit, outputs)
    finally:
        for hook in hooks:
            hook.remove()
    relevance = torch.stack([(z[0, -1] * g[0, -1]).view(ad.n_heads, ad.head_dim).sum(-1)
                             for z, g in zip(outputs, grads)])
    return float(logit.detach()), relevance.detach().float().reshape(-1).cpu()


def demo_end(text: str, separator: str) -> int:
    """Character offset where the demonstrations end (the last separator, before the query block)."""
    end = text.rfind(separator)
    if end <= 0:
        raise UserError("--method lrp_attention sums relevance towards the demonstrations; the prompts have none "
                        "(give --n-shots 1 or more)")
    return end


def lrp_attention_prompt(model: LoadedModel, text: str, answer_id: int, demo_chars: int,
                         means: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """(answer logit, per head [L * H]: sum over demonstration keys of max(0, A * dlogit/dA) at the last query
    token, under AttnLRP's rules) — the Fast & Faithful FV paper's head score. `demo_chars`: the demonstrations are
    the tokens that end within the first `demo_chars` characters of `text`."""
    ad, hf = model.adapter, model.hf
    enc = model.tokenizer(text, return_tensors="pt", return_offsets_mapping=True)
    ids = enc.input_ids.to(model.device)
    demo = torch.tensor([end <= demo_chars and end > start for start, end in enc.offset_mapping[0].tolist()])
    if not demo.any():
        raise UserError("no demonstration tokens found in the prompt")
    inputs = _prefix_inputs(model, ids)
    weights: list[torch.Tensor] = []
    attention = [ad.layer(hf, layer).self_attn for layer in range(ad.n_layers)]
    hooks = [a.register_forward_hook(lambda _m, _i, out: weights.append(out[1])) for a in attention]
    previous = hf.config._attn_implementation
    try:
        hf.set_attn_implementation("eager")  # the attention probabilities exist only there
        with attnlrp_rules(model), torch.enable_grad():
            embeds = hf.get_input_embeddings()(ids[:, -1:]).detach().requires_grad_(True)
            logit = hf(inputs_embeds=embeds, logits_to_keep=1, **inputs).logits[0, -1, answer_id]
            if any(w is None for w in weights):
                raise UserError("this model's attention does not return its probabilities; lrp_attention needs it")
            grads = torch.autograd.grad(logit, weights)
    finally:
        hf.set_attn_implementation(previous)
        for hook in hooks:
            hook.remove()
    keys = demo[: weights[0].shape[-1]].to(weights[0].device)
    scores = torch.stack([(a[0, :, -1] * g[0, :, -1]).clamp(min=0)[:, keys].sum(-1) for a, g in zip(weights, grads)])
    return float(logit.detach()), scores.detach().float().reshape(-1).cpu()


def embedding_relevance(model: LoadedModel, text: str, answer_id: int) -> tuple[float, torch.Tensor]:
    """(answer logit at the last token, AttnLRP relevance of each input token [T]) for the whole prompt, no prefix
    cache: the quantity lxt's conservation is about (its sum is the logit less what the softmaxes absorb)."""
    hf = model.hf
    ids = model.tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    with attnlrp_rules(model), torch.enable_grad():
        embeds = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
        logit = hf(inputs_embeds=embeds, use_cache=False).logits[0, -1, answer_id]
        (grad,) = torch.autograd.grad(logit, [embeds])
    return float(logit.detach()), (embeds * grad)[0].sum(-1).detach().cpu()


def prompt_scorer(model: LoadedModel, prepared, method: str):
    """The `fv_remote.fv.cma.PromptScorer` of an LRP method for this task's prompts (checked before any work)."""
    check_lrp_model(model)
    _lxt()
    if method == "lrp":
        return lrp_prompt
    if method == "lrp_attention":
        separator = prepared.template.separator

        def score(model: LoadedModel, text: str, answer_id: int, means=None) -> tuple[float, torch.Tensor]:
            return lrp_attention_prompt(model, text, answer_id, demo_end(text, separator))

        return score
    raise UserError(f"unknown LRP method {method!r}; use one of {', '.join(METHODS)}")
