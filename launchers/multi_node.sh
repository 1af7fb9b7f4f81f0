#!/usr/bin/env bash
# Multi-node LADD training with the deepspeed launcher and a hostfile (runs on the first node).
# By default the launcher reaches the other nodes over passwordless ssh with pdsh; with
# LAUNCHER_ARGS="--launcher openmpi" it runs mpirun instead, and each rank takes its rank from
# OpenMPI's OMPI_COMM_WORLD_* variables.
#
#   HOSTFILE=hosts.txt launchers/multi_node.sh CONFIG [extra ladd-ds train arguments...]
#
# Variables:
#   HOSTFILE      DeepSpeed hostfile, one line per node: "node-01 slots=8" (required)
#   NUM_NODES     nodes to use (default: every line of HOSTFILE; not with the MPI launchers)
#   NUM_GPUS      ranks per node (default: the slots of the hostfile; not with the MPI launchers)
#   MASTER_ADDR   address of the rank-0 node, reachable from every node (default: first host)
#   MASTER_PORT   rendezvous port (default 29500)
#   LAUNCHER_ARGS extra deepspeed launcher arguments, e.g. "--launcher openmpi" or "--no_ssh_check".
#                 The MPI launchers (openmpi, mpich, impi, mvapich) start every slot of HOSTFILE:
#                 they refuse NUM_NODES and NUM_GPUS (edit the hostfile instead)
#   MPIRUN_ARGS   arguments for mpirun (deepspeed --launcher_args; with pdsh, for pdsh), e.g.
#                 "--mca btl_tcp_if_include ib0": DeepSpeed's openmpi launcher otherwise adds
#                 "--mca btl_tcp_if_include eth0"
#   PASS_ENV      extra variable names to forward to every node (space separated). Forwarded
#                 when set: NCCL_*, TORCH_NCCL_*, GLOO_*, TORCH_DISTRIBUTED_DEBUG, HF_*,
#                 PYTHONPATH, OMP_NUM_THREADS, DS_ACCELERATOR; MASTER_ADDR and MASTER_PORT always
# Network variables to check on a new cluster (docs/training.md, "Multi-node"): NCCL_SOCKET_IFNAME,
# GLOO_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG=WARN (INFO while debugging).
# Every node must see the same checkout, virtualenv, config, data and run directory (a shared
# file system): checkpoints are written by all ranks into RUN_DIR/checkpoints.
set -euo pipefail
config=${1:?usage: HOSTFILE=FILE $0 CONFIG [ladd-ds train args...]}
shift
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (lines like 'node-01 slots=8')}"
[ -f "$HOSTFILE" ] || { echo "HOSTFILE $HOSTFILE does not exist" >&2; exit 2; }
MASTER_ADDR=${MASTER_ADDR:-$(awk '/^[^#[:space:]]/ {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}

# shellcheck disable=SC2206  # LAUNCHER_ARGS is a list of words
launcher_args=(${LAUNCHER_ARGS:-})
backend=pdsh
for i in "${!launcher_args[@]}"; do
  case ${launcher_args[$i]} in
    --launcher) backend=${launcher_args[$((i + 1))]:-} ;;
    --launcher=*) backend=${launcher_args[$i]#--launcher=} ;;
  esac
done
backend=${backend,,}

# The pdsh and slurm backends limit nodes and ranks per node; DeepSpeed's MPI backends raise on
# --num_nodes/--num_gpus ("does not support limiting num nodes/gpus") and start every slot.
limits=()
case $backend in
  openmpi | mpich | impi | mvapich)
    if [ -n "${NUM_NODES:-}${NUM_GPUS:-}" ]; then
      echo "multi_node.sh: the $backend launcher starts every slot of HOSTFILE ($HOSTFILE) and cannot" \
        "limit nodes or ranks per node: unset NUM_NODES and NUM_GPUS and edit the hostfile instead" >&2
      exit 2
    fi ;;
  *)
    [ -n "${NUM_NODES:-}" ] && limits+=(--num_nodes "$NUM_NODES")
    [ -n "${NUM_GPUS:-}" ] && limits+=(--num_gpus "$NUM_GPUS") ;;
esac
mpirun_args=()
[ -n "${MPIRUN_ARGS:-}" ] && mpirun_args=(--launcher_args "$MPIRUN_ARGS")

# DeepSpeed exports the variables listed in ./.deepspeed_env on every node it starts. mpirun
# passes a remote rank only what it is told to, so MASTER_ADDR/MASTER_PORT go there too.
: > .deepspeed_env
printf 'MASTER_ADDR=%s\nMASTER_PORT=%s\n' "$MASTER_ADDR" "$MASTER_PORT" >> .deepspeed_env
for name in $(compgen -e | grep -E '^(NCCL_|TORCH_NCCL_|GLOO_|TORCH_DISTRIBUTED_DEBUG$|HF_|PYTHONPATH$|OMP_NUM_THREADS$|DS_ACCELERATOR$)') ${PASS_ENV:-}; do
  printf '%s=%s\n' "$name" "${!name}" >> .deepspeed_env
done

exec deepspeed --hostfile "$HOSTFILE" "${limits[@]}" "${launcher_args[@]}" "${mpirun_args[@]}" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module ladd_ds train --config "$config" "$@"
