#!/usr/bin/env bash
# One node's share of a multi-node run: `accelerate launch` with this node's rank and the main node's address,
# read from the SLURM environment. launchers/slurm/train.sbatch runs it once per node through srun; it works by
# hand too (set the variables below). Usage: launch_node.sh train_dpo.py --flag value ...
#
#   SLURM_NNODES, SLURM_NODEID       number of nodes, this node's rank (SLURM sets both)
#   SLURM_JOB_NODELIST, SLURM_JOB_ID the main node is the first host of the list; the port is derived from the id
#   GPUS_PER_NODE                    processes per node (default: the GPUs nvidia-smi lists)
#   ACCELERATE_CONFIG                launchers/accelerate/ddp.yaml (default), fsdp.yaml or deepspeed_zero2.yaml
#   MAIN_PROCESS_IP / MAIN_PROCESS_PORT  override the derived address and port
#   DRY_RUN=1                        print the command instead of running it
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

NNODES=${SLURM_NNODES:-1}
NODE_RANK=${SLURM_NODEID:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$GPUS_PER_NODE" -lt 1 ]; then
  echo "error: GPUS_PER_NODE is not set and nvidia-smi lists no GPU on $(hostname)" >&2; exit 2
fi
if [ -z "${MAIN_PROCESS_IP:-}" ]; then
  if command -v scontrol >/dev/null; then
    MAIN_PROCESS_IP=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n 1)
  else  # a plain comma-separated list (no ranges) when scontrol is absent
    MAIN_PROCESS_IP=${SLURM_JOB_NODELIST:-localhost}; MAIN_PROCESS_IP=${MAIN_PROCESS_IP%%,*}
  fi
fi
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/ddp.yaml}
source launchers/env.bash  # PYTHON: the project's .venv where there is one

CMD=("$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG"
     --num_machines "$NNODES" --machine_rank "$NODE_RANK" --num_processes $((NNODES * GPUS_PER_NODE))
     --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" --rdzv_backend static
     "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${CMD[@]}"; echo
else
  exec "${CMD[@]}"
fi
