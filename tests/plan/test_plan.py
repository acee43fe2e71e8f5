"""The cost planner: FLOPs equal torch's own count of the same forwards (every family, and whole stage sessions), bytes
match what the stages return, the limits and the proposed split, and `fv-remote plan` on configs from fixtures."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY_FAMILIES, make_tiny_model, run_cli
from fv_remote.plan import cost as P
from fv_remote.stages import stage_plan
from fv_remote.stages import COSTED
from fv_remote.relational.ffv import finetune_cost
from fv_remote.relational.analogy import MIXING_METHODS
from fv_remote.fv.extract import extract_cost
from fv_remote.fv.cma import cma_groups
from fv_remote.fv.cma import cma_cost
from fv_remote.core.errors import UserError

CONFIGS = Path(__file__).parents[1] / "fixtures" / "configs"
LLAMA70 = str(CONFIGS / "Llama-3.1-70B.json")


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def countable(model):
    """Eager attention and eager experts: every product is a matmul torch's counter sees (the default SDPA and
    grouped-mm kernels compute the same products, uncounted on CPU)."""
    model.hf.set_attn_implementation("eager")
    model.hf.config._experts_implementation = "eager"
    return model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_forward_flops_are_torchs_count_for_every_family(family, tiny_tokenizer):
    model = countable(make_tiny_model(family, tiny_tokenizer))
    dims = P.dims_from_config(model.hf.config)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = counted(lambda: model.hf(input_ids=ids))
        last = counted(lambda: model.hf(input_ids=ids, logits_to_keep=1)) if family != "gptj" else None
    assert full == sum(P.Trace(2, 5, 5, 5).flops(dims).values())
    if last is not None:
        assert last == sum(P.Trace(2, 5, 5, 1).flops(dims).values())


def test_params_of_the_fixture_configs_are_the_published_counts():
    # Meta's and Mistral's model cards: 70,553,706,496 and 46,702,792,704 parameters.
    assert P.dims_from_config(P.load_config("x", LLAMA70)).params == 70_553_706_496
    mixtral = P.dims_from_config(P.load_config("x", str(CONFIGS / "Mixtral-8x7B-v0.1.json")))
    assert mixtral.params == 46_702_792_704
    assert (mixtral.n_experts, mixtral.top_k, len(mixtral.moe)) == (8, 2, 32)


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return countable(make_tiny_model("llama", tiny_tokenizer))


PROMPTS = ["Q: hot\nA: cold\n\nQ: up\nA:", "Q: big\nA: small\n\nQ: the quick brown\nA:", "Q: up\nA:"]


def lengths(model, texts):
    return [int(model.tokenizer(t, return_tensors="pt").input_ids.shape[1]) for t in texts]


def saved_size(value) -> int:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return len(buffer.getvalue())


def test_cma_session_flops(tiny_llama):
    from fv_remote.fv.cma import cma_fast_session

    ad = tiny_llama.adapter
    means = torch.randn(ad.n_layers, ad.n_heads, ad.head_dim, generator=torch.Generator().manual_seed(1))
    jobs = [(t, 5) for t in PROMPTS]
    dims = P.dims_from_config(tiny_llama.hf.config)
    for max_copies in (1024, 5):  # one group of all 12 heads; three groups (5, 5, 2) starting at layers 0, 1, 2
        plan = cma_cost(dims, 3, lengths(tiny_llama, PROMPTS), nbytes=4, max_copies=max_copies)
        got = {}
        flops = counted(lambda: got.setdefault("r", cma_fast_session(tiny_llama, jobs, means, max_copies=max_copies)))
        assert flops == plan.flops(dims)["total"]
        assert len(cma_groups(dims, max_copies)) == (1 if max_copies == 1024 else 3)
        # bytes: a few dozen floats here, all container overhead; measured on smollm2-135m in RESULTS.md


def test_extract_flops_and_returned_bytes(tiny_llama):
    from fv_remote.fv.extract import trace_heads_batches

    batches = [(PROMPTS[:2], [5, 6]), (PROMPTS[2:], [7])]
    dims = P.dims_from_config(tiny_llama.hf.config)
    plan = extract_cost(dims, 3, lengths(tiny_llama, PROMPTS), batch_size=2, n_positions=2, nbytes=4)
    outs = {}
    flops = counted(lambda: outs.setdefault("o", trace_heads_batches(tiny_llama, batches, (-2, -1))))
    assert flops == plan.flops(dims)["total"]
    assert outs["o"][0]["heads"].shape == (2, 2, 3, 4, 16)
    assert abs(plan.returned_bytes - saved_size({"outs": outs["o"]})) <= 0.1 * saved_size({"outs": outs["o"]})


def test_finetune_session_flops_forward_and_backward(tiny_llama):
    from fv_remote.relational.ffv import Examples, FinetuneSettings
    from fv_remote.relational.ffv import finetune

    texts = ["Q: hot\nA:", "Q: up\nA:", "Q: big\nA:", "Q: fox\nA:"]  # the same length: padding is known
    assert len(set(lengths(tiny_llama, texts))) == 1
    t = lengths(tiny_llama, texts)[0]
    train = Examples(texts, torch.tensor([3, 4, 5, 6]))
    valid = Examples(texts[:2], torch.tensor([3, 4]))
    s = FinetuneSettings(steps=4, batch_size=2, eval_every=2, patience=10)
    dims = P.dims_from_config(tiny_llama.hf.config)
    plan = finetune_cost(dims, 4, 2, t, s.steps, s.batch_size, s.eval_every, layer=1, nbytes=4)
    v0 = torch.randn(dims.d_model, generator=torch.Generator().manual_seed(0))
    flops = counted(lambda: finetune(tiny_llama, train, valid, v0, 1, s))
    assert flops == plan.flops(dims)["total"]
    assert plan.flops(dims)["backward"] > 0


def test_split_fits_and_covers_every_prompt():
    dims = P.dims_from_config(P.load_config("x", str(CONFIGS / "Llama-3.1-405B.json")))
    plan, rebuild = stage_plan("cma", dims, P.StageOptions(n_prompts=100))
    server = P.Server()
    est = P.estimate(plan, dims, server, 2, rebuild)
    assert not est.fits and any("execution" in w for w in est.warnings)
    per = est.split["prompts_per_request"]
    assert 1 <= per < 100 and est.split["requests"] * per >= 100
    part = rebuild(per)
    assert P.execution_seconds(part, dims, server) <= P.SAFETY * server.execution_limit_s
    assert P.execution_seconds(rebuild(per + 1), dims, server) > P.SAFETY * server.execution_limit_s \
        or rebuild(per + 1).sent_bytes > server.max_payload_bytes
    assert est.requests == est.split["requests"]


def test_extract_reduction_what_if_shrinks_the_result():
    dims = P.dims_from_config(P.load_config("x", LLAMA70))
    full = extract_cost(dims, 100, 75, nbytes=4)
    half = extract_cost(dims, 100, 75, nbytes=4, reduce="float16")
    mean = extract_cost(dims, 100, 75, nbytes=4, reduce="mean")
    per_prompt = 80 * 64 * 128 * 4  # the 2.6 MB per prompt and position
    assert abs(full.returned_bytes - 100 * per_prompt) < 0.01 * full.returned_bytes
    assert abs(half.returned_bytes - full.returned_bytes / 2) < 0.01 * full.returned_bytes
    assert mean.returned_bytes < 1.1 * per_prompt


@pytest.mark.parametrize("stage", ["extract", "cma", "finetune", "bank", "analogy"])
def test_cli_plan_on_the_llama_70b_fixture(stage):
    proc = run_cli("plan", "--model", "meta-llama/Llama-3.1-70B", "--config", LLAMA70, "--stage", stage,
                   "--n-prompts", "25")
    assert proc.returncode == 0, proc.stderr
    for needle in ("FLOPs (matmul)", "peak activation memory", "bytes sent", "bytes returned", "requests",
                   "wall time", "verdict: fits", "80 layers x 64 heads"):
        assert needle in proc.stdout, (needle, proc.stdout)


def test_cli_plan_json_split_and_strict():
    proc = run_cli("plan", "-m", "meta-llama/Llama-3.1-70B", "--config", LLAMA70, "--stage", "cma", "--n-prompts",
                   "2000", "--json", "--strict")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["fits"] is False and data["split"]["prompts_per_request"] < 2000
    assert "Split:" in data["verdict"] and data["dims"]["n_layers"] == 80
    assert data["flops"]["total"] == sum(v for k, v in data["flops"].items() if k != "total")


@pytest.mark.parametrize("args, needle", [
    (["--stage", "train"], "unknown --stage"),
    (["--stage", "cma", "--config", "/nonexistent/config.json"], "no such config file"),
    (["--stage", "cma", "--n-prompts", "0"], "--n-prompts must be at least 1"),
    (["--stage", "extract", "--dtype", "int3"], "unknown --dtype"),
    (["--stage", "cma", "--tflops", "0"], "--tflops must be a positive number"),
    (["--stage", "cma", "--model", "nobody/no-such-model"], "pass --config"),
])
def test_cli_plan_user_errors_are_one_line(args, needle):
    from conftest import assert_one_line_error

    assert_one_line_error(run_cli("plan", *args), needle)


def test_plan_needs_no_weights_for_every_supported_family(tiny_tokenizer, tmp_path):
    """From a config file alone, every family plans every stage."""
    from conftest import tiny_config

    for family in TINY_FAMILIES:
        config = tiny_config(family, 300)
        config.save_pretrained(tmp_path / family)
        dims = P.dims_from_config(P.load_config("x", str(tmp_path / family)))
        for stage in COSTED:
            plan, _ = stage_plan(stage, dims, P.StageOptions(n_prompts=3, n_train=4, n_valid=2, steps=2,
                                                                relations=2, items=2, bank_size=2, layer=1))
            assert plan.flops(dims)["total"] > 0


def test_unsupported_config_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(UserError, match="unsupported architecture"):
        P.dims_from_config(P.load_config("x", str(tmp_path)))


def test_stage_plan_option_runs_nothing(tmp_path):
    store = tmp_path / "s.zarr"
    proc = run_cli("extract", "--task", "present-past", "--store", str(store), "--n-prompts", "40", "--plan")
    assert proc.returncode == 0, proc.stderr
    assert "extract on smollm2-135m" in proc.stdout and "n_prompts 40" in proc.stdout and "verdict:" in proc.stdout
    assert not store.exists()
    proc = run_cli("bank", "build", "--tasks", "present-past,antonym", "--layer", "9", "--plan")
    assert proc.returncode == 0, proc.stderr
    assert "relations 2" in proc.stdout and "layer 9" in proc.stdout


# -- extract --remote --reduce float16: through the loopback NDIF server ------------------------------------------

from support.remote_fixtures import hosted_model_fixtures, point_client_at  # noqa: E402
from fv_remote.execution import NDIF

REDUCE_REPO = "test-org/tiny-llama-reduce"
local, hub_cache, server, remote_model = hosted_model_fixtures(REDUCE_REPO)


def test_extract_remote_float16_halves_the_heads_and_is_recorded(local, remote_model, server, hub_cache,
                                                                  monkeypatch, tmp_path):
    from fv_remote.data import RelationTask
    from fv_remote.fv.extract import extract
    from fv_remote.store.activations import ActivationStore

    words = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
    task = RelationTask("toy", [(a, b) for a in words for b in words if a != b][:60])
    want = ActivationStore(str(tmp_path / "local.zarr"))
    extract(local, task, want, n_prompts=6, n_shots=2, batch_size=3)
    sizes = {}
    for reduce in ("none", "float16"):
        ndif = point_client_at(server, monkeypatch, hub_cache)
        got = ActivationStore(str(tmp_path / f"{reduce}.zarr"))
        extract(remote_model.using(NDIF()), task, got, n_prompts=6, n_shots=2, batch_size=3, reduce=reduce)
        assert ndif.n_requests == 1 and ndif.jobs[0].status == "COMPLETED"
        sizes[reduce] = ndif.jobs[0].result_bytes
    a = want.open("toy")["head_out"].values
    b = ActivationStore(str(tmp_path / "float16.zarr")).open("toy")
    assert np.array_equal(b["head_out"].values, a.astype(np.float16).astype(np.float32))  # rounded, nothing else
    assert ActivationStore(str(tmp_path / "float16.zarr")).attrs("toy")["remote_reduce"] == "float16"
    assert sizes["float16"] < sizes["none"]
    with pytest.raises(UserError, match="with --remote"):
        extract(local, task, want, n_prompts=6, n_shots=2, reduce="float16")
    with pytest.raises(UserError, match="identity|settings|differ|incompatible|different"):
        extract(remote_model.using(NDIF()), task, ActivationStore(str(tmp_path / "none.zarr")), n_prompts=9, n_shots=2,
                batch_size=3, reduce="float16")


def test_analogy_plan_knows_the_stage_methods():
    """The planner counts analogy's methods in their order (which ones mix the bank's vectors): a new method must be
    added there too."""
    from fv_remote.relational.analogy import METHODS

    assert P.N_ANALOGY_METHODS == len(METHODS) and MIXING_METHODS <= set(METHODS)


def test_planned_requests_are_what_the_loopback_server_receives(local, remote_model, server, hub_cache, monkeypatch):
    """Each stage's request, uncompressed as the server unpacks it, is the planned size within 10%: its body's code
    (`body_bytes`, read from the stage's code), the model's envoy tree and the data (smollm2-135m's in RESULTS.md)."""
    import zstandard

    from fv_remote.fv.cma import cma_fast_session
    from fv_remote.fv.extract import trace_heads_batches
    from fv_remote.relational.ffv import Examples, FinetuneSettings
    from fv_remote.relational.ffv import finetune

    dims = P.dims_from_config(local.hf.config)
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(dims.n_layers, dims.n_heads, dims.head_dim, generator=gen)
    texts = ["Q: hot\nA:", "Q: up\nA:", "Q: big\nA:", "Q: fox\nA:"]  # one length: the padding is known
    train, valid = Examples(texts, torch.tensor([3, 4, 5, 6])), Examples(texts[:2], torch.tensor([3, 4]))
    s = FinetuneSettings(steps=4, batch_size=2, eval_every=2, patience=10)
    stages = {
        "extract": (extract_cost(dims, 3, lengths(local, PROMPTS), batch_size=2, nbytes=4),
                    lambda: trace_heads_batches(remote_model, [(PROMPTS[:2], [5, 6]), (PROMPTS[2:], [7])])),
        "cma": (cma_cost(dims, 3, lengths(local, PROMPTS), nbytes=4),
                lambda: cma_fast_session(remote_model.using(NDIF()), [(t, 5) for t in PROMPTS], means)),
        "finetune": (finetune_cost(dims, 4, 2, lengths(local, texts)[0], s.steps, s.batch_size, s.eval_every,
                                     layer=1, nbytes=4),
                     lambda: finetune(remote_model.using(NDIF()), train, valid, torch.randn(dims.d_model, generator=gen), 1,
                                             s))}
    for stage, (plan, run) in stages.items():
        ndif = point_client_at(server, monkeypatch, hub_cache)
        run()
        (job,) = ndif.jobs
        sent = len(zstandard.ZstdDecompressor().decompress(job.blob)) if job.compress else len(job.blob)
        assert abs(plan.sent_bytes - sent) <= 0.1 * sent, (stage, plan.sent_bytes, sent)
