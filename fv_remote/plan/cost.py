"""Cost planner for remote (NDIF) stages: FLOPs, activation memory, bytes each way, requests and time, from a model's
config alone (no weights) and a stage's options; a verdict against the server's limits and a split that fits.

Model of cost
-------------
A stage is the list of forwards (`Trace`) its session body runs on the server, mirrored from the stage's code by the
stage's cost model, which lives next to its body (`Stage.cost`: `fv.extract.extract_cost`, `fv.cma.cma_cost`,
`relational.ffv.finetune_cost`, `relational.analogy.analogy_cost`); this module holds what they share. A
forward of `rows` batch rows, `tokens` new tokens per row, attending to `keys` positions, through the decoder layers
`first..L-1` (layers below are skipped, as fast CMA skips them) and the unembedding at `logits` positions per row:

    linear    = 2 * rows * tokens * (layers run) * (q, k, v, o projections + MLP weights [MoE: router + top-k experts])
    attention = 4 * rows * heads * tokens * keys * head_dim * (layers run)     (scores q.k and the weighted sum p.v)
    unembed   = 2 * rows * logits * d_model * vocab

which are the matrix products the forward multiplies (`torch.utils.flop_counter` counts exactly these; element-wise
work, norms and softmax are not counted). A backward through frozen weights (FFV training) computes only input
gradients: 1x the linear and unembedding work of the layers above the vector, 2x their attention work (gradients
reach both the query and the keys/values). Early stopping is ignored: the FLOPs are an upper bound.

Time on the server = FLOPs / `throughput` + forwards x `trace_overhead_s`; the job's wall time adds a fixed
`request_overhead_s` (queue, session set-up) and the transfer of both payloads at `bandwidth`. Bytes are the
uncompressed `torch.save` size of what travels (zstd on the wire only makes it smaller): tensors at their element
size plus a per-tensor overhead, and a request its body's code (`body_bytes`, read from the stage's code) and the
model's envoy tree (per layer) (measured constants below). Memory is the peak of one forward's
activations (KV cache, the largest per-layer intermediate, the logits kept in float32) plus the returned values that
accumulate on the server, and for fast CMA the KV-cache copy its local path keeps per group.

All server constants below are stated defaults; every one is an option of `fv-remote plan`.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fv_remote.core.errors import UserError

# -- the server's limits and speeds (stated defaults; see `fv-remote plan --help`) -------------------------------
EXECUTION_LIMIT_S = 3600.0  # NDIF's default per-request execution timeout (ndif 0.1.2: model_config.py)
INLINE_RESULT_BYTES = 8 * 2**20  # ndif 0.1.2 sends results inline up to Redis' pubsub soft limit (8 MiB by default);
#                                  bigger ones go through object storage (upload, then the client downloads)
MAX_RESULT_BYTES = 4 * 2**30  # a result the client has to hold in memory and unpickle at once
MAX_PAYLOAD_BYTES = 512 * 2**20  # a request body the API has to accept in one POST
MEMORY_LIMIT_BYTES = 40 * 2**30  # activation memory a request may add on the hosting GPUs (half of an 80 GB GPU)
THROUGHPUT_FLOPS = 100e12  # achieved FLOP/s on the server (an H100 at ~10% of its 989 TFLOP/s bf16 dense peak:
#                            batch-1 inference is memory-bound; measure yours with benchmarks/gpu.sh)
TRACE_OVERHEAD_S = 0.05  # per forward: kernel launches over all layers plus nnsight's interleaving
REQUEST_OVERHEAD_S = 10.0  # per request: queueing, deserialising, setting up the session
BANDWIDTH_BPS = 50e6  # client <-> NDIF, bytes per second
SAFETY = 0.8  # a proposed split fills at most this share of the execution limit
# Bytes outside the tensors' data, measured through the loopback server on smollm2-135m (uncompressed):
TENSOR_OVERHEAD = 250  # per returned tensor (torch.save's pickle record and zip entry; data 64-byte aligned)
RESULT_OVERHEAD = 1300  # per result (torch.save's zip container)
PAYLOAD_TENSOR_OVERHEAD = 300  # per tensor in a request (nnsight pickles each one by `torch.save` with its metadata)
SESSION_OVERHEAD = 2400  # per request: the tracer, the root envoys, the hosted model's repo id and config
ENVOY_LAYER_BYTES = 1850  # per decoder layer: every body reads the model's envoy (`lm`), which pickles its whole tree
#   (per module its path twice; 1.7-2.4 KB per layer on the tiny models of 16 families). Not counted: when the tree is
#   pickled after >= 256 other objects (nnsight pickles a body's variables in set order, which Python's per-process
#   hash seed decides), each reference back into it takes 5 bytes instead of 2, ~470 B more per layer (RESULTS.md)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# -- sizes from a config ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dims:
    """The sizes that set a forward's cost, read from a transformers config (any supported family)."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    d_ff: int  # dense MLP width (0 where every layer is MoE)
    mlp_mats: int  # weight matrices of the MLP: 3 (gated: gate, up, down) or 2 (up, down)
    vocab: int
    n_experts: int = 0  # MoE: experts per layer (0: dense)
    top_k: int = 0  # MoE: experts per token
    d_expert: int = 0  # MoE: one expert's width
    moe: tuple[int, ...] = ()  # the MoE layers (the rest dense)
    tied: bool = False
    max_positions: int = 0
    sliding: bool = False  # sliding-window layers: the fast CMA body recomputes the prompt per group of copies

    @property
    def layer_params(self) -> int:
        """Weights of one (average) decoder layer, all experts counted: what sits in memory."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        dense = self.mlp_mats * self.d_model * self.d_ff
        moe = self.n_experts * (self.mlp_mats * self.d_model * self.d_expert + self.d_model)
        return attn + (dense * (self.n_layers - len(self.moe)) + moe * len(self.moe)) // self.n_layers

    @property
    def params(self) -> int:
        """Parameters: weights, embeddings and two norms per layer plus the final one (biases and extra norms of
        some families left out)."""
        embed = self.vocab * self.d_model * (1 if self.tied else 2)
        return self.n_layers * self.layer_params + embed + (2 * self.n_layers + 1) * self.d_model

    def linear_per_token(self, layer: int) -> int:
        """Multiply-add FLOPs of one token through layer `layer`'s weights (projections and MLP)."""
        d, dh = self.d_model, self.head_dim
        attn = 2 * d * dh * (2 * self.n_heads + 2 * self.n_kv_heads)  # q, o (n_heads), k, v (n_kv_heads)
        if layer in self.moe:
            mlp = 2 * d * self.n_experts + self.top_k * 2 * self.mlp_mats * d * self.d_expert
        else:
            mlp = 2 * self.mlp_mats * d * self.d_ff
        return attn + mlp

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "moe": len(self.moe), "params": self.params}


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def dims_from_config(config: Any) -> Dims:
    """`Dims` of any supported family from its (text) config; a UserError for an unsupported one."""
    from fv_remote.models.adapters import spec_for

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    spec = spec_for(text)
    d = int(_get(text, "hidden_size", "n_embd"))
    heads = int(_get(text, "num_attention_heads", "n_head"))
    kv = int(_get(text, "num_key_value_heads", default=heads) or heads)
    head_dim = int(_get(text, "head_dim", default=0) or d // heads)
    layers = int(_get(text, "num_hidden_layers", "n_layer"))
    vocab = int(_get(text, "vocab_size"))
    gated = spec.family not in ("gpt2", "gptj", "gpt_neox")
    d_ff = int(_get(text, "intermediate_size", "n_inner", default=0) or 4 * d)
    moe: tuple[int, ...]
    experts = int(_get(text, "num_local_experts", "num_experts", default=0) or 0)
    top_k = int(_get(text, "num_experts_per_tok", "experts_per_token", default=0) or 0)
    d_expert, moe = 0, ()
    if experts and top_k:
        d_expert = int(_get(text, "moe_intermediate_size", default=0) or d_ff)
        if spec.family == "qwen3_moe":  # layers in mlp_only_layers, or off the sparse step, stay dense
            step = int(_get(text, "decoder_sparse_step", default=1) or 1)
            dense = set(_get(text, "mlp_only_layers", default=[]) or [])
            moe = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
        else:
            moe = tuple(range(layers))
    return Dims(family=spec.family, n_layers=layers, n_heads=heads, n_kv_heads=kv, head_dim=head_dim, d_model=d,
                d_ff=d_ff if len(moe) < layers else 0, mlp_mats=3 if gated else 2, vocab=vocab,
                n_experts=experts if moe else 0, top_k=top_k if moe else 0, d_expert=d_expert, moe=moe,
                tied=bool(_get(text, "tie_word_embeddings", default=False)),
                max_positions=int(_get(text, "max_position_embeddings", "n_positions", default=0) or 0),
                sliding=bool(_get(text, "sliding_window", "attention_chunk_size", default=None)
                             or any("sliding" in str(k) for k in (_get(text, "layer_types", default=None) or ()))))


def load_config(model: str, config: str | None = None) -> Any:
    """A transformers config without weights: `config` (a config.json or a folder holding one), else the model's
    cached config (a short name's cache folder, a local folder, or a Hub id from the Hugging Face cache, offline)."""
    from transformers import AutoConfig

    if config:
        path = Path(os.path.expanduser(config))
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UserError(f"--config {config}: no such config file")
        try:
            data = json.loads(path.read_text())
            model_type = data.pop("model_type")
            return AutoConfig.for_model(model_type, **data)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--config {config} is not a transformers config.json ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'model_type missing'})") from None
    from fv_remote.models.loading import RELEASES, model_dir

    if model in RELEASES:
        folder = model_dir(model)
        if (folder / "config.json").is_file():
            return load_config(model, str(folder))
        model = RELEASES[model].hub_repo
    if os.path.isdir(os.path.expanduser(model)):
        return load_config(model, model)
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"no cached config for {model!r} ({str(exc).splitlines()[0]}); pass --config with its "
                        "config.json (the planner needs no weights)") from None


# -- forwards -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trace:
    """One forward on the server (see the module docstring)."""

    rows: int
    tokens: int  # new tokens per row
    keys: int  # positions each new token's attention spans (cache + new)
    logits: int  # positions per row that go through the unembedding
    first: int = 0  # first decoder layer run (those below are skipped)
    backward_from: int | None = None  # backward through layers above this one (FFV training), None: no backward
    count: int = 1  # identical forwards

    def flops(self, dims: Dims) -> dict[str, int]:
        layers = range(self.first, dims.n_layers)
        linear = sum(dims.linear_per_token(i) for i in layers) * self.rows * self.tokens
        attention = 4 * self.rows * dims.n_heads * self.tokens * self.keys * dims.head_dim * len(layers)
        unembed = 2 * self.rows * self.logits * dims.d_model * dims.vocab
        backward = 0
        if self.backward_from is not None:
            above = range(self.backward_from + 1, dims.n_layers)
            backward = (sum(dims.linear_per_token(i) for i in above) * self.rows * self.tokens
                        + 2 * 4 * self.rows * dims.n_heads * self.tokens * self.keys * dims.head_dim * len(above)
                        + unembed)
        return {k: v * self.count for k, v in
                {"linear": linear, "attention": attention, "unembed": unembed, "backward": backward}.items()}

    def memory(self, dims: Dims, nbytes: int) -> dict[str, int]:
        """Peak activation bytes of this forward: its KV cache, the largest per-layer intermediate, the logits."""
        n_run = dims.n_layers - self.first
        kv = 2 * dims.n_layers * dims.n_kv_heads * dims.head_dim * self.keys * self.rows * nbytes
        width = max(dims.d_ff, dims.top_k * dims.d_expert, 1)
        per_layer = self.rows * self.tokens * (dims.n_heads * self.keys + 2 * width + 4 * dims.d_model) * nbytes
        logits = self.rows * self.logits * dims.vocab * 4 * 2  # the logits and their float32 softmax
        saved = 0
        if self.backward_from is not None:  # activations kept for the backward, per layer above the vector
            above = dims.n_layers - self.backward_from - 1
            saved = above * self.rows * self.tokens * (dims.n_heads * self.keys + 3 * width + 8 * dims.d_model) \
                * nbytes
        del n_run
        return {"kv_cache": kv, "layer": per_layer, "logits": logits, "backward_saved": saved}


@functools.cache
def body_bytes(body: Callable[..., Any]) -> int:
    """The pickled size of the code a stage's session body ships, read from that code as it is now (`body`: the
    function whose `with stage_session(...)` block is the session): nnsight 0.8.1 sends the block's source
    (`reduce_block`: unparsed, padded to its line numbers) with the globals it reads, the `fv_remote.traces` helpers
    among them by their source."""
    import ast
    import inspect

    from nnsight.intervention.serialization import dumps, reduce_block

    from fv_remote.execution import register_traces

    lines, first = inspect.getsourcelines(body)
    tree = ast.increment_lineno(ast.parse("".join(lines)), first - 1)
    block = next(n for n in ast.walk(tree) if isinstance(n, ast.With) and "stage_session" in ast.unparse(n.items[0]))
    register_traces()  # helpers ship by source, as in the stage
    code = body.__code__  # type: ignore[attr-defined]
    local_names = dict.fromkeys(code.co_varnames + code.co_cellvars)
    source, used_globals, _ = reduce_block(block, body.__globals__, local_names)  # type: ignore[attr-defined]
    return len(dumps((source, used_globals)))


def session_bytes(body: Callable[..., Any], dims: Dims) -> int:
    """A request's bytes besides its data: the body's code, the model's envoy tree and the tracer."""
    return body_bytes(body) + ENVOY_LAYER_BYTES * dims.n_layers + SESSION_OVERHEAD


def tensor_bytes(n_elements: int, nbytes: int, n_tensors: int = 1) -> int:
    """Returned tensors: data plus torch.save's per-tensor overhead."""
    return n_elements * nbytes + n_tensors * TENSOR_OVERHEAD


def sent_bytes(n_elements: int, nbytes: int, n_tensors: int = 1) -> int:
    """Tensors in a request: data plus the pickle's per-tensor overhead."""
    return n_elements * nbytes + n_tensors * PAYLOAD_TENSOR_OVERHEAD


# -- a stage's plan -----------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What one stage costs as one request (as the stages run remotely today)."""

    stage: str
    units: int  # prompts / relations / items the request covers (what a split divides)
    unit_name: str
    traces: list[Trace]
    sent_bytes: int
    returned_bytes: int
    extra_memory: dict[str, int] = field(default_factory=dict)  # beyond one forward's (saved results, cache copies)
    settings: dict[str, Any] = field(default_factory=dict)
    splittable: bool = True
    note: str = ""
    extra_flops: int = 0  # matmuls outside the forwards (analogy: mixing bank vectors), counted under linear

    def flops(self, dims: Dims) -> dict[str, int]:
        total = {"linear": self.extra_flops, "attention": 0, "unembed": 0, "backward": 0}
        for t in self.traces:
            for k, v in t.flops(dims).items():
                total[k] += v
        total["total"] = sum(total.values())
        return total

    @property
    def n_forwards(self) -> int:
        return sum(t.count for t in self.traces)

    def memory(self, dims: Dims, nbytes: int) -> dict[str, int]:
        peak, parts = 0, {}
        for t in self.traces:
            m = t.memory(dims, nbytes)
            if sum(m.values()) > peak:
                peak, parts = sum(m.values()), m
        parts = {**parts, **self.extra_memory}
        parts["peak"] = sum(parts.values())
        return parts


def _prompt_tokens(tokens: int | list[int], n: int) -> list[int]:
    if isinstance(tokens, int):
        return [tokens] * n
    if len(tokens) != n:
        raise UserError(f"{len(tokens)} prompt lengths for {n} prompts")
    return list(tokens)


def _batches(lengths: list[int], batch_size: int) -> list[tuple[int, int]]:
    """(rows, padded length) per batch of `batch_size` prompts in order."""
    return [(len(lengths[i:i + batch_size]), max(lengths[i:i + batch_size]))
            for i in range(0, len(lengths), batch_size)]


def _merge(traces: list[Trace]) -> list[Trace]:
    """Identical forwards counted once with their multiplicity (keeps big plans small)."""
    merged: Counter[tuple[int, int, int, int, int, int | None]] = Counter()
    for t in traces:
        merged[t.rows, t.tokens, t.keys, t.logits, t.first, t.backward_from] += t.count
    return [Trace(*key, count=n) for key, n in merged.items()]


# -- estimates, verdict, split ------------------------------------------------------------------------------------

@dataclass
class Server:
    """What the planner assumes about the server (module constants by default)."""

    throughput: float = THROUGHPUT_FLOPS
    trace_overhead_s: float = TRACE_OVERHEAD_S
    request_overhead_s: float = REQUEST_OVERHEAD_S
    bandwidth: float = BANDWIDTH_BPS
    execution_limit_s: float = EXECUTION_LIMIT_S
    max_result_bytes: int = MAX_RESULT_BYTES
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    memory_limit_bytes: int = MEMORY_LIMIT_BYTES

    def check(self) -> Server:
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0) and \
                    not (name.endswith("overhead_s") and value == 0):
                raise UserError(f"{name.replace('_', '-')} must be a positive number, got {value}")
        return self


@dataclass
class Estimate:
    stage: str
    flops: dict[str, int]
    forwards: int
    memory: dict[str, int]
    sent_bytes: int
    returned_bytes: int
    requests: int
    execution_s: float  # on the server, per request (the largest)
    wall_s: float  # all requests, with overheads and transfers
    warnings: list[str]
    split: dict[str, Any] | None
    settings: dict[str, Any]
    unit: str = "prompts"
    splittable: bool = True
    note: str = ""

    @property
    def fits(self) -> bool:
        return not self.warnings

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits}


def execution_seconds(plan: Plan, dims: Dims, server: Server) -> float:
    return plan.flops(dims)["total"] / server.throughput + plan.n_forwards * server.trace_overhead_s


def estimate(plan: Plan, dims: Dims, server: Server | None = None, nbytes: int = 2,
             rebuild: Any = None) -> Estimate:
    """Costs of `plan` as one request, the limits it breaks, and (when it breaks one and `rebuild(units)` can make
    the same stage for fewer units) the largest number of units per request that fits every limit."""
    server = (server or Server()).check()
    flops = plan.flops(dims)
    memory = plan.memory(dims, nbytes)
    exec_s = execution_seconds(plan, dims, server)
    warnings = _limits(plan, memory, exec_s, server)
    split, requests = None, 1
    if warnings and plan.splittable and rebuild is not None and plan.units > 1:
        split = _split(plan, dims, server, nbytes, rebuild)
        if split:
            requests = split["requests"]
    wall = requests * server.request_overhead_s + exec_s + (plan.sent_bytes + plan.returned_bytes) / server.bandwidth
    if split:
        exec_s = split["execution_s"]
    return Estimate(plan.stage, flops, plan.n_forwards, memory, plan.sent_bytes, plan.returned_bytes, requests,
                    exec_s, wall, warnings, split, plan.settings, plan.unit_name, plan.splittable, plan.note)


def _limits(plan: Plan, memory: dict[str, int], exec_s: float, server: Server) -> list[str]:
    out = []
    if exec_s > server.execution_limit_s:
        out.append(f"execution {_secs(exec_s)} exceeds the server's limit of {_secs(server.execution_limit_s)}")
    if plan.returned_bytes > server.max_result_bytes:
        out.append(f"result {_size(plan.returned_bytes)} exceeds the result limit of {_size(server.max_result_bytes)}")
    if plan.sent_bytes > server.max_payload_bytes:
        out.append(f"request {_size(plan.sent_bytes)} exceeds the request limit of {_size(server.max_payload_bytes)}")
    if memory["peak"] > server.memory_limit_bytes:
        out.append(f"peak activation memory {_size(memory['peak'])} exceeds {_size(server.memory_limit_bytes)}")
    return out


def _split(plan: Plan, dims: Dims, server: Server, nbytes: int, rebuild: Any) -> dict[str, Any] | None:
    """The most units per request (binary search) whose plan fits the limits with `SAFETY` on the time."""
    def fits(n: int) -> bool:
        p = rebuild(n)
        mem = p.memory(dims, nbytes)
        return (execution_seconds(p, dims, server) <= SAFETY * server.execution_limit_s
                and p.returned_bytes <= server.max_result_bytes and p.sent_bytes <= server.max_payload_bytes
                and mem["peak"] <= server.memory_limit_bytes)

    if not fits(1):
        return None
    lo, hi = 1, plan.units
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    part = rebuild(lo)
    return {f"{plan.unit_name}_per_request": lo, "requests": -(-plan.units // lo),
            "execution_s": execution_seconds(part, dims, server)}


def _secs(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def human(n: float) -> str:
    """A FLOP count or rate in engineering notation (1.2e15 -> '1.20 P')."""
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} "


def rows(est: Estimate, server: Server) -> list[tuple[str, str]]:
    """The table `fv-remote plan` prints: (quantity, value)."""
    f, m = est.flops, est.memory
    out = [("FLOPs (matmul)", f"{human(f['total'])}FLOP  (linear {human(f['linear'])}, attention "
                              f"{human(f['attention'])}, unembedding {human(f['unembed'])}"
                              + (f", backward {human(f['backward'])}" if f["backward"] else "") + ")"),
           ("forwards", f"{est.forwards:,}"),
           ("peak activation memory", f"{_size(m['peak'])}  (" + ", ".join(
               f"{k.replace('_', ' ')} {_size(v)}" for k, v in m.items() if k != "peak" and v) + ")"),
           ("bytes sent", _size(est.sent_bytes)),
           ("bytes returned", _size(est.returned_bytes)
            + ("  (over the 8 MiB inline limit: through object storage)" if est.returned_bytes > INLINE_RESULT_BYTES
               else "")),
           ("requests", f"{est.requests}"),
           ("server time per request", f"{_secs(est.execution_s)} at {human(server.throughput)}FLOP/s + "
                                       f"{server.trace_overhead_s:g} s per forward"),
           ("wall time", _secs(est.wall_s))]
    return out


def verdict(est: Estimate, server: Server) -> str:
    if est.fits:
        return (f"fits: one request, {_secs(est.execution_s)} of the server's {_secs(server.execution_limit_s)} "
                "execution limit")
    text = "does not fit as one request: " + "; ".join(est.warnings)
    if est.split:
        per = next(k for k in est.split if k.endswith("_per_request"))
        text += (f". Split: {est.split[per]} {per.removesuffix('_per_request')} per request, "
                 f"{est.split['requests']} requests of about {_secs(est.split['execution_s'])} each")
    elif est.warnings:
        text += (f". No split by {est.unit} fits" if est.splittable
                 else ". This stage is one job that cannot be split by "
                 f"{est.unit}") + ": lower the batch size, steps or prompt length, or raise the limits"
    return text


# -- one entry point for the CLI and the benchmarks ---------------------------------------------------------------

TOKENS_PER_SHOT = 7  # "Q: word\nA: word\n\n" in a Llama-style tokenizer (smollm2-135m, Todd's tasks: 6.3-7.7)
QUERY_TOKENS = 5  # a zero-shot query "Q: word\nA:" (FFV training prompts)


N_ANALOGY_METHODS = 6  # `relational.analogy.METHODS` (tests/plan/test_plan.py keeps the two equal)

# The most each option may ask for (the plan of a bigger job is only a bigger number; these keep it quick to make)
OPTION_LIMITS = {"n_prompts": 100_000, "max_copies": 1_000_000, "steps": 100_000, "n_train": 100_000,
                 "eval_every": 100_000, "relations": 10_000, "items": 100_000, "bank_size": 1_000, "choices": 100,
                 "methods": N_ANALOGY_METHODS, "positions": 10_000, "n_shots": 10_000, "n_valid": 100_000,
                 "prompt_tokens": 10_000_000, "batch_size": 100_000}


@dataclass
class StageOptions:
    """A stage's options as `fv-remote plan` takes them (the stages' own defaults)."""

    n_prompts: int = 25  # extract: 100 by default (set by the CLI); cma: 25
    n_shots: int = 10
    prompt_tokens: int | None = None  # None: TOKENS_PER_SHOT * n_shots + QUERY_TOKENS (zero-shot: QUERY_TOKENS)
    batch_size: int | None = None  # None: the stage's default
    positions: int = 1
    dtype: str = "bfloat16"
    reduce: str = "none"
    max_copies: int = 256
    steps: int = 40
    n_train: int = 100
    n_valid: int = 50
    eval_every: int = 5
    layer: int | None = None  # finetune: None = layer search
    relations: int = 10
    items: int = 100
    bank_size: int = 10
    choices: int = 4
    methods: int = N_ANALOGY_METHODS

    def tokens(self, shots: int | None = None) -> int:
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        shots = self.n_shots if shots is None else shots
        return TOKENS_PER_SHOT * shots + QUERY_TOKENS

    def check(self) -> StageOptions:
        for name, most in OPTION_LIMITS.items():
            value = getattr(self, name)
            if value is not None and int(value) > most:
                raise UserError(f"--{name.replace('_', '-')} {value}: at most {most:,} (ask for fewer)")
        for name in ("n_prompts", "max_copies", "steps", "n_train", "eval_every", "relations", "items", "bank_size",
                     "choices", "methods", "positions"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("n_shots", "n_valid"):
            if int(getattr(self, name)) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.prompt_tokens is not None and self.prompt_tokens < 2:
            raise UserError(f"--prompt-tokens must be at least 2, got {self.prompt_tokens}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.dtype not in DTYPE_BYTES:
            raise UserError(f"unknown --dtype {self.dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
        if self.reduce not in ("none", "mean", "float16"):
            raise UserError(f"unknown --reduce {self.reduce!r}; use none, mean or float16")
        return self


