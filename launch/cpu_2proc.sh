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

# A stop signal (SIGTERM from a scheduler, SIGUSR1, Ctrl-C) goes to the ranks themselves, not to
# the launcher: each rank finishes its step, checkpoints and exits 0, and then so does the
# launcher, and this script with its status. (Signalled itself, torchrun / accelerate launch
# forward SIGTERM but exit non-zero even after a clean stop.)
run_forwarding_stops() {
  "$@" &
  local child=$! rc
  for sig in TERM USR1 INT; do
    trap "pkill -$sig -P $child || true" "$sig"
  done
  while true; do
    set +e; wait "$child"; rc=$?; set -e
    if ! kill -0 "$child" 2>/dev/null; then
      set +e; wait "$child" 2>/dev/null; rc2=$?; set -e
      [ "$rc2" -ne 127 ] && rc=$rc2
      exit "$rc"
    fi
  done
}

case "$mode" in
  ddp)
    run_forwarding_stops env ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/ddp.yaml \
      --num_processes 2 --main_process_port "$port" -m mmpretrain.train "$@" ;;
  zero2|zero3|zero3_offload)
    run_forwarding_stops env -u ACCELERATE_USE_CPU accelerate launch --config_file "launch/$mode.yaml" \
      --num_processes 2 --main_process_port "$port" -m mmpretrain.train "$@" ;;
  torchrun)
    run_forwarding_stops torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "$port" \
      -m mmpretrain.train "$@" ;;
  *)
    echo "unknown mode '$mode' (ddp | zero2 | zero3 | zero3_offload | torchrun)" >&2
    exit 2 ;;
esac
