#!/usr/bin/env bash
# Two gloo processes on one CPU machine, through the same launchers as a GPU cluster.
#   launch/cpu_2proc.sh MODE --config FILE [key=value ...]
#   MODE: ddp | zero2 | zero3 | zero3_offload (accelerate launch) | torchrun (DDP via torchrun)
# Facts behind the flags: docs/training.md. DeepSpeed must
# run without ACCELERATE_USE_CPU (it would silently fall back to DDP); DDP needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:?usage: launch/cpu_2proc.sh ddp|zero2|zero3|zero3_offload|torchrun --config FILE [key=value ...]}"
shift
port="${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
case "$mode" in
  ddp)
    exec env ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/ddp.yaml --num_processes 2 \
      --main_process_port "$port" -m mmpretrain.train "$@" ;;
  zero2|zero3|zero3_offload)
    exec env -u ACCELERATE_USE_CPU accelerate launch --config_file "launch/$mode.yaml" --num_processes 2 \
      --main_process_port "$port" -m mmpretrain.train "$@" ;;
  torchrun)
    exec torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "$port" -m mmpretrain.train "$@" ;;
  *)
    echo "unknown mode '$mode' (ddp | zero2 | zero3 | zero3_offload | torchrun)" >&2
    exit 2 ;;
esac
