"""`fv-remote plan --local`: will a stage fit on my own device(s), and how long will it take (issue 24).

From the config alone, like the remote planner (`fv_remote.plan.cost`: the same `Stage.cost` forwards, FLOPs and
activation memory), plus what a local run adds: the weights themselves in the chosen dtype (params x bytes),
spread over `n_devices` by accelerate's `device_map="auto"` (block by block, so evenly to within a block), and the
time as FLOPs over the device's achieved throughput plus a fixed cost per forward (no request overhead, nothing
sent). On the CPU the throughput is measured now (a matmul in the dtype, under the machine's present load); on a
GPU it is `--tflops` (default 100 TFLOP/s achieved), to be replaced by benchmarks/gpu.sh's measured number.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from fv_remote.plan.cost import DTYPE_BYTES, Dims, Plan

GiB = 2**30
LOCAL_TRACE_OVERHEAD_S = 0.005  # nnsight's fixed cost per trace on a CPU (NNSIGHT.md: 2-5 ms)
GPU_TFLOPS = 100.0


@dataclass
class LocalEstimate:
    device: str
    dtype: str
    n_devices: int
    memory_per_device: int
    weights: int
    weights_per_device: int
    activations: int
    per_device: int
    fits: bool
    devices_needed: int | None
    offload: int
    flops: int
    forwards: int
    throughput: float
    throughput_source: str
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def measured_throughput(dtype: str, d_model: int = 1024, d_ff: int = 4096, tokens: int = 512, reps: int = 3) -> float:
    """This CPU's FLOP/s in `dtype` now, on the work a forward is made of: an MLP-shaped step at the model's own
    widths ([tokens, d_model] -> d_ff -> d_model, with its activation function and a residual add; best of `reps`).

    A square [1024, 1024] matmul alone overstated bf16 on a CPU with AMX 4x (issue 24: the estimate was 0.23 of the
    measured stage): at a small model's widths the elementwise work and the casts around bf16 matmuls count too."""
    import torch

    kind = getattr(torch, dtype)
    d_model, d_ff = max(d_model, 16), max(d_ff, 16)
    x = torch.randn(tokens, d_model).to(kind)
    up, down = (torch.randn(d_model, d_ff) / d_model**0.5).to(kind), (torch.randn(d_ff, d_model) / d_ff**0.5).to(kind)

    def step():
        return x + torch.nn.functional.silu(x @ up) @ down

    step()
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return 4 * tokens * d_model * d_ff / best


def local_estimate(plan: Plan, dims: Dims, dtype: str, device: str, memory: int, n_devices: int = 1,
                   tflops: float | None = None, trace_overhead: float | None = None) -> LocalEstimate:
    nbytes = DTYPE_BYTES[dtype]
    weights = dims.params * nbytes
    activations = plan.memory(dims, nbytes)["peak"]
    per_device_weights = math.ceil(weights / n_devices)
    per_device = per_device_weights + activations
    room = memory - activations
    needed = math.ceil(weights / room) if room > 0 else None
    offload = max(0, weights - n_devices * room) if room > 0 else weights
    if tflops is None and device == "cpu":
        throughput = measured_throughput(dtype, dims.d_model, dims.d_ff or 4 * dims.d_model)
        source = "measured now (an MLP step at the model's widths on this CPU)"
    else:
        throughput = (tflops or GPU_TFLOPS) * 1e12
        source = "--tflops" if tflops else f"default {GPU_TFLOPS:g} TFLOP/s (measure with benchmarks/gpu.sh)"
    overhead = LOCAL_TRACE_OVERHEAD_S if trace_overhead is None else trace_overhead
    flops = plan.flops(dims)["total"]
    seconds = flops / throughput + plan.n_forwards * overhead
    return LocalEstimate(device, dtype, n_devices, memory, weights, per_device_weights, activations, per_device,
                         per_device <= memory, needed, offload, flops, plan.n_forwards, throughput, source, seconds)


def rows(est: LocalEstimate) -> list[tuple[str, str]]:
    from fv_remote.plan.cost import _secs, human

    out = [("weights", f"{est.weights / GiB:.1f} GiB in {est.dtype} ({est.weights_per_device / GiB:.1f} GiB per "
                       f"device over {est.n_devices})"),
           ("activations (peak)", f"{est.activations / GiB:.2f} GiB"),
           ("per device", f"{est.per_device / GiB:.1f} GiB of {est.memory_per_device / GiB:.1f} GiB"),
           ("FLOPs", human(est.flops)),
           ("forwards", str(est.forwards)),
           ("throughput", f"{est.throughput / 1e12:.3g} TFLOP/s ({est.throughput_source})"),
           ("time", _secs(est.seconds))]
    return out


def verdict(est: LocalEstimate) -> str:
    where = f"{est.n_devices} x {est.device}" if est.n_devices > 1 else est.device
    if est.fits:
        return f"fits on {where} ({est.per_device / GiB:.1f} of {est.memory_per_device / GiB:.1f} GiB per device)"
    text = f"does not fit on {where}: {est.per_device / GiB:.1f} GiB per device > {est.memory_per_device / GiB:.1f} GiB"
    if est.devices_needed:
        text += (f"; needs {est.devices_needed} such devices with --device-map auto, or offloads "
                 f"{est.offload / GiB:.1f} GiB to the CPU/disk (slow: every forward streams it)")
    if est.dtype == "float32":
        text += "; --dtype bfloat16 halves the weights"
    return text
