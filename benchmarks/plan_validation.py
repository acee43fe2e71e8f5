"""The cost planner (`fv_remote.plan.cost`, `fv-remote plan`) against measurement, per remote stage, on a real model.

For each stage (extract, cma, finetune, bank build, analogy), small settings on real prompts:

- FLOPs: the stage's session body run locally (`remote=False`, the code NDIF runs) under
  `torch.utils.flop_counter.FlopCounterMode`, with eager attention so that the attention products are matmuls too;
  the planner's count for the same prompts (their token lengths; nothing else from the run).
- time: the same body again, SDPA attention, single-threaded, timed (the better of two runs after a warm-up); the
  planner's time with two constants of THIS machine measured right before each stage (the CPU is shared, its speed
  drifts): matmul throughput (a plain forward of 4 ten-shot prompts, FLOPs / s) and the per-forward overhead (a
  2-token nnsight trace, its FLOP time subtracted).
- bytes: the same stage through the loopback NDIF server (tests/support/loopback_ndif.py) hosting the model: the request's
  payload and the result, both uncompressed (what the planner estimates) and as sent (zstd).

    PYTHONHASHSEED=0 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plan_validation.py [--model ...]

A request's size depends on the process's string hash seed (nnsight pickles the body's variables in set order: the
model's envoy tree pickled after >= 256 other objects costs ~470 B more per layer), so set PYTHONHASHSEED to repeat one.

Prints a Markdown table (RESULTS.md) and one JSON line per stage on stderr. A few minutes on one core.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from fv_remote.plan import cost as P  # noqa: E402
from fv_remote.relational.ffv import finetune_cost  # noqa: E402
from fv_remote.relational.analogy import analogy_cost  # noqa: E402
from fv_remote.fv.extract import extract_cost  # noqa: E402
from fv_remote.fv.cma import cma_cost  # noqa: E402
from fv_remote.execution import resolve

TODD = Path("/work/shared/data/todd_fv/abstractive")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def attention(model, kind: str) -> None:
    model.hf.set_attn_implementation(kind)


class Setup:
    def __init__(self, name: str):
        from fv_remote.data import load_task
        from fv_remote.models.loading import load_model
        from fv_remote.data.tasks import prepare_task

        self.model = load_model(name)
        self.name = name
        self.dims = P.dims_from_config(self.model.hf.config)
        folder = str(TODD) if TODD.is_dir() else None
        self.tasks = [load_task(t, data_dir=folder) if folder else load_task(t)
                      for t in ("present-past", "singular-plural", "antonym")]
        self.prepared = [prepare_task(self.model.tokenizer, t, seed=0, min_pairs=12) for t in self.tasks]
        self.tok = self.model.tokenizer

    def n_tokens(self, text: str) -> int:
        return int(self.tok(text, return_tensors="pt").input_ids.shape[1])


# -- stages: (inputs, the planner's plan, a local run of the session body, a remote run) ----------------------------

def stage_extract(s: Setup):
    from fv_remote.fv.extract import trace_heads_batches

    prompts = s.prepared[0].prompts("train", 8, kind="clean", n_shots=5)
    batches = [([p.text for p in prompts[i:i + 4]], [s.prepared[0].answer_token[p.answer] for p in prompts[i:i + 4]])
               for i in range(0, 8, 4)]
    lengths = [s.n_tokens(p.text) for p in prompts]
    plan = extract_cost(s.dims, 8, lengths, 4, 1, nbytes=4)
    return plan, lambda m, r: trace_heads_batches(m.using(resolve(r)), batches, (-1,)), "8 prompts, 5-shot, 2 batches of 4"


def stage_extract_half(s: Setup):
    from fv_remote.fv.extract import trace_heads_batches

    prompts = s.prepared[0].prompts("train", 8, kind="clean", n_shots=5)
    batches = [([p.text for p in prompts[i:i + 4]], [s.prepared[0].answer_token[p.answer] for p in prompts[i:i + 4]])
               for i in range(0, 8, 4)]
    half = extract_cost(s.dims, 8, [s.n_tokens(p.text) for p in prompts], 4, 1, nbytes=4, reduce="float16")
    return half, lambda m, r: trace_heads_batches(m.using(resolve(r)), batches, (-1,), half=bool(r)), \
        "as extract, --reduce float16"


def stage_cma(s: Setup):
    from fv_remote.fv.cma import cma_fast_session

    prompts = s.prepared[0].prompts("train", 2, kind="shuffled", n_shots=5, seed_offset=1)
    jobs = [(p.text, s.prepared[0].answer_token[p.answer]) for p in prompts]
    ad = s.model.adapter
    means = torch.randn(ad.n_layers, ad.n_heads, ad.head_dim, generator=torch.Generator().manual_seed(0))
    plan = cma_cost(s.dims, 2, [s.n_tokens(t) for t, _ in jobs], nbytes=4)
    return plan, lambda m, r: cma_fast_session(m.using(resolve(r)), jobs, means), "2 prompts, 5-shot, all 270 heads"


SETTINGS = dict(steps=6, lr=0.2, batch_size=4, eval_every=3, patience=10)


def _ffv_chunks(s: Setup, texts, batch_size, shuffle=True):
    from fv_remote.relational.ffv import Examples
    from fv_remote.relational.ffv_plan import chunk_examples

    data = Examples(list(texts), torch.zeros(len(texts), dtype=torch.long))
    return [(len(t), int(s.tok(list(t), return_tensors="pt", padding=True).input_ids.shape[1]))
            for t, _ in chunk_examples(data, batch_size, 0, shuffle)]


def stage_finetune(s: Setup):
    from fv_remote.relational.ffv import FinetuneSettings, examples
    from fv_remote.relational.ffv import finetune

    prepared = s.prepared[0]
    train, valid = examples(prepared, "train", 8), examples(prepared, "valid", 4)
    v0 = 0.1 * torch.randn(s.model.adapter.d_model, generator=torch.Generator().manual_seed(2))
    st = FinetuneSettings(**SETTINGS)
    data = [{"train": _ffv_chunks(s, train.texts, 4), "valid": _ffv_chunks(s, valid.texts, 4), "base": []}]
    plan = finetune_cost(s.dims, 8, 4, 0, st.steps, st.batch_size, st.eval_every, layer=9, nbytes=4,
                           datasets=data)
    return plan, lambda m, r: finetune(m.using(resolve(r)), train, valid, v0, 9, st), \
        "layer 9, 6 steps x 4 prompts, 3 validations of 4"


def stage_bank(s: Setup):
    from fv_remote.relational.bank_build import build_bank
    from fv_remote.relational.ffv import FinetuneSettings, examples

    st = FinetuneSettings(**SETTINGS)
    data = []
    for prepared in s.prepared[:2]:
        train, valid = examples(prepared, "train", 8), examples(prepared, "valid", 4)
        data.append({"train": _ffv_chunks(s, train.texts, 4), "valid": _ffv_chunks(s, valid.texts, 4),
                     "base": _ffv_chunks(s, valid.texts, 64, shuffle=False)})
    plan = finetune_cost(s.dims, 8, 4, 0, st.steps, st.batch_size, st.eval_every, layer=9, nbytes=4,
                           baseline=True, stage="bank", datasets=data)
    tmp = Path(tempfile.mkdtemp(prefix="fv-plan-bank-"))

    def run(m, r):  # local or remote: the same stage body (issue 12)
        return build_bank(m.using(resolve(r)), s.tasks[:2], tmp / f"bank-{time.monotonic_ns()}.safetensors", layer=9, n_train=8,
                          n_valid=4, settings=st, resume=False)
    return plan, run, "2 relations, layer 9, 6 steps x 4 prompts, baseline"


def stage_analogy(s: Setup):
    from fv_remote.relational.analogy import METHODS, AnalogySettings, _method_rows, analogy_session, check_items
    from fv_remote.relational.bank import RelationBank
    from fv_remote.data import MCAnalogy
    from fv_remote.fv.vectors import FunctionVector

    gen = torch.Generator().manual_seed(5)
    bank = RelationBank(s.model.model_id)
    for name in ("a", "b", "c"):
        bank.add_vector(FunctionVector(vector=torch.randn(s.model.adapter.d_model, generator=gen),
                                       model=s.model.model_id, task=name, layer=9, kind="ffv"))
    items = [MCAnalogy(("hot", "cold"), [("up", "down"), ("big", "dog"), ("the", "fox")], 0, "x"),
             MCAnalogy(("big", "small"), [("quick", "lazy"), ("up", "down")], 1, "x"),
             MCAnalogy(("go", "went"), [("see", "saw"), ("run", "ran"), ("eat", "cat")], 2, "x")]
    st = AnalogySettings(batch_size=4, n_boot=20)
    kept, _ = check_items(s.tok, items, st)
    tmpl = st.template
    passes = [[s.n_tokens(tmpl.query_text(a)) for a, _ in (it.stem for it in kept) for _ in range(len(bank))]]
    for method in METHODS:
        _, prompts, _, _ = _method_rows(kept, st, method)
        passes.append([s.n_tokens(p) for p in prompts])
    plan = analogy_cost(s.dims, len(kept), len(bank), 0, batch_size=4, nbytes=4, passes=passes)

    def run(m, r):
        if r:
            from fv_remote.relational.analogy import run_analogies

            return run_analogies(m.using(resolve(r)), bank, items, st)
        return analogy_session(m, bank, kept, st, None, METHODS)
    return plan, run, "mc/first, 3 items, 6 methods, 3 relations"


STAGES = {"extract": stage_extract, "extract --reduce float16": stage_extract_half, "cma": stage_cma, "finetune": stage_finetune, "bank build": stage_bank,
          "analogy": stage_analogy}


# -- machine constants, measured first ---------------------------------------------------------------------------

def machine(s: Setup) -> tuple[float, float]:
    """(matmul FLOP/s of a plain forward of 4 ten-shot prompts, seconds of nnsight overhead per forward)."""
    texts = [p.text for p in s.prepared[0].prompts("train", 4, kind="clean", n_shots=10)]
    enc = s.tok(texts, return_tensors="pt", padding=True)
    attention(s.model, "sdpa")
    with torch.no_grad():
        s.model.hf(**enc)
        flops = count_flops(lambda: s.model.hf(**enc))
        secs = min(timed(lambda: s.model.hf(**enc)) for _ in range(3))
    rate = flops / secs
    ids = s.tok("Q: a", return_tensors="pt").input_ids[:, :2]

    def tiny():
        with s.model.lm.trace(input_ids=ids):
            s.model.lm.lm_head.output[:, -1].sum().save()
    tiny()
    small = count_flops(tiny)
    overhead = min(timed(tiny) for _ in range(5)) - small / rate
    return rate, max(overhead, 0.0)


def remote_sizes(s: Setup, stages):
    """Per stage: (payload raw, payload zstd, result raw, result zstd) through the loopback server."""
    import zstandard

    from fv_remote.execution.hosted import load_remote_model
    from support.remote_fixtures import serve_copy, write_hub_cache

    repo = s.model.model_id if "/" in s.model.model_id else "test-org/" + s.name
    out = {}
    with tempfile.TemporaryDirectory(prefix="fv-plan-sizes-") as tmp, \
            contextlib.redirect_stdout(io.StringIO()), serve_copy(s.model, s.tok, repo) as server:
        os.environ["NDIF_HOST"] = server.host
        os.environ.pop("NDIF_API_KEY", None)
        cache = write_hub_cache(Path(tmp) / "hf", repo, s.model.hf, s.tok)
        remote_model = load_remote_model(repo, cache_dir=cache)
        for name, (_, run, _) in stages.items():
            server.reset()
            run(remote_model, True)
            jobs = [j for j in server.jobs]
            if any(j.status != "COMPLETED" for j in jobs):
                raise RuntimeError(f"{name}: {[(j.status, j.error) for j in jobs]}")
            dz = zstandard.ZstdDecompressor()

            def raw(blob, compressed):
                return len(dz.decompress(blob, max_output_size=1 << 31)) if compressed else len(blob)
            out[name] = (sum(raw(j.blob, j.compress) for j in jobs), sum(j.payload_bytes for j in jobs),
                         sum(raw(j.result, j.compress) for j in jobs), sum(j.result_bytes for j in jobs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--no-bytes", action="store_true", help="skip the loopback-server byte measurement")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    s = Setup(args.model)
    stages = {name: STAGES[name](s) for name in args.stages.split(",")}
    sizes = {} if args.no_bytes else remote_sizes(s, stages)
    rows = []
    for name, (plan, run, setting) in stages.items():
        attention(s.model, "eager")
        measured_flops = count_flops(lambda: run(s.model, False))
        attention(s.model, "sdpa")
        run(s.model, False)  # warm-up
        rate, overhead = machine(s)
        log(f"machine: {rate / 1e9:.2f} GFLOP/s matmul, {overhead * 1e3:.1f} ms per forward (nnsight)")
        server = P.Server(throughput=rate, trace_overhead_s=overhead, request_overhead_s=0.0)
        secs = min(timed(lambda: run(s.model, False)) for _ in range(2))
        est = plan.flops(s.dims)["total"]
        est_s = P.execution_seconds(plan, s.dims, server)
        row = {"stage": name, "setting": setting, "flops_est": est, "flops_measured": measured_flops,
               "flops_ratio": est / measured_flops, "forwards": plan.n_forwards, "time_est_s": round(est_s, 3),
               "time_measured_s": round(secs, 3), "time_ratio": round(est_s / secs, 3),
               "machine_gflops": round(rate / 1e9, 2), "machine_ms_per_forward": round(overhead * 1e3, 1),
               "sent_est": plan.sent_bytes, "returned_est": plan.returned_bytes}
        if name in sizes:
            sent_raw, sent_z, ret_raw, ret_z = sizes[name]
            row.update(sent_measured=sent_raw, sent_zstd=sent_z, returned_measured=ret_raw, returned_zstd=ret_z,
                       sent_ratio=round(plan.sent_bytes / sent_raw, 3),
                       returned_ratio=round(plan.returned_bytes / ret_raw, 3))
        log(json.dumps(row))
        rows.append(row)
    print(f"model {args.model}, PYTHONHASHSEED={os.environ.get('PYTHONHASHSEED', 'random')}; machine constants "
          "measured before each stage (1 thread): GFLOP/s of a plain forward, ms of nnsight overhead per forward\n")
    print("| stage | setting | forwards | FLOPs planned | FLOPs measured | machine | time planned | time measured | "
          "ratio | sent planned / measured (zstd) | returned planned / measured (zstd) |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---|---|")
    for r in rows:
        b = lambda e, m, z: f"{e:,} / {m:,} ({z:,}) = {e / m:.2f}" if m else f"{e:,}"  # noqa: E731
        print(f"| {r['stage']} | {r['setting']} | {r['forwards']} | {r['flops_est']:,} | {r['flops_measured']:,} | "
              f"{r['machine_gflops']:.1f} GFLOP/s, {r['machine_ms_per_forward']:.0f} ms | {r['time_est_s']:.2f} s | {r['time_measured_s']:.2f} s | {r['time_ratio']:.2f} | "
              f"{b(r['sent_est'], r.get('sent_measured', 0), r.get('sent_zstd', 0))} | "
              f"{b(r['returned_est'], r.get('returned_measured', 0), r.get('returned_zstd', 0))} |")


if __name__ == "__main__":
    main()
