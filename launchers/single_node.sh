#!/usr/bin/env bash
# Single-node LADD training with the deepspeed launcher.
#
#   launchers/single_node.sh CONFIG [extra ladd-ds train arguments...]
#
# Variables (all optional):
#   NUM_GPUS     ranks to start (default: all visible GPUs; on a CPU-only machine 2 CPU ranks)
#   MASTER_PORT  rendezvous port (default 29500)
#   OMP_NUM_THREADS  CPU threads per rank (default: cores / ranks on CPU-only machines)
set -euo pipefail
config=${1:?usage: $0 CONFIG [ladd-ds train args...]}
shift
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NUM_GPUS > 0 ? $(nproc) / NUM_GPUS : 1 ))}
fi
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
  --module ladd_ds train --config "$config" "$@"
