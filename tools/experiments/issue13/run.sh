#!/usr/bin/env bash
# One rung of the issue-13 ladder (docs/miniature.md) on one core, from the repository root:
#   tools/experiments/issue13/run.sh NAME STEPS "EX_SWITCH=.. ..." [extra --config flags...]
# Runs land in ${RUNS:-/tmp/issue13_runs}/NAME; an existing run directory is refused, never replaced.
# The pins after the switches keep the ladder's rungs on the pretrain config they were measured with (before
# session 11 made the two-phase recipe its default); the EX_ switches do what the package options now do.
set -euo pipefail
NAME=$1; STEPS=$2; ENVS=$3; shift 3
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
RUNS=${RUNS:-/tmp/issue13_runs}
if [[ -e "$RUNS/$NAME" ]]; then
  echo "run.sh: $RUNS/$NAME exists; choose another NAME or move it away" >&2
  exit 2
fi
cd "$ROOT"
# shellcheck disable=SC2086  # ENVS is a list of VAR=value words on purpose
env JAX_PLATFORMS=cpu XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" OMP_NUM_THREADS=1 \
  PYTHONPATH="$ROOT" $ENVS \
  taskset -c "${CORE:-1}" python tools/experiments/issue13/drive.py --config configs/pretrain_tiny.py \
  --workdir "$RUNS/$NAME" \
  --config.stages=pretrain --config.pretrain.steps="$STEPS" --config.pretrain.batch_size=32 --config.pretrain.lr=3e-3 \
  --config.pretrain.questions.locate=1 --config.pretrain.questions.name=0 --config.pretrain.questions.read=0 \
  --config.pretrain.length_buckets="(96,)" --config.pretrain.patch_buckets="(64,)" \
  --config.pretrain.eval_every=100 --config.pretrain.probe_scenes=64 --config.pretrain.log_every=25 \
  --config.pretrain.checkpoint_every=100000 \
  --config.pretrain.from_stage= --config.pretrain.freeze_vision=False --config.model.vision_position_sincos=0 \
  --config.pretrain.questions.target_first=True --config.pretrain.questions.cell_first=False \
  --config.pretrain.questions.cell_only_steps=0 "$@"
