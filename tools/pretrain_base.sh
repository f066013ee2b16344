#!/usr/bin/env bash
# The base's recipe (configs/pretrain_tiny.py) on two CPU cores: the tower's phases ("kind", "digits") beside
# the decoder's ("pretrain", "same_colour"), which take the tower with `vision_from`. The same runs, weights
# and export as the one command
#   python -m mini_o3_jax.main --config configs/pretrain_tiny.py --workdir WORKDIR
# (each run's scenes and updates depend on its name and the seed only); its critical path is about two thirds
# of that command's time. Every run resumes: re-run this after a kill.
#
#   tools/pretrain_base.sh WORKDIR [--config.seed=1 ...]
# Logs: WORKDIR/pretrain_base.<core>.log; progress also in WORKDIR/log.txt and WORKDIR/metrics/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: $0 WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
workdir=$1
shift
extra=("$@")
mkdir -p "$workdir"

run() {  # run CORE [STAGES]: one process on one core, one XLA thread (the default stage list without STAGES)
  local core=$1 stages=()
  [ $# -ge 2 ] && stages=("--config.stages=$2")
  env JAX_PLATFORMS=cpu XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      OMP_NUM_THREADS=1 taskset -c "$core" python -m mini_o3_jax.main --config configs/pretrain_tiny.py \
      --workdir "$workdir" "${stages[@]}" "${extra[@]}" >> "$workdir/pretrain_base.$core.log" 2>&1
}

run 0 pretrain_vision
run 1 pretrain_vision/kind & tower=$!
run 0 pretrain
wait "$tower"
run 1 pretrain_vision/digits & tower=$!
run 0 pretrain/same_colour
wait "$tower"
run 0  # every run listed in the config: the finished ones resume at their end, then "window" and the export
echo "base: $workdir/base"
