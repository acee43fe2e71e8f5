#!/bin/bash
# Issue 24's fp32 vs bf16 runs (RESULTS.md, "On your own devices"): the other three of Todd et al.'s tasks per model
# and dtype, each stage alone under /usr/bin/time (present-past), and gemma's FFV from each dtype's FV (--lr 10).
# Tables: python benchmarks/dtype_compare.py --runs out/dtype6/MODEL --stages out/stages/MODEL
set -u
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
FV=.venv/bin/fv-remote
D=${TODD_DIR:-../shared/data/todd_fv/abstractive}
T="/usr/bin/time -f %e_s_%M_KB"
for M in smollm2-135m gemma3-270m; do for DT in float32 bfloat16; do
  O=out/dtype6/$M; mkdir -p $O/$DT
  $T $FV --dtype $DT run antonym country-capital english-french -m $M --data-dir $D --out $O/$DT --json $O/$DT.json > $O/$DT.log 2>&1
done; done
for M in smollm2-135m gemma3-270m; do for DT in float32 bfloat16; do
  S=out/stages/$M/$DT; rm -rf $S; mkdir -p $S
  $T $FV --dtype $DT extract -t present-past -m $M --data-dir $D --store $S/s.zarr > $S/extract.log 2>&1
  $T $FV --dtype $DT cma -t present-past -m $M --data-dir $D --store $S/s.zarr --plot $S/aie.png > $S/cma.log 2>&1
  $T $FV --dtype $DT fit -t present-past -m $M --data-dir $D --store $S/s.zarr -o $S/fv.safetensors --plot $S/sweep.png > $S/fit.log 2>&1
  $T $FV --dtype $DT evaluate -t present-past -m $M --data-dir $D --fv $S/fv.safetensors --json $S/eval.json > $S/evaluate.log 2>&1
  $T $FV --dtype $DT residuals -t present-past -m $M --data-dir $D --store $S/s.zarr > $S/residuals.log 2>&1
done; done
for DT in float32 bfloat16; do for TASK in antonym country-capital english-french; do
  O=out/dtype6/gemma3-270m/$DT
  $T $FV --dtype $DT finetune -t $TASK -m gemma3-270m --data-dir $D --fv $O/$TASK.fv.safetensors --lr 10 --n-test 50 \
    -o $O/$TASK.ffv.safetensors --json $O/$TASK.ffv.json > $O/$TASK.ffv.log 2>&1
done; done
