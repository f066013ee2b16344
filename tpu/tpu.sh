#!/usr/bin/env bash
# Run mini_o3_jax on a Cloud TPU VM (single host or a multi-host slice) from your workstation.
#
#   tpu/tpu.sh [--dry-run] COMMAND [ARGS...]
#
#   create                  create the TPU VM (or a queued resource with QUEUED=1)
#   setup                   copy this checkout (or clone REPO_URL) to every worker, install Python, the
#                           project and jax[tpu] (and gcsfuse when BUCKET is set)
#   copy-data [LOCAL_DIR]   upload LOCAL_DIR to gs://BUCKET/DATA_PREFIX (if given), then sync that
#                           prefix to DATA_DIR on every worker
#   launch [MAIN_ARGS...]   start `python -m mini_o3_jax.main --config CONFIG --workdir WORKDIR MAIN_ARGS`
#                           on every worker under nohup; logs in ~/mini_o3_logs/RUN_NAME.log on each
#   logs [WORKER|all]       follow worker WORKER's log (default 0); `all`: the last lines of every worker
#   status                  the TPU's state and the run's state on every worker
#   stop                    stop the run on every worker (the TPU keeps running)
#   delete                  delete the TPU (and its queued resource)
#   resume [--recreate] [MAIN_ARGS...]
#                           after a preemption or a crash: recreate the TPU if it is gone or broken
#                           (PREEMPTED, STOPPED, ...), set it up again, copy the data (if DATA_PREFIX is
#                           set) and launch again; the main command resumes from the latest checkpoint in
#                           WORKDIR. Does nothing while the run is alive, after it finished, or while the
#                           TPU is CREATING / STARTING / RESTARTING / REPAIRING. `relaunch` is an alias.
#   ssh [WORKER] [CMD]      a shell (or CMD) on a worker (default 0)
#
# Settings come from the environment or from a sourced file: tpu/env.sh (copy tpu/env.example), or the
# file named by TPU_ENV_FILE. DRY_RUN=1 or --dry-run prints the exact commands instead of running them.
# See tpu/README.md.
set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$TPU_DIR")"

die() {
  echo "tpu.sh: $*" >&2
  exit 2
}

info() {
  echo "tpu.sh: $*" >&2
}

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  die "needs bash >= 4.4 (this is $BASH_VERSION; on macOS: brew install bash)"
fi

load_settings() {
  local file="${TPU_ENV_FILE:-$TPU_DIR/env.sh}"
  if [[ -n "${TPU_ENV_FILE:-}" && ! -r "$file" ]]; then
    die "TPU_ENV_FILE=$file does not exist"
  fi
  if [[ -r "$file" ]]; then
    # shellcheck source=/dev/null
    source "$file"
  fi
  DRY_RUN="${DRY_RUN:-0}"
  PROJECT="${PROJECT:-}"
  ZONE="${ZONE:-}"
  TPU_NAME="${TPU_NAME:-}"
  ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
  RUNTIME_VERSION="${RUNTIME_VERSION:-}"
  QUEUED="${QUEUED:-0}"
  SPOT="${SPOT:-0}"
  PREEMPTIBLE="${PREEMPTIBLE:-0}"
  RESERVED="${RESERVED:-0}"
  BUCKET="${BUCKET:-}"
  BUCKET="${BUCKET#gs://}"
  BUCKET="${BUCKET%/}"
  DATA_PREFIX="${DATA_PREFIX:-}"
  DATA_DIR="${DATA_DIR:-/mnt/data}"
  MOUNT_DIR="${MOUNT_DIR:-/mnt/gcs}"
  CONFIG="${CONFIG:-}"
  RUN_NAME="${RUN_NAME:-$TPU_NAME}"
  WORKDIR="${WORKDIR:-}"
  REMOTE_DIR="${REMOTE_DIR:-mini_o3_jax}"
  REPO_URL="${REPO_URL:-}"
  REPO_REF="${REPO_REF:-}"
  read -ra CREATE_FLAGS <<<"${CREATE_FLAGS:-}"
  read -ra SSH_FLAGS <<<"${SSH_FLAGS:-}"
  read -ra FORWARD_ENV <<<"${FORWARD_ENV:-}"
}

# Fails with one clear message naming every missing setting.
require() {
  local missing=() name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
  done
  if ((${#missing[@]})); then
    die "missing setting(s): ${missing[*]} (set them in the environment or in tpu/env.sh; see tpu/env.example)"
  fi
}

# The arguments shell-quoted (single quotes where needed) and joined by spaces.
quote() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Prints the command (shell-quoted, one line) under DRY_RUN=1; runs it otherwise.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

gcloud_flags() {
  GCLOUD_FLAGS=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then
    GCLOUD_FLAGS+=("--project=$PROJECT")
  fi
}

accelerator_type() {
  # gcloud names v5e slices v5litepod-N.
  if [[ "$ACCELERATOR_TYPE" == v5e-* ]]; then
    echo "v5litepod-${ACCELERATOR_TYPE#v5e-}"
  else
    echo "$ACCELERATOR_TYPE"
  fi
}

runtime_version() {
  if [[ -n "$RUNTIME_VERSION" ]]; then
    echo "$RUNTIME_VERSION"
    return
  fi
  case "$(accelerator_type)" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default runtime version for ACCELERATOR_TYPE=$ACCELERATOR_TYPE: set RUNTIME_VERSION" ;;
  esac
}

# The work directory as the workers see it: gs://BUCKET/x becomes MOUNT_DIR/x (the gcsfuse mount).
workdir() {
  if [[ "$WORKDIR" == gs://* ]]; then
    [[ -n "$BUCKET" && "$WORKDIR/" == "gs://$BUCKET/"* ]] ||
      die "WORKDIR=$WORKDIR is not in BUCKET=${BUCKET:-(unset)}: the workers see only gs://BUCKET (at MOUNT_DIR)"
    local rest="${WORKDIR#"gs://$BUCKET"}"
    echo "$MOUNT_DIR${rest%/}"
  elif [[ -n "$WORKDIR" ]]; then
    echo "$WORKDIR"
  elif [[ -n "$BUCKET" ]]; then
    echo "$MOUNT_DIR/runs/$RUN_NAME"
  else
    die "missing setting(s): WORKDIR or BUCKET (the work directory must outlive the VM and be shared by every worker)"
  fi
}

# The command line that runs `worker.sh ARGS` on a worker, with the worker settings that are set here.
worker_cmd() {
  local assigns=() name
  for name in VENV PYTHON_VERSION JAX_TPU_SPEC LOG_DIR BUCKET MOUNT_DIR TAIL_LINES "${FORWARD_ENV[@]}"; do
    if [[ -n "${!name:-}" ]]; then
      assigns+=("$name=${!name}")
    fi
  done
  quote env "${assigns[@]}" bash "$REMOTE_DIR/tpu/worker.sh" "$@"
}

tpu_ssh() {
  local worker="$1" command="$2"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" "--worker=$worker" "${SSH_FLAGS[@]}" \
    "--command=$command"
}

cmd_create() {
  require ZONE TPU_NAME ACCELERATOR_TYPE
  local type version flags=()
  type="$(accelerator_type)"
  version="$(runtime_version)"
  [[ "$SPOT" == 1 ]] && flags+=(--spot)
  [[ "$RESERVED" == 1 ]] && flags+=(--reserved)
  if [[ "$QUEUED" == 1 ]]; then
    [[ "$PREEMPTIBLE" == 1 ]] && die "PREEMPTIBLE=1 is for tpu-vm create; use SPOT=1 with QUEUED=1"
    run gcloud compute tpus queued-resources create "$TPU_NAME" "--node-id=$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
      "--accelerator-type=$type" "--runtime-version=$version" "${flags[@]}" "${CREATE_FLAGS[@]}"
    wait_active
  else
    [[ "$PREEMPTIBLE" == 1 ]] && flags+=(--preemptible)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" "--accelerator-type=$type" \
      "--version=$version" "${flags[@]}" "${CREATE_FLAGS[@]}"
  fi
}

# Waits until the queued resource is ACTIVE (its TPU VM exists).
wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
    "--format=value(state.state)")
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${describe[@]}"
    return
  fi
  local state
  while true; do
    state="$("${describe[@]}")"
    info "queued resource $TPU_NAME: $state"
    case "$state" in
      ACTIVE) return ;;
      FAILED | SUSPENDED | SUSPENDING) die "queued resource $TPU_NAME is $state" ;;
    esac
    sleep "${POLL_SECONDS:-60}"
  done
}

# Ships the code: a clone of REPO_URL, or this checkout's files (tracked and untracked, not ignored).
ship_code() {
  if [[ -n "$REPO_URL" ]]; then
    local clone=(git clone --depth 1)
    [[ -n "$REPO_REF" ]] && clone+=(--branch "$REPO_REF")
    tpu_ssh all "$(quote rm -rf "$REMOTE_DIR") && $(quote "${clone[@]}" "$REPO_URL" "$REMOTE_DIR")"
    return
  fi
  git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "$REPO_ROOT is not a git checkout: set REPO_URL to clone the code on the workers instead"
  local tarball="${TMPDIR:-/tmp}/mini_o3_jax_src.tar.gz"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# pack: git -C $REPO_ROOT ls-files -z -co --exclude-standard | tar --null -T - -czf $tarball"
  else
    git -C "$REPO_ROOT" ls-files -z -co --exclude-standard | tar -C "$REPO_ROOT" --null -T - -czf "$tarball"
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:mini_o3_jax_src.tar.gz" "${GCLOUD_FLAGS[@]}" \
    --worker=all "${SSH_FLAGS[@]}"
  local dir
  dir="$(quote "$REMOTE_DIR")"
  tpu_ssh all "rm -rf $dir && mkdir -p $dir && tar -xzf mini_o3_jax_src.tar.gz -C $dir"
}

cmd_setup() {
  require ZONE TPU_NAME
  ship_code
  tpu_ssh all "$(worker_cmd install)"
}

cmd_copy_data() {
  require ZONE TPU_NAME BUCKET DATA_PREFIX
  local src="gs://$BUCKET/${DATA_PREFIX%/}"
  local project_flag=()
  [[ -n "$PROJECT" ]] && project_flag=("--project=$PROJECT")
  if (($# >= 1)); then
    [[ -d "$1" ]] || die "copy-data: $1 is not a directory"
    run gcloud storage rsync -r "$1" "$src" "${project_flag[@]}"
  fi
  tpu_ssh all "$(worker_cmd fetch-data "$src" "$DATA_DIR")"
}

cmd_launch() {
  require ZONE TPU_NAME CONFIG
  local dir
  dir="$(workdir)"
  # Every worker runs the same command; on a multi-host slice JAX finds its peers from the TPU metadata.
  tpu_ssh all "$(worker_cmd start "$RUN_NAME" --config "$CONFIG" --workdir "$dir" "$@")"
}

cmd_logs() {
  require ZONE TPU_NAME
  local worker="${1:-0}"
  if [[ "$worker" == all ]]; then
    TAIL_LINES="${TAIL_LINES:-20}"
    tpu_ssh all "$(worker_cmd status "$RUN_NAME")"
  else
    tpu_ssh "$worker" "$(worker_cmd logs "$RUN_NAME")"
  fi
}

# Sets TPU_STATE to the TPU VM's state (READY, PREEMPTED, ...), NOT_FOUND, or UNKNOWN in a dry run.
tpu_state() {
  local describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" "--format=value(state)")
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${describe[@]}"
    TPU_STATE=UNKNOWN
  else
    TPU_STATE="$("${describe[@]}" 2>/dev/null)" || TPU_STATE=NOT_FOUND
  fi
}

cmd_status() {
  require ZONE TPU_NAME
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
      "--format=value(state.state)" || info "no queued resource $TPU_NAME"
  fi
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
    "--format=table(name.basename(),state,health,acceleratorType,runtimeVersion)" ||
    {
      info "no TPU VM $TPU_NAME in $ZONE"
      return 0
    }
  tpu_ssh all "$(worker_cmd status "$RUN_NAME")"
}

cmd_stop() {
  require ZONE TPU_NAME
  tpu_ssh all "$(worker_cmd stop "$RUN_NAME")"
}

cmd_delete() {
  require ZONE TPU_NAME
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
  fi
}

cmd_resume() {
  require ZONE TPU_NAME ACCELERATOR_TYPE CONFIG
  local recreate=0
  if [[ "${1:-}" == --recreate ]]; then
    recreate=1
    shift
  fi
  workdir >/dev/null
  TPU_STATE=UNKNOWN
  ((recreate)) || tpu_state
  local state="$TPU_STATE"
  case "$state" in
    CREATING | STARTING | RESTARTING | REPAIRING)
      info "TPU $TPU_NAME is $state: try again when it is READY"
      return
      ;;
  esac
  if [[ "$state" == READY ]]; then
    local rc=0
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=0 "${SSH_FLAGS[@]}" \
      "--command=$(worker_cmd check "$RUN_NAME")" || rc=$?
    case "$rc" in
      0)
        info "run $RUN_NAME is still running: nothing to do"
        return
        ;;
      3)
        info "run $RUN_NAME finished: nothing to do"
        return
        ;;
    esac
    info "run $RUN_NAME is not running on a READY TPU: launching it again"
    cmd_stop
  else
    info "TPU $TPU_NAME is $state: (re)creating it"
    if [[ "$state" != NOT_FOUND ]]; then
      cmd_delete || info "nothing to delete"
    elif [[ "$QUEUED" == 1 ]]; then
      # A preempted queued resource outlives its TPU VM.
      cmd_delete 2>/dev/null || true
    fi
    cmd_create
    cmd_setup
    if [[ -n "$DATA_PREFIX" ]]; then
      cmd_copy_data
    fi
  fi
  cmd_launch "$@"
}

cmd_ssh() {
  require ZONE TPU_NAME
  local worker="${1:-0}"
  if (($# >= 2)); then
    shift
    tpu_ssh "$worker" "$*"
  else
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" "--worker=$worker" "${SSH_FLAGS[@]}"
  fi
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

main() {
  local args=() arg seen_dashdash=0 dry_run_flag=0
  for arg in "$@"; do
    if [[ "$arg" == --dry-run && "$seen_dashdash" == 0 ]]; then
      dry_run_flag=1
    else
      [[ "$arg" == -- ]] && seen_dashdash=1
      args+=("$arg")
    fi
  done
  set -- "${args[@]}"
  if (($# == 0)) || [[ "$1" == -h || "$1" == --help || "$1" == help ]]; then
    usage
    (($# > 0)) || exit 2
    return
  fi
  load_settings
  if ((dry_run_flag)); then
    DRY_RUN=1
  fi
  gcloud_flags
  local cmd="$1"
  shift
  [[ "${1:-}" == -- ]] && shift
  case "$cmd" in
    create) cmd_create "$@" ;;
    setup) cmd_setup "$@" ;;
    copy-data) cmd_copy_data "$@" ;;
    launch) cmd_launch "$@" ;;
    logs) cmd_logs "$@" ;;
    status) cmd_status "$@" ;;
    stop) cmd_stop "$@" ;;
    delete) cmd_delete "$@" ;;
    resume | relaunch) cmd_resume "$@" ;;
    ssh) cmd_ssh "$@" ;;
    *) die "unknown command '$cmd' (try: tpu/tpu.sh --help)" ;;
  esac
}

main "$@"
