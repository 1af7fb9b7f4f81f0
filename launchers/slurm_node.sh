#!/usr/bin/env bash
# Per-node part of launchers/slurm.sbatch (one srun task per node): starts GPUS_PER_NODE ranks
# of `ladd-ds train` with torchrun, which exports RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
# MASTER_ADDR and MASTER_PORT for DeepSpeed's init_distributed. The ranks inherit the rest of the
# task's environment unchanged (NCCL_*, GLOO_*, HF_* ...). Runs in the directory srun started
# it in (the one sbatch was called from), with the checkout first on PYTHONPATH.
#
# Variables: SLURM_NNODES, SLURM_NODEID (set by SLURM), MASTER_ADDR, MASTER_PORT,
# GPUS_PER_NODE (ranks on this node), VENV (virtualenv to activate; default: .venv of the checkout).
set -euo pipefail
home=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$home/.venv}
[ -f "$venv/bin/activate" ] && . "$venv/bin/activate"
export PYTHONPATH="$home${PYTHONPATH:+:$PYTHONPATH}"
config=${1:?usage: $0 CONFIG [ladd-ds train args...]}
shift
exec torchrun --nnodes "${SLURM_NNODES:?}" --node_rank "${SLURM_NODEID:?}" \
  --nproc_per_node "${GPUS_PER_NODE:?}" --master_addr "${MASTER_ADDR:?}" --master_port "${MASTER_PORT:-29500}" \
  -m ladd_ds train --config "$config" "$@"
