"""Cost planner for remote (NDIF) stages: FLOPs, activation memory, bytes each way, requests and time, from a model's
config alone (no weights) and a stage's options; a verdict against the server's limits and a split that fits.

Model of cost
-------------
A stage is the list of forwards (`Trace`) its session body runs on the server, mirrored from the stage's code
(`extract.trace_heads_batches`, `cma.cma_fast_session`, `ffv_session.run_jobs`, `analogy.analogy_session`). A
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
# The function whose `with stage_session(...)` block is each stage's session body (`body_bytes` reads its code)
BODIES = {"extract": "fv_remote.fv.extract:trace_heads_batches", "cma": "fv_remote.fv.cma_methods:cma_fast_session",
          "finetune": "fv_remote.relational.ffv_session:run_jobs", "bank": "fv_remote.relational.ffv_session:run_jobs",
          "analogy": "fv_remote.relational.analogy:analogy_session"}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
STAGES = ("extract", "cma", "finetune", "bank", "analogy")


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
def body_bytes(stage: str) -> int:
    """The pickled size of the code `stage`'s session body ships, read from that code as it is now: nnsight 0.8.1 sends
    the `with stage_session(...)` block's source (`reduce_block`: unparsed, padded to its line numbers) with the
    globals it reads, the `fv_remote.traces` helpers among them by their source."""
    import ast
    import importlib
    import inspect

    from nnsight.intervention.serialization import dumps, reduce_block

    from fv_remote.execution import register_traces

    module, name = BODIES[stage].split(":")
    fn = getattr(importlib.import_module(module), name)
    lines, first = inspect.getsourcelines(fn)
    tree = ast.increment_lineno(ast.parse("".join(lines)), first - 1)
    block = next(n for n in ast.walk(tree) if isinstance(n, ast.With) and "stage_session" in ast.unparse(n.items[0]))
    register_traces()  # helpers ship by source, as in the stage
    local_names = dict.fromkeys(fn.__code__.co_varnames + fn.__code__.co_cellvars)
    source, used_globals, _ = reduce_block(block, fn.__globals__, local_names)
    return len(dumps((source, used_globals)))


def session_bytes(stage: str, dims: Dims) -> int:
    """A request's bytes besides its data: the body's code, the model's envoy tree and the tracer."""
    return body_bytes(stage) + ENVOY_LAYER_BYTES * dims.n_layers + SESSION_OVERHEAD


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


def plan_extract(dims: Dims, n_prompts: int, prompt_tokens: int | list[int], batch_size: int = 16,
                 n_positions: int = 1, nbytes: int = 2, reduce: str = "none") -> Plan:
    """`extract --remote`: one forward per batch (all positions through the unembedding); per batch the head outputs
    [B, P, L, H, Dh] in the model's dtype, P(answer) (float32) and the top-1 token (int64) come back.

    `reduce`: what comes back instead with a server-side reduction: "float16" (`extract --remote --reduce
    float16`: the same values at 2 bytes) or "mean" (one [P, L, H, Dh] float32 mean: a what-if, not built)."""
    lengths = _prompt_tokens(prompt_tokens, n_prompts)
    traces = [Trace(rows, t, t, t) for rows, t in _batches(lengths, batch_size)]
    per_prompt = n_positions * dims.n_layers * dims.n_heads * dims.head_dim
    out_bytes = 2 if reduce == "float16" else nbytes
    if reduce == "mean":
        heads = tensor_bytes(per_prompt, 4)
    else:
        heads = sum(tensor_bytes(per_prompt * t.rows, out_bytes) for t in traces)
    returned = heads + sum(tensor_bytes(t.rows, 4) + tensor_bytes(t.rows, 8) for t in traces) + RESULT_OVERHEAD
    sent = session_bytes("extract", dims) + sum(sent_bytes(t.rows, 8) + t.rows * t.tokens * 4 for t in traces)
    return Plan("extract", n_prompts, "prompts", traces, sent, returned,
                extra_memory={"saved_results": heads},
                settings={"n_prompts": n_prompts, "batch_size": batch_size, "positions": n_positions,
                          "reduce": reduce})


def cma_groups(dims: Dims, max_copies: int = 256) -> list[list[tuple[int, int]]]:
    """The copies forwards `cma_methods.cma_fast_session` makes per prompt: `fast_groups`' grouping of all heads
    (by the cost model when one prompt forward serves every group; as few groups as possible with sliding windows)."""
    from fv_remote.fv.cma_methods import plan_groups

    heads = [(layer, head) for layer in range(dims.n_layers) for head in range(dims.n_heads)]
    head_cost = dims.vocab * dims.d_model / max(dims.layer_params, 1)
    costs = {"fixed": 1e12, "weights": 0.0} if dims.sliding else {}
    return [[heads[i] for i in g] for g in plan_groups(heads, dims.n_layers, head_cost, max_copies=max_copies,
                                                       **costs)]


def plan_cma(dims: Dims, n_prompts: int, prompt_tokens: int | list[int], nbytes: int = 2, max_copies: int = 256,
             mask_bytes: int = 1) -> Plan:
    """`cma --remote` (fast exact CMA, one session): per prompt and group of R patched heads, one forward of the
    prompt (logits at its last token only) and one of R last-token copies that attend to the prompt's cached keys
    and values, from the group's lowest patched layer up (logits at every copy). Sent per group: the copies' ids,
    position ids, mask [R, T + R] (`mask_bytes`: 1 for SDPA's boolean mask, the dtype's size for eager) and each
    patched head's float32 mean; back: P(answer) per copy and the unpatched P(answer) per prompt. The body shares
    what does not depend on the prompt (a pickle writes an object once): the means once per group, a mask and
    position ids once per (prompt length, R), the copies' ids once per prompt and R (counted as if no two prompts
    ended on the same token)."""
    lengths = _prompt_tokens(prompt_tokens, n_prompts)
    groups = cma_groups(dims, max_copies)
    sizes = sorted({len(g) for g in groups})
    traces, sent, returned = [], session_bytes("cma", dims), RESULT_OVERHEAD
    for g in groups:
        n_layers = len({layer for layer, _ in g})
        sent += sent_bytes(2 * len(g), 8, 2 * n_layers) + sent_bytes(len(g) * dims.head_dim, 4, n_layers)
    for t, n in Counter(lengths).items():  # prompts of one length cost the same
        sent += n * (sent_bytes(t, 8) + sum(sent_bytes(r, 8) for r in sizes))
        sent += sum(sent_bytes(r * (t + r), mask_bytes) + sent_bytes(r, 8) for r in sizes)
        returned += n * tensor_bytes(1, 4)
        for i, g in enumerate(groups):
            r, first = len(g), min(layer for layer, _ in g)
            if i == 0 or dims.sliding:  # the prompt forward: once per prompt, or per group with sliding windows
                traces.append(Trace(1, t, t, 1, count=n))
            traces.append(Trace(1, r, t + r, r, first=first, count=n))
            returned += n * tensor_bytes(r, 4)
    t_max, r_max = max(lengths), max(len(g) for g in groups)
    kv_prompt = 2 * dims.n_layers * dims.n_kv_heads * dims.head_dim * t_max * nbytes
    return Plan("cma", n_prompts, "prompts", _merge(traces), sent, returned,
                extra_memory={"kv_cache": kv_prompt},
                settings={"n_prompts": n_prompts, "heads": dims.n_layers * dims.n_heads, "groups": len(groups),
                          "max_copies": max_copies, "largest_group": r_max},
                note="one prompt forward per prompt; each group's copies are cropped off its KV cache again (with "
                     "sliding-window layers the prompt is recomputed per group instead)")


Chunks = list[tuple[int, int]]  # (rows, padded tokens) per chunk of a dataset, in order


def _ffv_job_traces(layer: int, steps: int, train: Chunks, valid: Chunks, eval_every: int) -> list[Trace]:
    """One fine-tuning job of `ffv_session.run_jobs` on the cached-prefix path: the last token of a training chunk
    per step from the vector's layer up (the layers below skipped; forward + backward), every validation chunk at
    step 0, every `eval_every` steps and the last step."""
    evals = (steps // eval_every + 1 + (steps % eval_every != 0)) if valid else 0  # 0, every eval_every, the last
    n = len(train)  # step s trains on chunk (s - 1) % n
    out = [Trace(rows, 1, t, 1, first=layer, backward_from=layer, count=steps // n + (i < steps % n))
           for i, (rows, t) in enumerate(train) if steps // n + (i < steps % n)]
    out += [Trace(rows, 1, t, 1, first=layer, count=evals) for rows, t in valid]
    return out


def _chunks(n: int, batch_size: int, tokens: int) -> Chunks:
    return _batches([tokens] * n, batch_size) if n else []


def plan_finetune(dims: Dims, n_train: int, n_valid: int, prompt_tokens: int, steps: int = 40, batch_size: int = 32,
                  eval_every: int = 5, layer: int | None = None, quick_steps: int = 30, nbytes: int = 2,
                  relations: int = 1, baseline: bool = False, stage: str = "finetune",
                  datasets: list[dict[str, Chunks]] | None = None) -> Plan:
    """`finetune --remote` (one relation; `layer=None`: the layer search's short runs at `candidate_layers` plus the
    final run) and `bank build --remote` (`relations` jobs at one layer, each with its zero-shot baseline on whole
    prompts in batches of 64): `ffv_session.run_jobs` on the cached-prefix path (each chunk's whole prompts once,
    then the last token per step from the vector's layer up). `datasets` (per relation: "train", "valid", "base"
    chunks as (rows, padded tokens)) replaces the uniform `prompt_tokens` where the real prompts are known. Back per
    job: the vector (float32), its history and a few floats."""
    from fv_remote.relational.ffv import candidate_layers

    if datasets is None:
        uniform = {"train": _chunks(n_train, batch_size, prompt_tokens),
                   "valid": _chunks(n_valid, batch_size, prompt_tokens),
                   "base": _chunks(n_valid, 64, prompt_tokens) if baseline else []}
        datasets = [uniform] * (1 if layer is None else relations)
    at_layers = candidate_layers(dims.n_layers) if layer is None else [layer]  # the search's, or the one layer
    traces: list[Trace] = []
    n_jobs = 0
    same = Counter(id(data) for data in datasets)  # relations sharing one uniform dataset cost the same
    for data in {id(d): d for d in datasets}.values():
        k = same[id(data)]
        one = [Trace(rows, t, t, 1) for rows, t in data["train"] + data["valid"]]  # each chunk's prompts once
        if layer is None:
            for at in at_layers:
                one += _ffv_job_traces(at, quick_steps, data["train"], data["valid"], quick_steps)
            at = at_layers[len(at_layers) // 2]  # the final run's layer is decided on the server; costs barely differ
            n_jobs += k * len(at_layers)
        else:
            at = layer
        one += _ffv_job_traces(at, steps, data["train"], data["valid"], eval_every)
        one += [Trace(rows, t, t, 1) for rows, t in data.get("base", [])]
        n_jobs += k
        traces += [Trace(t.rows, t.tokens, t.keys, t.logits, t.first, t.backward_from, t.count * k) for t in one]
    # per chunk: ids, mask and positions of the whole prompts and the targets; a cached-prefix chunk (all but the
    # baseline's) also the last token's ids and positions, views that each ship their whole storage (the last
    # token's mask is the whole prompts' own)
    cached = sum(rows * t for data in datasets for rows, t in data["train"] + data["valid"])
    whole = sum(rows * t for data in datasets for rows, t in data.get("base", []))
    n_tensors = sum(6 * (len(data["train"]) + len(data["valid"])) + 4 * len(data.get("base", [])) for data in datasets)
    sent = session_bytes(stage, dims) + 8 * (5 * cached + 3 * whole) + n_tensors * PAYLOAD_TENSOR_OVERHEAD \
        + n_jobs * (sent_bytes(dims.d_model, 4) + 16 * steps)
    # per job: the vector, a dict of a few floats and the history (about 30 bytes per step and per validation)
    returned = RESULT_OVERHEAD + n_jobs * (tensor_bytes(dims.d_model, 4) + 200 + 30 * (steps + steps // eval_every))
    handoffs = len({at - 1 for at in at_layers if at > 0})  # last-token outputs kept: the layer below each vector's
    kv_token = 2 * dims.n_layers * dims.n_kv_heads * dims.head_dim
    cache = nbytes * sum(rows * (kv_token * (t - 1) + handoffs * dims.d_model)
                         for data in datasets for rows, t in data["train"] + data["valid"])
    units = len(datasets) if stage == "bank" else n_train
    return Plan(stage, units, "relations" if stage == "bank" else "prompts", _merge(traces), sent, returned,
                extra_memory={"prefix_caches": cache},
                settings={"n_train": n_train, "n_valid": n_valid, "steps": steps, "batch_size": batch_size,
                          "eval_every": eval_every, "layer": "search" if layer is None else layer, "jobs": n_jobs,
                          **({"relations": len(datasets)} if stage == "bank" else {})},
                splittable=stage == "bank",
                note="steps are an upper bound (early stopping ends sooner); every chunk's prefix KV cache stays "
                     "on the server for the whole request (prefix_caches)")


# `analogy.METHODS` in its order (tests/test_plan.py keeps the two equal); these mix the bank's vectors per row
ANALOGY_METHODS = ("cfv", "no_vector", "best_ffv", "icl", "icl_qa", "icl_qa+cfv")
MIXING_METHODS = frozenset({"cfv", "best_ffv", "icl_qa+cfv"})


def plan_analogy(dims: Dims, n_items: int, n_bank: int, prompt_tokens: int, n_choices: int = 4,
                 n_methods: int = len(ANALOGY_METHODS),
                 batch_size: int = 48, nbytes: int = 2, passes: list[list[int]] | None = None) -> Plan:
    """`analogy --remote` (multiple choice, first-token scores): the relation profile (every item's A:B with every
    bank vector) then, per method, every item's choices; batches of `batch_size` whole prompts, logits at the last
    token only. `passes` (per pass, each row's prompt length in tokens) replaces the uniform `prompt_tokens` where the
    prompts are known. Back per pass: a score sum, a count and a match per row, and the CFV weights [items, bank]."""
    traces: list[Trace] = []
    if passes is None:  # every row prompt_tokens long: whole batches counted, not listed
        rows = [n_items * n_bank] + [n_items * n_choices] * n_methods
        for n in rows:
            full, rest = divmod(n, batch_size)
            traces += [Trace(batch_size, prompt_tokens, prompt_tokens, 1, count=full)] if full else []
            traces += [Trace(rest, prompt_tokens, prompt_tokens, 1)] if rest else []
        n_tokens = sum(rows) * prompt_tokens
    else:
        rows = [len(p) for p in passes]
        for lengths in passes:
            traces += [Trace(r, t, t, 1) for r, t in _batches(lengths, batch_size)]
        n_tokens = sum(sum(p) for p in passes)
    n_batches = sum(t.count for t in traces)
    sent = session_bytes("analogy", dims) + n_tokens * 4 + sum(rows) * 8 * 5 + 5 * PAYLOAD_TENSOR_OVERHEAD * n_batches \
        + sent_bytes(n_bank * dims.d_model, 4)
    returned = RESULT_OVERHEAD + sum(tensor_bytes(n, 4) + tensor_bytes(n, 8) + tensor_bytes(n, 1) for n in rows) \
        + tensor_bytes(n_items * n_bank, 4)
    # rows of the profile (one bank vector each) and of the mixing methods: [rows, bank] @ [bank, d_model] per batch
    mixed = rows[0] + sum(n for n, method in zip(rows[1:], ANALOGY_METHODS) if method in MIXING_METHODS)
    return Plan("analogy", n_items, "items", _merge(traces), sent, returned,
                extra_flops=2 * mixed * n_bank * dims.d_model,
                settings={"items": n_items, "bank": n_bank, "choices": n_choices, "methods": len(rows) - 1,
                          "batch_size": batch_size})


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


# The most each option may ask for (the plan of a bigger job is only a bigger number; these keep it quick to make)
OPTION_LIMITS = {"n_prompts": 100_000, "max_copies": 1_000_000, "steps": 100_000, "n_train": 100_000,
                 "eval_every": 100_000, "relations": 10_000, "items": 100_000, "bank_size": 1_000, "choices": 100,
                 "methods": len(ANALOGY_METHODS), "positions": 10_000, "n_shots": 10_000, "n_valid": 100_000,
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
    methods: int = len(ANALOGY_METHODS)

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


def stage_plan(stage: str, dims: Dims, o: StageOptions) -> tuple[Plan, Any]:
    """(the stage's plan as one request, `rebuild(units)`: the same stage for fewer units, for splitting)."""
    o.check()
    nbytes = DTYPE_BYTES[o.dtype]
    if stage == "extract":
        def make(n: int) -> Plan:
            return plan_extract(dims, n, o.tokens(), o.batch_size or 16, o.positions, nbytes, o.reduce)
        return make(o.n_prompts), make
    if stage == "cma":
        def make(n: int) -> Plan:
            return plan_cma(dims, n, o.tokens(), nbytes, o.max_copies)
        return make(o.n_prompts), make
    if stage == "finetune":
        if o.layer is not None and not 0 <= o.layer < dims.n_layers:
            raise UserError(f"--layer {o.layer} out of range: this model has layers 0..{dims.n_layers - 1}")
        return plan_finetune(dims, o.n_train, o.n_valid, o.tokens(0), o.steps, o.batch_size or 32, o.eval_every,
                             o.layer, nbytes=nbytes), None
    if stage == "bank":
        layer = round(0.4 * dims.n_layers) if o.layer is None else o.layer  # `bank build`'s default

        def make(n: int) -> Plan:
            return plan_finetune(dims, o.n_train, o.n_valid, o.tokens(0), o.steps, o.batch_size or 32,
                                 o.eval_every, layer, nbytes=nbytes, relations=n, baseline=True, stage="bank")
        return make(o.relations), make
    if stage == "analogy":
        def make(n: int) -> Plan:
            return plan_analogy(dims, n, o.bank_size, o.tokens(0), o.choices, o.methods, o.batch_size or 48, nbytes)
        return make(o.items), make
    raise UserError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
