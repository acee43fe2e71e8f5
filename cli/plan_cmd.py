"""`fv-remote plan`: what a remote stage would cost (FLOPs, memory, bytes, requests, time) before submitting it."""

from __future__ import annotations

import json
import math
from typing import Optional

import typer
from rich.table import Table

from fv_remote.cli.root import app
from fv_remote.cli.common import out
from fv_remote.models.loading import DEFAULT_MODEL

_DEFAULT_PROMPTS = {"extract": 100, "cma": 25}


def show_plan(stage: str, model: str, config: Optional[str], options, server, as_json: bool = False,
              strict: bool = False, assume_defaults: bool = False) -> None:
    """Print the plan table and the verdict of `stage` (the `--plan` of the stage commands calls this too)."""
    from fv_remote.plan import cost as P
    from fv_remote.plan.sizes import check_sizes, size_lines, size_report
    from fv_remote.stages import stage_plan

    loaded = P.load_config(model, config)
    sizes = size_report(model, config, loaded)
    check_sizes(sizes, assume_defaults)
    dims = P.dims_from_config(loaded)
    built, rebuild = stage_plan(stage, dims, options)
    est = P.estimate(built, dims, server, P.DTYPE_BYTES[options.dtype], rebuild)
    if as_json:
        out.print_json(json.dumps({"model": model, "dims": dims.as_dict(), "sizes": sizes.as_json(),
                                   "server": vars(server),
                                   "verdict": P.verdict(est, server), **est.as_json()}))
    else:
        for line in size_lines(sizes):
            out.print(line, soft_wrap=True, markup=False)
        settings = ", ".join(f"{k} {v}" for k, v in est.settings.items())
        table = Table("quantity", "estimate", title=f"{stage} on {model} ({dims.family}, {dims.n_layers} layers x "
                      f"{dims.n_heads} heads, d_model {dims.d_model}, {options.dtype}): {settings}")
        for name, value in P.rows(est, server):
            table.add_row(name, value)
        out.print(table)
        if est.note:
            out.print(f"note: {est.note}", soft_wrap=True)
        colour = "green" if est.fits else "yellow"
        out.print(f"[{colour}]verdict: {P.verdict(est, server)}[/]", soft_wrap=True)
    if strict and not est.fits:
        raise typer.Exit(1)


def server_options(tflops: float, trace_overhead: float, request_overhead: float, bandwidth_mb: float,
                   limit: float, max_result_mb: float, max_request_mb: float, memory_gb: float):
    from fv_remote.core.errors import UserError
    from fv_remote.plan.cost import Server

    for flag, value in (("--tflops", tflops), ("--trace-overhead", trace_overhead),
                        ("--request-overhead", request_overhead), ("--bandwidth", bandwidth_mb), ("--limit", limit),
                        ("--max-result-mb", max_result_mb), ("--max-request-mb", max_request_mb),
                        ("--memory-gb", memory_gb)):  # before int(value * 2**30): inf/nan would be a traceback
        if not (math.isfinite(value) and value >= 0) or (value == 0 and flag not in ("--trace-overhead",
                                                                                      "--request-overhead")):
            raise UserError(f"{flag} must be a positive number, got {value:g}")
    return Server(throughput=tflops * 1e12, trace_overhead_s=trace_overhead, request_overhead_s=request_overhead,
                  bandwidth=bandwidth_mb * 1e6, execution_limit_s=limit, max_result_bytes=int(max_result_mb * 2**20),
                  max_payload_bytes=int(max_request_mb * 2**20), memory_limit_bytes=int(memory_gb * 2**30)).check()


@app.command()
def plan(
    stage: str = typer.Option(..., "--stage", help="extract, cma, finetune, bank (build) or analogy"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="short name, folder or Hub repo id (its config "
                              "is read from the cache; no weights, no network)"),
    config: Optional[str] = typer.Option(None, "--config", help="a config.json (or a folder with one) to use "
                                         "instead of the cached config"),
    n_prompts: Optional[int] = typer.Option(None, help="extract / cma: prompts (default 100 / 25)"),
    n_shots: int = typer.Option(10, help="demonstrations per prompt (sets the prompt length)"),
    prompt_tokens: Optional[int] = typer.Option(None, help="tokens per prompt (default: 7 per shot + 5; zero-shot "
                                                "stages 5)"),
    batch_size: Optional[int] = typer.Option(None, help="prompts per forward (default: the stage's: 16 extract, "
                                             "32 finetune/bank, 48 analogy)"),
    positions: int = typer.Option(1, help="extract: positions read per prompt"),
    dtype: str = typer.Option("bfloat16", help="the hosted model's dtype (float32, bfloat16, float16)"),
    reduce: str = typer.Option("none", help="extract: none, float16 (`extract --remote --reduce float16`) or mean "
                               "(a what-if: one mean instead of every prompt's heads; extract cannot do that yet)"),
    max_copies: int = typer.Option(256, help="cma: last-token copies per forward at most (the CMA body's)"),
    steps: int = typer.Option(40, help="finetune / bank: optimiser steps (an upper bound)"),
    n_train: int = typer.Option(100, help="finetune / bank: training prompts per relation"),
    n_valid: int = typer.Option(50, help="finetune / bank: validation prompts per relation"),
    eval_every: int = typer.Option(5, help="finetune / bank: steps between validations"),
    layer: Optional[int] = typer.Option(None, help="finetune: the layer (default: the layer search); bank: the "
                                        "common layer (default L/3)"),
    relations: int = typer.Option(10, help="bank: relations trained in the request"),
    items: int = typer.Option(100, help="analogy: items"),
    bank_size: int = typer.Option(10, help="analogy: relations in the bank"),
    choices: int = typer.Option(4, help="analogy: choices per item"),
    methods: int = typer.Option(6, help="analogy: methods scored (all six of `analogy`)"),
    tflops: Optional[float] = typer.Option(None, help="achieved TFLOP/s on the server [default: 100; with --local: "
                                           "measured now on a CPU, 100 on a GPU]"),
    trace_overhead: Optional[float] = typer.Option(None, help="seconds per forward on top of its FLOPs [default: "
                                                   "0.05 on NDIF, 0.005 with --local]"),
    request_overhead: float = typer.Option(10.0, help="seconds per request (queue, set-up)"),
    bandwidth: float = typer.Option(50.0, help="MB/s between client and server"),
    limit: float = typer.Option(3600.0, help="the server's execution limit per request, seconds"),
    max_result_mb: float = typer.Option(4096.0, help="largest result a request may bring back, MiB"),
    max_request_mb: float = typer.Option(512.0, help="largest request body, MiB"),
    memory_gb: float = typer.Option(40.0, help="activation memory a request may use on the server, GiB"),
    as_json: bool = typer.Option(False, "--json", help="print the estimate as JSON"),
    strict: bool = typer.Option(False, "--strict", help="exit 1 when the job does not fit as one request"),
    assume_defaults: bool = typer.Option(False, "--assume-defaults", help="plan even when the config lacks a size "
                                         "(hidden_size, heads, layers, vocab_size, intermediate_size), with "
                                         "transformers' default for it; each assumed value is printed"),
    local: bool = typer.Option(False, "--local", help="on your own device(s) instead of NDIF: weights + activations "
                               "per device, and the time (see --device, --memory, --devices)"),
    device: str = typer.Option("cuda", "--device", help="with --local: cpu, cuda, cuda:N, mps"),
    memory: Optional[str] = typer.Option(None, "--memory", help="with --local: memory per device, e.g. 80GiB "
                                         "[default: this machine's free memory on --device]"),
    devices: int = typer.Option(1, "--devices", help="with --local: devices the model is spread over (device_map "
                                "auto)"),
) -> None:
    """Estimate a remote stage's cost from the model's config and the stage's options, and whether it fits NDIF's
    limits as one request (if not: how to split it). Nothing is downloaded or run."""
    from fv_remote.core.errors import UserError
    from fv_remote.plan.cost import StageOptions
    from fv_remote.stages import COSTED

    stage = {"bank-build": "bank", "bank build": "bank"}.get(stage, stage)
    if config and model == DEFAULT_MODEL:  # not the default model's name on another model's sizes
        from fv_remote.plan.sizes import config_name

        model = config_name(config)
    if stage not in COSTED:
        raise UserError(f"unknown --stage {stage!r}; use one of {', '.join(COSTED)}")
    options = StageOptions(n_prompts=_DEFAULT_PROMPTS.get(stage, 25) if n_prompts is None else n_prompts,
                           n_shots=n_shots,
                           prompt_tokens=prompt_tokens, batch_size=batch_size, positions=positions, dtype=dtype,
                           reduce=reduce, max_copies=max_copies, steps=steps, n_train=n_train, n_valid=n_valid,
                           eval_every=eval_every, layer=layer, relations=relations, items=items, bank_size=bank_size,
                           choices=choices, methods=methods)
    if local:
        show_local(stage, model, config, options, device, memory, devices, tflops, trace_overhead, as_json, strict)
        return
    server = server_options(100.0 if tflops is None else tflops, 0.05 if trace_overhead is None else trace_overhead,
                            request_overhead, bandwidth, limit, max_result_mb, max_request_mb, memory_gb)
    show_plan(stage, model, config, options, server, as_json, strict, assume_defaults)


def show_local(stage: str, model: str, config: Optional[str], options, device: str, memory: Optional[str],
               devices: int, tflops: Optional[float], trace_overhead: Optional[float], as_json: bool,
               strict: bool) -> None:
    """`plan --local`: will the stage fit on these devices, and how long (fv_remote.plan.local)."""
    from fv_remote.core.errors import UserError
    from fv_remote.models.placement import Placement, available_memory, parse_memory
    from fv_remote.plan import cost as P
    from fv_remote.plan import local as LP
    from fv_remote.stages import stage_plan

    device = Placement(device=device).device or "cuda"
    if devices < 1:
        raise UserError(f"--devices must be at least 1, got {devices}")
    if memory is None:
        have = available_memory(Placement(device=device).resolved_device())
        if have is None:
            raise UserError(f"give --memory: the free memory of {device} is not known here")
        per_device = have
    else:
        per_device = parse_memory(memory)
    dims = P.dims_from_config(P.load_config(model, config))
    built, _ = stage_plan(stage, dims, options)
    est = LP.local_estimate(built, dims, options.dtype, device, per_device, devices, tflops, trace_overhead)
    if as_json:
        out.print_json(json.dumps({"model": model, "stage": stage, "dims": dims.as_dict(), **est.as_json(),
                                   "verdict": LP.verdict(est)}))
    else:
        table = Table("quantity", "estimate", title=f"{stage} on {model} locally ({dims.n_layers} layers, "
                      f"{dims.params / 1e9:.2f} B parameters, {options.dtype}, {device})")
        for name, value in LP.rows(est):
            table.add_row(name, value)
        out.print(table)
        out.print(f"[{'green' if est.fits else 'yellow'}]verdict: {LP.verdict(est)}[/]", soft_wrap=True)
    if strict and not est.fits:
        raise typer.Exit(1)


PLAN_HELP = ("print what this stage would cost on NDIF (FLOPs, memory, bytes, requests, time; `fv-remote plan`) "
             "and exit: nothing is loaded or run")


def plan_instead(stage: str, model: str, **options) -> None:
    """The `--plan` of a stage command: its own options, the server's defaults, the model's cached config."""
    from fv_remote.plan.cost import Server, StageOptions

    show_plan(stage, model, None, StageOptions(**options), Server())
