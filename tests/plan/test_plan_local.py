"""`fv-remote plan --local`: weights per dtype and device, the verdict, the devices needed, the time model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fv_remote.plan import cost as P
from fv_remote.plan import local as LP
from fv_remote.plan.cost import StageOptions
from fv_remote.stages import stage_plan

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
GiB = 2**30


def _estimate(name: str, dtype: str, memory: int, devices: int = 1):
    dims = P.dims_from_config(P.load_config(name, str(CONFIGS / f"{name}.json")))
    built, _ = stage_plan("cma", dims, StageOptions(n_prompts=25, dtype=dtype))
    return dims, LP.local_estimate(built, dims, dtype, "cuda", memory, devices, tflops=100.0)


def test_weights_are_params_times_dtype_bytes_and_split_over_devices():
    dims, fp32 = _estimate("Llama-3.1-8B", "float32", 80 * GiB)
    _, bf16 = _estimate("Llama-3.1-8B", "bfloat16", 80 * GiB)
    assert fp32.weights == dims.params * 4 and bf16.weights == dims.params * 2
    assert 7.9e9 < dims.params < 8.1e9 and fp32.fits and bf16.fits
    _, split = _estimate("Llama-3.1-8B", "bfloat16", 80 * GiB, devices=4)
    assert split.weights_per_device == -(-bf16.weights // 4)


def test_70b_needs_two_gpus_in_bf16_and_offloads_what_does_not_fit():
    _, one = _estimate("Llama-3.1-70B", "bfloat16", 80 * GiB)
    assert not one.fits and one.devices_needed == 2
    assert one.offload == one.weights - (80 * GiB - one.activations)  # what one device cannot hold
    _, two = _estimate("Llama-3.1-70B", "bfloat16", 80 * GiB, devices=2)
    assert two.fits and two.offload == 0
    _, fp32 = _estimate("Llama-3.1-70B", "float32", 80 * GiB)
    assert fp32.devices_needed == 4
    assert "2" in LP.verdict(one)


def test_time_is_flops_over_throughput_plus_a_cost_per_forward():
    _, est = _estimate("Llama-3.1-8B", "bfloat16", 80 * GiB)
    assert est.seconds == pytest.approx(est.flops / 100e12 + est.forwards * LP.LOCAL_TRACE_OVERHEAD_S)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_throughput_is_measured_at_the_model_widths(dtype):
    flops = LP.measured_throughput(dtype, d_model=64, d_ff=128, tokens=32, reps=2)
    assert 1e6 < flops < 1e15  # a real measurement: FLOPs of the step over its best time


def test_cli_plan_local_json():
    from fv_remote.cli.app import _register, app

    _register()
    done = CliRunner().invoke(app, ["plan", "--local", "--device", "cuda", "--memory", "80GiB", "--stage", "cma",
                                    "--model", "meta-llama/Llama-3.1-70B", "--config",
                                    str(CONFIGS / "Llama-3.1-70B.json"), "--dtype", "bfloat16", "--json"])
    assert done.exit_code == 0, done.output
    data = json.loads(done.output)
    assert data["devices_needed"] == 2 and data["fits"] is False and "2" in data["verdict"]
