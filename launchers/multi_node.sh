#!/usr/bin/env bash
# Multi-node LADD training with the deepspeed launcher and a hostfile (runs on the first node;
# the launcher reaches the other nodes over passwordless ssh with pdsh).
#
#   HOSTFILE=hosts.txt launchers/multi_node.sh CONFIG [extra ladd-ds train arguments...]
#
# Variables:
#   HOSTFILE      DeepSpeed hostfile, one line per node: "node-01 slots=8" (required)
#   NUM_NODES     nodes to use (default: every line of HOSTFILE)
#   NUM_GPUS      ranks per node (default: the slots of the hostfile)
#   MASTER_ADDR   address of the rank-0 node, reachable from every node (default: first host)
#   MASTER_PORT   rendezvous port (default 29500)
#   LAUNCHER_ARGS extra deepspeed launcher arguments, e.g. "--launcher openmpi" or "--no_ssh_check"
#   PASS_ENV      extra variable names to forward to every node (space separated); NCCL_*,
#                 HF_*, PYTHONPATH and OMP_NUM_THREADS are forwarded when set
# Every node must see the same checkout, virtualenv, config, data and run directory (a shared
# file system): checkpoints are written by all ranks into RUN_DIR/checkpoints.
set -euo pipefail
config=${1:?usage: HOSTFILE=FILE $0 CONFIG [ladd-ds train args...]}
shift
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (lines like 'node-01 slots=8')}"
[ -f "$HOSTFILE" ] || { echo "HOSTFILE $HOSTFILE does not exist" >&2; exit 2; }
NUM_NODES=${NUM_NODES:-$(grep -cE '^[^#[:space:]]' "$HOSTFILE")}
MASTER_ADDR=${MASTER_ADDR:-$(grep -E '^[^#[:space:]]' "$HOSTFILE" | head -1 | awk '{print $1}')}
MASTER_PORT=${MASTER_PORT:-29500}

# DeepSpeed exports the variables listed in ./.deepspeed_env on every node it starts.
: > .deepspeed_env
for name in $(compgen -e | grep -E '^(NCCL_|HF_|PYTHONPATH$|OMP_NUM_THREADS$|DS_ACCELERATOR$)') ${PASS_ENV:-}; do
  printf '%s=%s\n' "$name" "${!name}" >> .deepspeed_env
done

gpus=()
[ -n "${NUM_GPUS:-}" ] && gpus=(--num_gpus "$NUM_GPUS")
# shellcheck disable=SC2086  # LAUNCHER_ARGS is a list of words
exec deepspeed --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" "${gpus[@]}" ${LAUNCHER_ARGS:-} \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module ladd_ds train --config "$config" "$@"
