"""Architecture adapters: where each model family keeps its layers, per-head site, final norm and unembedding.

An adapter is the only place that knows module paths. Everything else asks it for "layer 12", "the head site of
layer 12" or "the unembedding", so supporting a new family means adding one `ArchSpec` row to `SPECS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fv_remote.core.errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one family, relative to the causal-LM root (dotted attribute paths)."""

    family: str
    model_types: tuple[str, ...]  # config.model_type values this spec covers
    layers: str  # the ModuleList of decoder blocks
    head_site: str  # relative to a block: the attention output projection, whose *input* is the per-head output
    final_norm: str
    unembed: str
    layer_output_is_tuple: bool  # the guess when the block's forward does not say; a local probe has the last word
    # Relative to a block: an RMSNorm applied to the attention output *before* it joins the residual stream
    # (Gemma 2/3, OLMo 2/3: residual + norm(o_proj(heads))). None where the attention output is added as it is. Not
    # to be confused with a module of the same name that normalises the residual stream before the MLP (Llama,
    # Mistral, Qwen, Phi-3, Mixtral, gpt-oss, OLMo 1, Gemma 1 call that one `post_attention_layernorm` too).
    post_attn_norm: str | None = None
    notes: str = ""  # what is special about the family for function vectors (shown by `models info`)


_POST = "post_attention_layernorm"
SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama",), "model.layers", "self_attn.o_proj", "model.norm", "lm_head", False),
    ArchSpec("mistral", ("mistral",), "model.layers", "self_attn.o_proj", "model.norm", "lm_head", False),
    ArchSpec("mixtral", ("mixtral",), "model.layers", "self_attn.o_proj", "model.norm", "lm_head", False,
             notes="sparse MoE MLP (top-k experts per token); attention as Mistral"),
    ArchSpec("qwen", ("qwen2", "qwen3"), "model.layers", "self_attn.o_proj", "model.norm", "lm_head", False),
    ArchSpec("qwen3_moe", ("qwen3_moe",), "model.layers", "self_attn.o_proj", "model.norm", "lm_head", False,
             notes="sparse MoE MLP; attention as Qwen3 (q/k norms, head_dim from the config)"),
    ArchSpec("phi3", ("phi3",), "model.layers", "self_attn.o_proj", "model.norm", "lm_head", False,
             notes="fused qkv_proj; o_proj separate, so heads read as Llama's"),
    ArchSpec("gpt_oss", ("gpt_oss",), "model.layers", "self_attn.o_proj", "model.norm", "lm_head", False,
             notes="MoE MLP, attention sinks (a per-head softmax logit with no value: it only scales the head "
                   "output down), alternating sliding-window layers, o_proj bias"),
    ArchSpec("gemma1", ("gemma",), "model.layers", "self_attn.o_proj", "model.norm", "lm_head", False,
             notes="Gemma 1: pre-norm only; its post_attention_layernorm is the pre-MLP norm"),
    ArchSpec("gemma", ("gemma2", "gemma3", "gemma3_text"), "model.layers", "self_attn.o_proj", "model.norm",
             "lm_head", False, post_attn_norm=_POST,
             notes="Gemma 2/3: RMSNorm (gain 1 + weight) on the attention output before the residual add; "
                   "embeddings scaled by sqrt(d_model)"),
    ArchSpec("olmo", ("olmo",), "model.layers", "self_attn.o_proj", "model.norm", "lm_head", False,
             notes="OLMo 1: non-parametric pre-norms"),
    ArchSpec("olmo2", ("olmo2",), "model.layers", "self_attn.o_proj", "model.norm", "lm_head", False,
             post_attn_norm=_POST, notes="no pre-norms: RMSNorm on the attention and MLP outputs, q/k norms"),
    ArchSpec("olmo3", ("olmo3",), "model.layers", "self_attn.o_proj", "model.norm", "lm_head", False,
             post_attn_norm=_POST, notes="as OLMo 2, with sliding-window layers (3 of 4)"),
    ArchSpec("gpt2", ("gpt2",), "transformer.h", "attn.c_proj", "transformer.ln_f", "lm_head", False),
    ArchSpec("gptj", ("gptj",), "transformer.h", "attn.out_proj", "transformer.ln_f", "lm_head", False),
    ArchSpec("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "attention.dense", "gpt_neox.final_layer_norm",
             "lm_head|embed_out", False),  # transformers 5 renamed embed_out to lm_head
)

SUPPORTED_FAMILIES = tuple(s.family for s in SPECS)


def get_path(root: Any, dotted: str) -> Any:
    """Follow a dotted attribute path on a module or an nnsight Envoy; `a|b` tries alternatives in order."""
    if "|" in dotted:
        for option in dotted.split("|"):
            try:
                return get_path(root, option)
            except AttributeError:
                continue
        raise AttributeError(f"none of {dotted!r} found on {type(root).__name__}")
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def spec_for(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    known = ", ".join(f"{s.family} ({'/'.join(s.model_types)})" for s in SPECS)
    raise UserError(
        f"unsupported architecture {model_type!r}; supported families: {known}. "
        "To add one, append an ArchSpec row to fv_remote/models/adapters.py:SPECS with its module paths."
    )


def _in_width(module: Any) -> int:
    """Input width of a projection: nn.Linear has in_features; GPT-2's Conv1D stores weight as [in, out]."""
    if hasattr(module, "in_features"):
        return int(module.in_features)
    if type(module).__name__ == "Conv1D":
        return int(module.weight.shape[0])
    return int(module.weight.shape[1])


def _returns_tuple(block: Any, default: bool) -> bool:
    """Whether a decoder block returns (hidden, ...) or a bare tensor, from its forward's return annotation.

    Works without running the model (remote models are weightless); `validate_adapter` confirms it by a probe
    whenever the weights are local."""
    import inspect

    try:
        annotation = inspect.signature(type(block).forward).return_annotation
    except (TypeError, ValueError):
        return default
    if annotation is inspect.Signature.empty:
        return default
    text = annotation if isinstance(annotation, str) else repr(annotation)
    if re.search(r"\btuple\b", text, flags=re.IGNORECASE):
        return True
    if "Tensor" in text:
        return False
    return default


def _norm_eps(config: Any) -> float:
    """RMSNorm epsilon from the (text) config; every post-norm family names it rms_norm_eps."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return float(getattr(text, "rms_norm_eps", 1e-6))


@dataclass(frozen=True)
class Adapter:
    """An ArchSpec bound to one model's sizes."""

    spec: ArchSpec
    n_layers: int
    n_heads: int
    head_dim: int
    d_model: int
    vocab_size: int
    layer_output_is_tuple: bool = False  # transformers changed this per family across releases, so it is detected
    norm_eps: float = 0.0  # the post-attention RMSNorm's epsilon (config.rms_norm_eps), where there is such a norm

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def head_width(self) -> int:
        return self.n_heads * self.head_dim

    @classmethod
    def from_model(cls, hf_model: Any) -> "Adapter":
        """Read sizes from the live torch model (not from d_model // n_heads, which is wrong for Gemma)."""
        config = hf_model.config
        spec = spec_for(config)
        layers = get_path(hf_model, spec.layers)
        n_heads = int(config.num_attention_heads)
        width = _in_width(get_path(layers[0], spec.head_site))
        if width % n_heads:
            raise UserError(f"head site width {width} is not divisible by {n_heads} heads ({spec.family})")
        unembed = get_path(hf_model, spec.unembed)
        return cls(spec=spec, n_layers=len(layers), n_heads=n_heads, head_dim=width // n_heads,
                   d_model=int(unembed.weight.shape[1]), vocab_size=int(unembed.weight.shape[0]),
                   layer_output_is_tuple=_returns_tuple(layers[0], spec.layer_output_is_tuple),
                   norm_eps=_norm_eps(config) if spec.post_attn_norm else 0.0)

    # Paths resolve the same on the torch model and on the nnsight wrapper (Envoys mirror modules).
    def layers(self, root: Any) -> Any:
        return get_path(root, self.spec.layers)

    def layer(self, root: Any, index: int) -> Any:
        return self.layers(root)[index]

    def head_site(self, root: Any, layer: int) -> Any:
        return get_path(self.layer(root, layer), self.spec.head_site)

    @property
    def has_post_attn_norm(self) -> bool:
        return self.spec.post_attn_norm is not None

    def post_attn_norm(self, root: Any, layer: int) -> Any:
        """The norm between a block's attention output and the residual add, or None where there is none."""
        if self.spec.post_attn_norm is None:
            return None
        return get_path(self.layer(root, layer), self.spec.post_attn_norm)

    def final_norm(self, root: Any) -> Any:
        return get_path(root, self.spec.final_norm)

    def unembed(self, root: Any) -> Any:
        return get_path(root, self.spec.unembed)

    def check_layer(self, layer: int) -> int:
        if not 0 <= int(layer) < self.n_layers:
            raise UserError(f"layer {layer} out of range: this model has layers 0..{self.n_layers - 1}")
        return int(layer)

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "head_dim": self.head_dim,
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
            "head_site": f"{self.spec.layers}[i].{self.spec.head_site}",
            "layer_output": "tuple" if self.layer_output_is_tuple else "tensor",
            "post_attention_norm": (f"{self.spec.layers}[i].{self.spec.post_attn_norm} (on the attention output, "
                                    "before the residual add)" if self.has_post_attn_norm
                                    else "none (the attention output joins the residual stream as it is)"),
            **({"notes": self.spec.notes} if self.spec.notes else {}),
        }
