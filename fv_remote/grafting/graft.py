"""Dynamic weight grafting: run the pretrained model, but let chosen modules use fine-tuned weights at chosen
token positions.

For every grafted module a forward hook on the *pretrained* model also runs the fine-tuned copy of that module on
the same input and, per token position (and for fused q/k/v projections per output channel), keeps the
fine-tuned output where the mask says so. Because the selection happens inside one ordinary forward pass, later
positions attend to keys and values that were computed under whatever weights were active at the earlier
positions - exactly the "dynamic" part of dynamic weight grafting.

Local only: the hooks need two weight sets in one forward pass, which a remote service that hosts only public,
frozen models (NDIF) cannot provide. Plain torch hooks on the transformers model are used, not nnsight traces.

Position expressions (`positions=` / `unembed=`): `entity` (the first entity's tokens), `last` (the last token),
`other` (everything else), `all`, `none`; join with `+` (`entity+last`), complement one span with `not-` or `~`
(`not-last`) or a whole expression with `not(...)` (`not(entity+last)` = `other`).
Layer expressions: `all`, `none`, `q1`..`q4` (quarters), `h1`/`h2` (halves), `3`, `0-7`, `0-3,10,20-29`.
Components: q, k, v, o (attention projections; `attn` = all four), mlp, norms (every norm inside a block),
`block` = all of these; `embed` (input embeddings at the chosen positions) and the unembedding (final norm and
LM head) are switched separately.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from fv_remote.models.adapters import Adapter, get_path
from fv_remote.core.errors import UserError
from fv_remote.grafting.synthetic import GraftPrompt
from fv_remote.core.progress import Progress

BLOCK_COMPONENTS = ("q", "k", "v", "o", "mlp", "norms")
COMPONENT_ALIASES = {"attn": ("q", "k", "v", "o"), "block": BLOCK_COMPONENTS, "all": BLOCK_COMPONENTS,
                     "norm": ("norms",), "none": ()}
SPAN_NAMES = ("entity", "last", "other", "all", "none")

# Per family: module path (relative to a block) of each projection; fused q/k/v say which output channels are which.
_ATTN = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "gptj": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"),
    "gpt2": ("attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj"),
    "gpt_neox": ("attention.query_key_value",) * 3 + ("attention.dense",),
}
for _fam in ("mistral", "mixtral", "qwen", "qwen3_moe", "gemma", "gemma1", "olmo", "olmo2", "olmo3", "gpt_oss"):
    _ATTN[_fam] = _ATTN["llama"]


@dataclass(frozen=True)
class Site:
    """One hooked module and, for fused projections, which of its output channels a component owns."""

    path: str  # dotted path from the causal-LM root
    channels: tuple[str, Any] | None = None  # ("gpt2", index) or ("gpt_neox", index) for fused q/k/v
    token_axis: int = 1  # where the token dimension sits in the module's output


@dataclass(frozen=True)
class GraftConfig:
    """What to graft: block components in `layers` at `positions`; optionally embeddings and the unembedding."""

    positions: str = "all"
    layers: str = "all"
    components: tuple[str, ...] = BLOCK_COMPONENTS
    embed: bool = False  # input embeddings at `positions`
    unembed: str | None = None  # position expression for the final norm + LM head (e.g. "last"); None = pretrained
    label: str = ""

    @classmethod
    def everything(cls) -> "GraftConfig":
        return cls(positions="all", layers="all", components=BLOCK_COMPONENTS, embed=True, unembed="all",
                   label="everything")

    @classmethod
    def nothing(cls) -> "GraftConfig":
        return cls(positions="none", layers="none", components=(), embed=False, unembed=None, label="nothing")

    def describe(self) -> str:
        parts = [f"positions={self.positions}", f"layers={self.layers}",
                 f"components={','.join(self.components) or 'none'}"]
        if self.embed:
            parts.append("embed")
        if self.unembed:
            parts.append(f"unembed@{self.unembed}")
        return " ".join(parts)


# ----------------------------------------------------------------------------------------------- expressions


def parse_components(text: str | Sequence[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for raw in items:
        item = raw.strip().lower()
        if not item:
            continue
        expanded = COMPONENT_ALIASES.get(item, (item,))
        for comp in expanded:
            if comp not in BLOCK_COMPONENTS:
                known = ", ".join((*BLOCK_COMPONENTS, *COMPONENT_ALIASES))
                raise UserError(f"unknown component {item!r}; known: {known}")
            if comp not in out:
                out.append(comp)
    return tuple(c for c in BLOCK_COMPONENTS if c in out)


def layer_groups(n_layers: int) -> dict[str, list[int]]:
    """Named groups: all, quarters q1..q4 and halves h1/h2 (contiguous, as equal as possible)."""
    groups: dict[str, list[int]] = {"all": list(range(n_layers))}
    for name, k in (("q", 4), ("h", 2)):
        bounds = [round(i * n_layers / k) for i in range(k + 1)]
        for i in range(k):
            groups[f"{name}{i + 1}"] = list(range(bounds[i], bounds[i + 1]))
    return groups


def parse_layers(text: str, n_layers: int) -> list[int]:
    text = str(text).strip().lower()
    if text in ("", "none"):
        return []
    groups = layer_groups(n_layers)
    if text in groups:
        return groups[text]
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if part in groups:
            layers.update(groups[part])
            continue
        if not match:
            raise UserError(f"bad layer expression {text!r}: use all, q1..q4, h1/h2, 5, 0-7 or 0-3,10")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if lo > hi:
            raise UserError(f"bad layer range {part!r}: start > end")
        for layer in range(lo, hi + 1):
            if not 0 <= layer < n_layers:
                raise UserError(f"layer {layer} out of range: this model has layers 0..{n_layers - 1}")
            layers.add(layer)
    return sorted(layers)


def span_mask(expr: str | None, spans: dict[str, torch.Tensor]) -> torch.Tensor:
    """Evaluate a position expression against named [B, T] boolean masks (entity, last, other, all)."""
    base = spans["all"]
    if expr is None:
        return torch.zeros_like(base)
    expr = str(expr).strip().lower()
    if expr.startswith("not(") and expr.endswith(")"):
        return ~span_mask(expr[4:-1], spans)
    mask = torch.zeros_like(base)
    for term in str(expr).lower().split("+"):
        term = term.strip()
        negate = term.startswith(("not-", "~"))
        name = term[4:] if term.startswith("not-") else term.lstrip("~")
        if name == "none":
            part = torch.zeros_like(base)
        elif name in spans:
            part = spans[name]
        else:
            raise UserError(f"unknown position span {name!r} in {expr!r}; use {', '.join(SPAN_NAMES)}, "
                            "joined by '+', optionally prefixed with 'not-'")
        mask = mask | (~part if negate else part)
    return mask


# ----------------------------------------------------------------------------------------------- tokenisation


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [B, T], left-padded
    attention_mask: torch.Tensor
    spans: dict[str, torch.Tensor]  # entity / last / other / all / none, each [B, T] bool
    target_ids: torch.Tensor  # [B] first token of ' ' + target

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Mask-derived position ids, so left padding does not shift positions (matters for GPT-2)."""
        positions = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": positions}


def target_token(tokenizer: Any, prompt: str, target: str) -> int:
    """First token of the target as it continues the prompt (' ' + target)."""
    p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    full = tokenizer(prompt + " " + target, add_special_tokens=False).input_ids
    if full[:len(p_ids)] == p_ids and len(full) > len(p_ids):
        return int(full[len(p_ids)])
    return int(tokenizer(" " + target, add_special_tokens=False).input_ids[0])


def encode(tokenizer: Any, prompts: Sequence[GraftPrompt]) -> Encoded:
    """Left-pad the prompts and locate the entity tokens (by character offsets) and the last token."""
    if not prompts:
        raise UserError("no prompts to run")
    rows = []
    for p in prompts:
        enc = tokenizer(p.text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        ent = [s < p.entity_end and e > p.entity_start and e > s for s, e in offsets]
        if p.entity_end > p.entity_start and not any(ent):
            raise UserError(f"entity {p.entity!r} not found among the tokens of {p.text!r}")
        rows.append((ids, ent))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    B = len(rows)
    input_ids = torch.full((B, width), int(pad), dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    entity = torch.zeros((B, width), dtype=torch.bool)
    for i, (ids, ent) in enumerate(rows):
        n = len(ids)
        input_ids[i, width - n:] = torch.tensor(ids)
        attn[i, width - n:] = 1
        entity[i, width - n:] = torch.tensor(ent)
    last = torch.zeros_like(entity)
    last[:, -1] = True
    everything = torch.ones_like(entity)
    spans = {"entity": entity, "last": last, "other": everything & ~entity & ~last, "all": everything,
             "none": torch.zeros_like(entity)}
    targets = torch.tensor([target_token(tokenizer, p.text, p.target) for p in prompts])
    return Encoded(input_ids, attn, spans, targets)


# ----------------------------------------------------------------------------------------------- sites


def _norm_sites(layer_module: torch.nn.Module, prefix: str, family: str) -> list[Site]:
    """Every norm inside a block. Gemma's q_norm/k_norm see [B, heads, T, head_dim] (after the transpose)."""
    sites = []
    for name, mod in layer_module.named_modules():
        if name and "norm" in type(mod).__name__.lower():
            inner = name.rsplit(".", 1)[-1] in ("q_norm", "k_norm")
            sites.append(Site(f"{prefix}.{name}", token_axis=2 if inner and family == "gemma" else 1))
    return sites


def block_sites(hf: Any, adapter: Adapter, layer: int, component: str) -> list[Site]:
    """The module(s) implementing one component of one block."""
    prefix = f"{adapter.spec.layers}.{layer}"
    family = adapter.family
    if component in ("q", "k", "v", "o"):
        paths = _ATTN.get(family)
        if paths is None:
            raise UserError(f"grafting does not know the attention layout of family {family!r}")
        index = "qkvo".index(component)
        channels = None
        if component != "o" and family in ("gpt2", "gpt_neox"):
            channels = (family, index)
        return [Site(f"{prefix}.{paths[index]}", channels)]
    if component == "mlp":
        return [Site(f"{prefix}.mlp")]
    if component == "norms":
        return _norm_sites(adapter.layer(hf, layer), prefix, family)
    raise UserError(f"unknown component {component!r}")


def embed_sites(hf: Any, adapter: Adapter) -> list[Site]:
    """Every embedding table outside the blocks (token embeddings, GPT-2's learned positions)."""
    layers_prefix = adapter.spec.layers + "."
    return [Site(name) for name, mod in hf.named_modules()
            if isinstance(mod, torch.nn.Embedding) and not name.startswith(layers_prefix)]


def unembed_sites(hf: Any, adapter: Adapter) -> list[Site]:
    spec = adapter.spec
    unembed_path = next(p for p in spec.unembed.split("|") if _has_path(hf, p))
    return [Site(spec.final_norm), Site(unembed_path)]


def _has_path(root: Any, path: str) -> bool:
    try:
        get_path(root, path)
        return True
    except AttributeError:
        return False


def _channel_mask(channels: tuple[str, Any], width: int, head_dim: int) -> torch.Tensor:
    family, index = channels
    idx = torch.arange(width)
    if family == "gpt2":  # [q | k | v], each d_model wide
        return (idx // (width // 3)) == index
    if family == "gpt_neox":  # per head [q | k | v], each head_dim wide
        return ((idx % (3 * head_dim)) // head_dim) == index
    raise ValueError(family)


def sites_for(config: GraftConfig, hf: Any, adapter: Adapter) -> list[tuple[Site, str]]:
    """(site, position expression) pairs a config grafts."""
    out: list[tuple[Site, str]] = []
    for layer in parse_layers(config.layers, adapter.n_layers):
        for comp in parse_components(config.components):
            out.extend((site, config.positions) for site in block_sites(hf, adapter, layer, comp))
    if config.embed:
        out.extend((site, config.positions) for site in embed_sites(hf, adapter))
    if config.unembed:
        out.extend((site, config.unembed) for site in unembed_sites(hf, adapter))
    return out


def uncovered_parameters(config: GraftConfig, hf: Any, adapter: Adapter) -> list[str]:
    """Parameter names of `hf` that no site of `config` owns (empty for GraftConfig.everything())."""
    paths = {site.path for site, _ in sites_for(config, hf, adapter)}
    covered: set[int] = set()
    for path in paths:
        covered.update(id(p) for p in get_path(hf, path).parameters())
    return [name for name, p in hf.named_parameters(remove_duplicate=False) if id(p) not in covered]


# ----------------------------------------------------------------------------------------------- the grafter


@dataclass
class Metrics:
    """Per prompt: rank of the target's first token (1 = top), its probability, top-k hit."""

    ranks: torch.Tensor
    probs: torch.Tensor
    k: int
    top_tokens: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @property
    def accuracy(self) -> float:
        return float((self.ranks <= self.k).float().mean()) if len(self.ranks) else float("nan")

    @property
    def top1(self) -> float:
        return float((self.ranks == 1).float().mean()) if len(self.ranks) else float("nan")

    @property
    def mean_prob(self) -> float:
        return float(self.probs.mean()) if len(self.probs) else float("nan")

    @property
    def median_rank(self) -> float:
        return float(self.ranks.float().median()) if len(self.ranks) else float("nan")

    def summary(self) -> dict[str, float]:
        return {f"top{self.k}": self.accuracy, "top1": self.top1, "mean_prob": self.mean_prob,
                "median_rank": self.median_rank, "n": int(len(self.ranks))}


def metrics_from_logits(last_logits: torch.Tensor, target_ids: torch.Tensor, k: int = 5) -> Metrics:
    logits = last_logits.float()
    target_logit = logits.gather(1, target_ids[:, None])
    ranks = (logits > target_logit).sum(1) + 1
    probs = logits.softmax(-1).gather(1, target_ids[:, None])[:, 0]
    return Metrics(ranks=ranks, probs=probs, k=k, top_tokens=logits.argmax(-1))


class Grafter:
    """Hooks a pretrained model so that chosen modules, at chosen positions, use a fine-tuned model's weights.

    `pretrained` and `finetuned` are transformers causal LMs of one architecture (the fine-tuned one is never
    modified or run as a whole by the grafter; only its modules are called).
    """

    def __init__(self, pretrained: Any, finetuned: Any, tokenizer: Any):
        self.pt, self.ft, self.tokenizer = pretrained, finetuned, tokenizer
        self.adapter = Adapter.from_model(pretrained)
        ft_adapter = Adapter.from_model(finetuned)
        if ft_adapter != self.adapter:
            raise UserError("the pretrained and fine-tuned models differ in architecture or size "
                            f"({self.adapter.describe()} vs {ft_adapter.describe()})")
        pt_shapes = {n: tuple(p.shape) for n, p in pretrained.named_parameters()}
        ft_shapes = {n: tuple(p.shape) for n, p in finetuned.named_parameters()}
        if pt_shapes != ft_shapes:
            raise UserError("the pretrained and fine-tuned models have different parameters")
        self._masks: dict[str, list[tuple[torch.Tensor, Any]]] = {}

    # -- hooks -------------------------------------------------------------------------------------------------
    def _hook(self, path: str, axis: int, ft_module: torch.nn.Module) -> Callable:
        head_dim = self.adapter.head_dim

        def hook(module, args, kwargs, output):
            masks = self._masks.get(path)
            if not masks:
                return None
            if not torch.is_tensor(output):
                raise TypeError(f"cannot graft {path}: its output is a {type(output).__name__}, not a tensor")
            ft_out = ft_module(*args, **kwargs)
            select = None
            for pos, channels in masks:  # a fused q/k/v projection can carry one mask per component
                B, T = pos.shape
                m = pos.to(output.device).view(B, *([1] * (axis - 1)), T, *([1] * (output.dim() - axis - 1)))
                if channels is not None:
                    m = m & _channel_mask(channels, output.shape[-1], head_dim).to(output.device)
                select = m if select is None else select | m
            return torch.where(select, ft_out, output)

        return hook

    def _activate(self, config: GraftConfig, spans: dict[str, torch.Tensor]) -> list[Any]:
        self._masks, axes = {}, {}
        for site, expr in sites_for(config, self.pt, self.adapter):
            mask = span_mask(expr, spans)
            if bool(mask.any()):
                self._masks.setdefault(site.path, []).append((mask, site.channels))
                axes[site.path] = site.token_axis
        return [get_path(self.pt, path).register_forward_hook(
                    self._hook(path, axes[path], get_path(self.ft, path)), with_kwargs=True)
                for path in self._masks]

    # -- running -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, enc: Encoded, config: GraftConfig) -> torch.Tensor:
        """Full [B, T, V] logits of the grafted forward pass."""
        handles = self._activate(config, enc.spans)
        try:
            return self.pt(**enc.model_inputs()).logits
        finally:
            for handle in handles:
                handle.remove()
            self._masks = {}

    @torch.no_grad()
    def finetuned_logits(self, enc: Encoded) -> torch.Tensor:
        return self.ft(**enc.model_inputs()).logits

    def evaluate(self, prompts: Sequence[GraftPrompt], config: GraftConfig | str, k: int = 5,
                 batch_size: int = 32, progress: Progress | None = None) -> Metrics:
        """Top-k accuracy, rank and probability of each target's first token under `config`.

        `config` may also be the strings "pretrained" or "finetuned" (the plain models).
        """
        ms: list[Metrics] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = encode(self.tokenizer, chunk)
            if config == "finetuned":
                logits = self.finetuned_logits(enc)
            elif config == "pretrained":
                logits = self.logits(enc, GraftConfig.nothing())
            else:
                assert isinstance(config, GraftConfig), f"unknown config {config!r}"
                logits = self.logits(enc, config)
            ms.append(metrics_from_logits(logits[:, -1], enc.target_ids, k))
            if progress:
                progress(min(start + batch_size, len(prompts)), len(prompts))
        return Metrics(torch.cat([m.ranks for m in ms]), torch.cat([m.probs for m in ms]), k,
                       torch.cat([m.top_tokens for m in ms]))



@torch.no_grad()
def evaluate_model(hf: Any, tokenizer: Any, prompts: Sequence[GraftPrompt], k: int = 5,
                   batch_size: int = 32) -> Metrics:
    """Top-k accuracy, rank and probability of each target's first token under one plain model."""
    ms: list[Metrics] = []
    for start in range(0, len(prompts), batch_size):
        enc = encode(tokenizer, prompts[start:start + batch_size])
        ms.append(metrics_from_logits(hf(**enc.model_inputs()).logits[:, -1], enc.target_ids, k))
    return Metrics(torch.cat([m.ranks for m in ms]), torch.cat([m.probs for m in ms]), k,
                   torch.cat([m.top_tokens for m in ms]))
