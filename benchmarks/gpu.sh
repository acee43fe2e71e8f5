#!/usr/bin/env bash
# GPU benchmarks: fast CMA, attribution, tracing and FFV on a GPU, with each cached model in fp32 and bf16, plus the
# head-count scaling and the machine's matmul throughput. Prints the same JSON lines as `make bench` (one per
# benchmark and setting; each line names the device, the GPU and the dtype). A few minutes on an H100-class GPU.
#
#   bash benchmarks/gpu.sh                      # from the repository root, after `make setup` and `make model`
#   GPU_MODELS="smollm2-135m" GPU_DTYPES=bfloat16 bash benchmarks/gpu.sh
#   GPU_DEVICE=cpu GPU_SMALL=1 bash benchmarks/gpu.sh   # the same path on the CPU, tiny settings (a smoke test)
#
# Settings (environment):
#   PY           python to use (default .venv/bin/python)
#   GPU_DEVICE   torch device (default cuda)
#   GPU_MODELS   short names from the model cache (default: smollm2-135m gemma3-270m)
#   GPU_DTYPES   float32 bfloat16 float16 (default: float32 bfloat16)
#   GPU_BENCHES  which benchmarks (default: bench_cma bench_attribution bench_tracing bench_ffv bench_heads)
#   GPU_TIMEOUT  seconds per benchmark run before it is stopped (default 600)
#   GPU_SMALL    1: small settings (3 CMA prompts, one task, 20 clean prompts) for a quick check
# A benchmark that fails prints a JSON line with "error" and the script goes on; its exit status is the number of
# failures. The torch in .venv must be a CUDA build for cuda (`make setup` installs the CPU wheel).
#
#   GPU_SPLIT    1 (default): also run bench_cma and bench_dtype with the model split by accelerate (device_map
#                "balanced" over the visible GPUs, or, with one GPU, half the blocks offloaded to the CPU), and
#                print `fv-remote plan --local` for the 8B/70B fixtures against this machine's GPUs.
#
# Status: written and run on the CPU path only (GPU_DEVICE=cpu GPU_SMALL=1); it has NOT run on a GPU yet (issue 24:
# no GPU was lent). Every stage runs device-correct on a fake second device in `make test`
# (tests/models/test_placement_devices.py); a device mismatch on a real GPU shows as an "error" line naming it.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${GPU_DEVICE:-cuda}
MODELS=${GPU_MODELS:-"smollm2-135m gemma3-270m"}
DTYPES=${GPU_DTYPES:-"float32 bfloat16"}
BENCHES=${GPU_BENCHES:-"bench_cma bench_attribution bench_tracing bench_ffv bench_heads bench_dtype"}
LIMIT=${GPU_TIMEOUT:-600}
export HF_HUB_OFFLINE=1 BENCH_OUT=${BENCH_OUT:-out/bench-gpu} PYTHONUNBUFFERED=1
if [ "${GPU_SMALL:-0}" = 1 ]; then
  export BENCH_PROMPTS=3 BENCH_IPH_PROMPTS=1 BENCH_NAIVE_HEADS=3 BENCH_CLEAN=20 BENCH_TASKS=present-past \
         BENCH_TRACE_BATCH=4 BENCH_TRACE_REPS=2 BENCH_HEADS=4,16 BENCH_HEADS_PROMPTS=1
fi

"$PY" - "$DEVICE" <<'EOF' || exit 1
import json, sys, torch
device = sys.argv[1]
info = {"bench": "device", "device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        print(json.dumps({**info, "error": "no CUDA device visible to torch (CPU-only torch build?)"}))
        sys.exit(1)
    props = torch.cuda.get_device_properties(torch.device(device))
    info.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1))
print(json.dumps(info))
EOF

failures=0
for model in $MODELS; do
  for dtype in $DTYPES; do
    for bench in $BENCHES; do
      if [ "$bench" = bench_heads ] && [ "$model" != "${MODELS%% *}" ]; then
        continue  # tiny configs: the model does not matter, once per dtype is enough
      fi
      line=$(BENCH_MODEL=$model timeout "$LIMIT" "$PY" "benchmarks/$bench.py" --device "$DEVICE" --dtype "$dtype" \
             2> >(tail -n 3 >&2))
      status=$?
      if [ $status -ne 0 ] || [ -z "$line" ]; then
        failures=$((failures + 1))
        echo "{\"bench\": \"${bench#bench_}\", \"model\": \"$model\", \"device\": \"$DEVICE\", \"dtype\": \"$dtype\", \"error\": \"exit $status\"}"
      else
        echo "$line" | "$PY" -c "import json, sys; r = json.loads(sys.stdin.read().strip().splitlines()[-1]); r.setdefault('model', '$model'); print(json.dumps(r))"
      fi
    done
  done
done
if [ "${GPU_SPLIT:-1}" = 1 ]; then
  # accelerate's device map: over the GPUs when there are several, else the first half of the blocks on the GPU and
  # the rest offloaded to the CPU (what a model larger than one card does); same JSON lines, "device_map" added.
  n_gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  model=${MODELS%% *}
  if [ "$n_gpus" -gt 1 ]; then
    map=balanced
  else
    map=$("$PY" benchmarks/split_map.py "$model" "$DEVICE")
  fi
  for bench in bench_cma bench_dtype; do
    line=$(BENCH_MODEL=$model FV_REMOTE_DEVICE_MAP=$map timeout "$LIMIT" "$PY" "benchmarks/$bench.py" \
           --device "$DEVICE" --dtype bfloat16 2> >(tail -n 3 >&2))
    status=$?
    if [ $status -ne 0 ] || [ -z "$line" ]; then
      failures=$((failures + 1))
      echo "{\"bench\": \"${bench#bench_}\", \"model\": \"$model\", \"device_map\": \"split\", \"error\": \"exit $status\"}"
    else
      echo "$line" | "$PY" -c "import json, sys; r = json.loads(sys.stdin.read().strip().splitlines()[-1]); r['device_map'] = sys.argv[1]; print(json.dumps(r))" "$( [ "$map" = balanced ] && echo balanced || echo gpu+cpu-offload)"
    fi
  done
  for size in 8B 70B; do
    "$PY" -c "from fv_remote.cli.app import main; main()" plan --local --device "$DEVICE" \
      --devices "$(( n_gpus > 0 ? n_gpus : 1 ))" --stage cma --n-prompts 25 --dtype bfloat16 \
      -m "meta-llama/Llama-3.1-$size" --config "tests/fixtures/configs/Llama-3.1-$size.json" --json 2>/dev/null \
      | "$PY" -c "import json, sys; print(json.dumps(json.loads(sys.stdin.read())))"
  done
fi
exit $failures
