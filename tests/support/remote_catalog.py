"""Every remote stage, once, through a loopback NDIF server on the tiny test model: what each request sends and what
comes back (the names of the returned values and their sizes).

The loopback server, like NDIF, returns every variable of the session body whose object was marked saved (matched
by object id). A stage should send back exactly the values its client code reads afterwards; `STAGES` lists, per
stage, that set (`expected`), so `tests/test_remote_results.py` fails when anything else (a KV cache, the last
batch's logits, a loop variable) comes back, and `benchmarks/remote_sizes.py` prints the sizes table.

`Harness` owns the set-up: the tiny llama (seed 3) with real weights on the server, a weightless client copy built
from a fake Hub cache, a toy relation task, random head means/AIE, an FV and a small bank.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from conftest import _tiny_tokenizer  # noqa: E402
from .loopback_ndif import LoopbackNDIF  # noqa: E402
from .remote_fixtures import hosted_tiny_model, serve_copy, write_hub_cache  # noqa: E402
from fv_remote.execution import resolve

REPO = "test-org/tiny-llama-catalog"
WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
PAIRS = [(a, b) for a in WORDS for b in WORDS if a != b][:60]
PROMPTS = ["Q: hot\nA:", "Q: the quick brown\nA:", "Q: up\nA: down\n\nQ: big\nA:"]


def returned_values(job: Any) -> dict[str, Any]:
    """The values a finished loopback job sent back, by name (as the client receives them)."""
    import zstandard

    data = zstandard.ZstdDecompressor().decompress(job.result) if job.compress else job.result
    return torch.load(io.BytesIO(data), weights_only=False)


def value_bytes(value: Any) -> int:
    """Bytes of one returned value on its own (uncompressed torch.save)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return len(buffer.getvalue())


def describe(value: Any, depth: int = 0) -> str:
    """A short type/shape summary of a returned value (for leak reports)."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}:{str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (list, tuple)) and depth < 2:
        inner = ", ".join(describe(v, depth + 1) for v in value[:2])
        return f"{type(value).__name__}[{len(value)}]({inner}{', ...' if len(value) > 2 else ''})"
    if isinstance(value, dict) and depth < 2:
        return f"dict[{len(value)}]"
    return type(value).__name__


@dataclass
class Harness:
    """Server, models and inputs shared by all stages. Use as a context manager (starts/stops the server)."""

    workdir: Path
    local: Any = None
    remote: Any = None
    server: LoopbackNDIF | None = None
    extra: dict = field(default_factory=dict)
    _env: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __enter__(self) -> "Harness":
        from fv_remote import execution as R

        tok = _tiny_tokenizer()
        self.tokenizer = tok
        self.local = hosted_tiny_model(tok, REPO)
        self.hub_cache = self._hub_cache(tok)
        self.server = self._env.enter_context(serve_copy(self.local, tok, REPO, hang_s=1.0))
        self._setenv("NDIF_HOST", self.server.host)
        self._setenv("NDIF_API_KEY", None)
        self.remote = R.load_remote_model(REPO, cache_dir=self.hub_cache)
        self._inputs()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._env.close()

    def _setenv(self, name: str, value: str | None) -> None:
        old = os.environ.get(name)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        self._env.callback(lambda: os.environ.__setitem__(name, old) if old is not None
                           else os.environ.pop(name, None))

    def _hub_cache(self, tok: Any) -> str:
        return write_hub_cache(self.workdir / "hf-cache", REPO, self.local.hf, tok)

    def _inputs(self) -> None:
        from fv_remote.relational.bank import RelationBank
        from fv_remote.data import MCAnalogy, RelationTask
        from fv_remote.data.tasks import prepare_task
        from fv_remote.fv.vectors import FunctionVector, build_function_vector

        ad = self.local.adapter
        self.task = RelationTask("toy", PAIRS)
        self.tasks = [self.task, RelationTask("rev", [(b, a) for a, b in PAIRS])]
        self.prepared = prepare_task(self.tokenizer, self.task, seed=0, min_pairs=4)
        gen = torch.Generator().manual_seed(1)
        self.means = torch.randn(ad.n_layers, ad.n_heads, ad.head_dim, generator=gen)
        self.aie = torch.rand(ad.n_layers, ad.n_heads, generator=gen).numpy()
        fv = build_function_vector(self.local, "toy", self.means, self.aie, k=3, layer=1)
        fv.vector, fv.head_means = fv.vector * 4, fv.head_means * 4
        self.fv = fv
        gen = torch.Generator().manual_seed(5)
        self.bank = RelationBank(self.local.model_id)
        for name, layer in (("toy", 1), ("rev", 1), ("other", 2)):
            self.bank.add_vector(FunctionVector(vector=3 * torch.randn(ad.d_model, generator=gen),
                                                model=self.local.model_id, task=name, layer=layer, kind="ffv"))
        self.items = [MCAnalogy(("hot", "cold"), [("up", "down"), ("big", "dog"), ("the", "fox")], 0, "toy"),
                      MCAnalogy(("big", "small"), [("quick", "lazy"), ("up", "down")], 1, "toy"),
                      MCAnalogy(("the", "quick"), [("brown", "fox"), ("lazy", "dog"), ("over", "the")], 2, "rev")]

    def store(self, name: str) -> Any:
        from fv_remote.store.activations import ActivationStore

        return ActivationStore(str(self.workdir / f"{name}.zarr"))


@dataclass
class Stage:
    name: str  # as in the sizes table
    run: Callable[[Harness, Any], Any]  # (harness, remote) -> the stage's result; remote=False runs it locally
    expected: frozenset[str]  # names of the values every request of the stage sends back
    n_requests: int = 1
    setting: str = ""  # what the stage does, for the table


def _extract(h: Harness, remote: Any) -> Any:
    from fv_remote.fv.extract import extract

    store = h.store(f"extract-{bool(remote)}-{len(h.extra)}")
    h.extra[store.url] = True
    out = extract((h.remote if remote else h.local).using(resolve(remote)), h.task, store, n_prompts=6, n_shots=2, batch_size=4)
    ds = store.open("toy")
    return out.n_new, ds["head_out"].values, ds["top1_token"].values, ds["answer_prob"].values


def _cma(h: Harness, remote: Any) -> Any:
    from fv_remote.fv.cma import run_cma

    store = h.store(f"cma-{bool(remote)}-{len(h.extra)}")
    h.extra[store.url] = True
    return run_cma((h.remote if remote else h.local).using(resolve(remote)), h.prepared, store, h.means, n_prompts=2, n_shots=2).aie.values


def _fit(h: Harness, remote: Any) -> Any:
    from fv_remote.fv.evaluate import fit_function_vector

    fv, sweep = fit_function_vector((h.remote if remote else h.local).using(resolve(remote)), h.prepared, h.means, h.aie, k=4, n_prompts=10,
                                    batch_size=5)
    return fv.vector, fv.layer, sweep


def _fit_no_sweep(h: Harness, remote: Any) -> Any:
    from fv_remote.fv.evaluate import fit_function_vector

    fv, _ = fit_function_vector((h.remote if remote else h.local).using(resolve(remote)), h.prepared, h.means, h.aie, k=4, layer=1)
    return fv.vector


def _evaluate(h: Harness, remote: Any) -> Any:
    from fv_remote.fv.evaluate import evaluate_task

    return evaluate_task((h.remote if remote else h.local).using(resolve(remote)), h.prepared, h.fv, n_test=8, n_shots=2, batch_size=4)


def _evaluate_sweep(h: Harness, remote: Any) -> Any:
    from fv_remote.fv.evaluate import evaluate_and_sweep

    return evaluate_and_sweep((h.remote if remote else h.local).using(resolve(remote)), h.prepared, h.fv, n_test=8, n_shots=2, batch_size=4,
                              sweep_batch_size=8)


def _steer(h: Harness, remote: Any) -> Any:
    from fv_remote.fv.steering import Condition, Steer, score_conditions

    prompts = h.prepared.prompts("test", 12, kind="zero_shot", n_shots=0)
    texts, ids = [p.text for p in prompts], h.prepared.ids(prompts)
    return score_conditions((h.remote if remote else h.local).using(resolve(remote)),
                            [Condition(texts, None, ids, 5), Condition(texts, Steer(h.fv), ids, 5)])


def _steer_prompt(h: Harness, remote: Any) -> Any:
    from fv_remote.fv.steering import Condition, Steer, top_tokens_conditions

    return top_tokens_conditions((h.remote if remote else h.local).using(resolve(remote)),
                                 [Condition(PROMPTS[:1]), Condition(PROMPTS[:1], Steer(h.fv))], 5)


def _generate(h: Harness, remote: Any) -> Any:
    from fv_remote.fv.steering import Steer, generate_many

    return generate_many((h.remote if remote else h.local).using(resolve(remote)), [(PROMPTS[0], None), (PROMPTS[0], Steer(h.fv))],
                         max_new_tokens=5)


SETTINGS_KW = dict(steps=8, lr=0.2, batch_size=4, eval_every=2, patience=4, l2=0.01, allow_unchanged=True)


def _finetune(h: Harness, remote: Any) -> Any:
    from fv_remote.relational.ffv import FinetuneSettings, examples, finetune

    train, valid = examples(h.prepared, "train", 10), examples(h.prepared, "valid", 6)
    v0 = 0.5 * torch.randn(h.local.adapter.d_model, generator=torch.Generator().manual_seed(2))
    out = finetune((h.remote if remote else h.local).using(resolve(remote)), train, valid, v0, 1, FinetuneSettings(**SETTINGS_KW),
                   task="toy")
    return out.ffv.vector, out.best_step


def _bank(h: Harness, remote: Any) -> Any:
    from fv_remote.relational.bank_build import build_bank
    from fv_remote.relational.ffv import FinetuneSettings

    path = h.workdir / f"bank-{bool(remote)}-{len(h.extra)}.safetensors"
    h.extra[str(path)] = True
    return build_bank((h.remote if remote else h.local).using(resolve(remote)), h.tasks, path, layer=1, n_train=8, n_valid=6,
                      settings=FinetuneSettings(**SETTINGS_KW), resume=False).vectors


def _analogy(h: Harness, remote: Any) -> Any:
    from fv_remote.relational.analogy import AnalogySettings, run_analogies

    out = run_analogies((h.remote if remote else h.local).using(resolve(remote)), h.bank, h.items, AnalogySettings(batch_size=4, n_boot=20))
    return out.weights, out.accuracy()


def _decode(h: Harness, remote: Any) -> Any:
    from fv_remote.relational.decode import decode_many

    named = [(e.name, e.vector) for e in h.bank.entries]
    return [(d.ranks, d.forms) for d in decode_many((h.remote if remote else h.local).using(resolve(remote)), named,
                                                    ["hot", "cold", "fox"], 8)]


def _run(h: Harness, remote: Any) -> Any:
    from fv_remote.fv import pipeline
    from fv_remote.fv.extract import mean_heads_tensor
    from fv_remote.fv.pipeline import PipelineSettings, run_task

    settings = PipelineSettings(n_prompts=4, n_cma_prompts=2, n_shots=2, k=3, n_test=6)
    name = f"run-{bool(remote)}-{len(h.extra)}"
    h.extra[name] = True
    real = pipeline.mean_heads_tensor
    pipeline.mean_heads_tensor = functools.partial(mean_heads_tensor, only_correct=False)  # a random model is wrong
    try:
        out = run_task((h.remote if remote else h.local).using(resolve(remote)), h.task, h.store(name), h.workdir / name, settings)
    finally:
        pipeline.mean_heads_tensor = real
    return out.scores, out.fv.vector


# The values each stage's client code reads back, per request; nothing else may return.
EXTRACT = frozenset({"outs"})
CMA = frozenset({"results"})
STEER = frozenset({"outs"})
STAGES = [
    Stage("extract", _extract, EXTRACT, setting="6 prompts, 2-shot, 2 batches of 4"),
    Stage("cma", _cma, CMA, setting="fast method, 2 prompts, 12 heads"),
    Stage("fit", _fit, frozenset({"vecs", "tops"}), setting="k=4 projection + 3-layer sweep x 10 prompts"),
    Stage("fit --layer (no sweep)", _fit_no_sweep, frozenset({"vecs"}), setting="k=4 projection"),
    Stage("evaluate", _evaluate, STEER, setting="5 conditions x 8 prompts, 2-shot"),
    Stage("evaluate --sweep", _evaluate_sweep, STEER, setting="5 conditions + 3 layers"),
    Stage("steer", _steer, STEER, setting="--task: 2 conditions x 12 prompts, top-1 ids"),
    Stage("steer --prompt", _steer_prompt, STEER, setting="1 prompt, with/without, top 5 next tokens"),
    Stage("generate", _generate, STEER, setting="1 prompt, with/without, 5 tokens"),
    Stage("finetune", _finetune, frozenset({"results"}), setting="8 steps x 4 prompts, 4 validations"),
    Stage("bank build", _bank, frozenset({"results"}), setting="2 relations x 8 steps"),
    Stage("analogy", _analogy, frozenset({"outs", "weights"}), setting="mc/first, 3 items, 5 methods, 3 relations"),
    Stage("decode", _decode, frozenset({"values", "ids", "where"}), setting="3 vectors, top 8, 3 words"),
    Stage("run", _run, frozenset(), n_requests=4, setting="extract, cma, fit + sweep, evaluate: 4 requests"),
]
# `run` is four requests: extract, cma, fit (with its sweep) and evaluate, in that order.
RUN_EXPECTED = [EXTRACT, CMA, frozenset({"vecs", "tops"}), STEER]


def expected_per_request(stage: Stage) -> list[frozenset[str]]:
    return RUN_EXPECTED if stage.name == "run" else [stage.expected] * stage.n_requests


@dataclass
class Measured:
    stage: Stage
    payload_bytes: int
    result_bytes: int
    names: list[set[str]]  # per request
    values: list[dict[str, tuple[str, int]]]  # per request: name -> (summary, bytes)
    left: list[dict[str, str]]  # per request: variables the body left holding objects (name -> type)
    result: Any = None


def measure(h: Harness, stage: Stage) -> Measured:
    """Run `stage` remotely once; its requests' sizes and returned values."""
    h.server.reset()
    result = stage.run(h, True)
    jobs = list(h.server.jobs)
    for job in jobs:
        if job.status != "COMPLETED":
            raise RuntimeError(f"{stage.name}: job {job.status}: {job.error or h.server.log[-1:]}")
    returned = [returned_values(job) for job in jobs]
    return Measured(stage, sum(j.payload_bytes for j in jobs), sum(j.result_bytes for j in jobs),
                    [set(r) for r in returned],
                    [{k: (describe(v), value_bytes(v)) for k, v in r.items()} for r in returned],
                    [dict(job.left_locals) for job in jobs], result)


def harness(workdir: str | Path | None = None) -> Harness:
    return Harness(Path(workdir or tempfile.mkdtemp(prefix="fv-remote-catalog-")))
