#!/usr/bin/env bash
# One prepared check on a lent GPU machine (one H100/H200), run from the repository root:
#   bash evaluation/device_check.sh OUT_DIR
# The machine has its own torch; what the project needs beyond it travels as wheels in .whl/
# (deepspeed, diffusers, transformers<5 and their dependencies; docs/performance.md, "Step benchmark").
# Without a CUDA GPU it stops at once with exit status 2. It runs, each with its own time limit
# so that one hang cannot eat the rest (the limits add up to about 10 minutes):
#   1. the GPU tests (pytest -m gpu);
#   2. the production step: bench_step --config configs/sd3_medium.yaml (its 256-channel heads,
#      checkpointing, templates, auto placement: every engine at ZeRO-0 on one GPU, bf16 AdamW on
#      fp32 masters), plain PyTorch and engines, once per attention backend, with the peak memory
#      of every phase and the memory plan;
#   3. the same step with everything under ZeRO-3, with and without overlap_comm;
#   4. the same step with model.compile (auto placement);
#   5. 20 steps of `ladd-ds train` with configs/sd3_medium.yaml on random latents at 1024x1024
#      (StepTimer's time/step_s, memory/max_allocated_gib in metrics.jsonl; the run leaves before
#      its final checkpoint, ~28 GB of no interest here);
# then one table of all of them (evaluation/device_table.py). Every log and result lands in OUT_DIR.
set -uo pipefail
out=${1:?usage: device_check.sh OUT_DIR}
python=${PYTHON:-python3}
mkdir -p "$out"
if [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "device_check.sh: no CUDA GPU visible to torch ($python); this check measures a GPU and runs only on one" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$python" -c "import torch, deepspeed, diffusers, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1 | tee -a "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, record the exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    tail -n 8 "$out/$name.log"
}

config=configs/sd3_medium.yaml
bench=("$python" -m evaluation.bench_step --config "$config" --steps 3 --warmup 1)
step pytest_gpu 45 "$python" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
step bench_production 170 "${bench[@]}" --engines plain,deepspeed --placements auto \
    --attention-backends default,flash,cudnn,efficient,math --json "$out/bench_production.json"
step bench_zero3 120 "${bench[@]}" --engines deepspeed --placements 3,3:no-overlap --json "$out/bench_zero3.json"
step bench_compile 120 "${bench[@]}" --engines deepspeed --placements auto --compile --warmup 2 --json "$out/bench_compile.json"
# The run directory stays off OUT_DIR; `exit@21` (distributed/faults.py) leaves after step 20.
random=(--set data.source=random_latents --set data.random_latents.num_samples=48)
for kv in latent_channels=16 height=128 width=128 text_len=333 text_dim=4096 pooled_dim=2048; do
    random+=(--set "data.random_latents.$kv")
done
rm -rf /tmp/device_train
LADD_DS_INJECT_FAULTS=exit@21 step train_sd3_medium 150 "$python" -m ladd_ds train --config "$config" \
    --run-dir /tmp/device_train --max-steps 21 "${random[@]}" --set logging.every=1 --set logging.progress_bar=false \
    --set checkpoint.every=1000
mkdir -p "$out/train_sd3_medium"
cp /tmp/device_train/metrics.jsonl /tmp/device_train/*.json "$out/train_sd3_medium/" 2>/dev/null
cat "$out/summary.txt"
"$python" -m evaluation.device_table "$out"/bench_production.json "$out"/bench_zero3.json "$out"/bench_compile.json \
    --train "$out/train_sd3_medium" | tee "$out/table.txt"
