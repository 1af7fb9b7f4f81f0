#!/usr/bin/env bash
# One prepared check on a lent GPU machine (one H100/H200), run from the repository root:
#   bash evaluation/device_check.sh OUT_DIR
# The machine has its own torch; what the project needs beyond it travels as wheels in .whl/
# (deepspeed, diffusers, transformers<5 and their dependencies; README, "Step benchmark").
# It runs, each with its own time limit so that one hang cannot eat the rest:
#   1. the GPU tests (pytest -m gpu);
#   2. a 20-step bf16 LADD training of the tiny config through the command line, with the GPU
#      templates and auto placement (on one GPU: every engine at ZeRO-0, models loaded on the GPU);
#   3. the step benchmark at the SD3-medium size (1024x1024, batch 4, bf16, the GPU templates):
#      the plain-PyTorch step, the engine step with auto placement (on one GPU: every engine at
#      ZeRO-0) and with everything under ZeRO-3, with peak memory per phase.
# Every log and result lands in OUT_DIR. The limits add up to under 8 minutes.
set -uo pipefail
out=${1:?usage: device_check.sh OUT_DIR}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, deepspeed, diffusers, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1 | tee -a "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, record the exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    tail -n 8 "$out/$name.log"
}

step pytest_gpu 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
gpu_templates="--set deepspeed.student_config=ds_configs/gpu/sd3_medium.json --set deepspeed.teacher_config=ds_configs/gpu/sd3_medium.json"
gpu_templates="$gpu_templates --set deepspeed.heads_config=ds_configs/gpu/sd3_medium.json"
auto="--set deepspeed.student_stage=auto --set deepspeed.teacher_stage=auto --set deepspeed.heads_stage=auto"
# shellcheck disable=SC2086  # the --set lists are meant to split
step train_tiny_bf16 60 python3 -m ladd_ds train --config configs/tiny_cpu.yaml --run-dir /tmp/device_run \
    --set deepspeed.precision=bf16 $gpu_templates $auto --max-steps 20
step bench_sd3_medium 330 python3 -m evaluation.bench_step --preset sd3-medium --resolution 1024 1024 --batch 4 \
    --engines plain,deepspeed --placements auto,3 --json "$out/bench_sd3_medium.json"
cat "$out/summary.txt"
