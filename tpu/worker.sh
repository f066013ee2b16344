#!/usr/bin/env bash
# Runs on every TPU VM worker; `tpu/tpu.sh` calls it over `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   worker.sh install                    Python venv + project + jax[tpu] (+ gcsfuse when BUCKET is set)
#   worker.sh fetch-data SRC DST         gcloud storage rsync -r SRC DST
#   worker.sh start RUN [MAIN_ARGS...]   python -m mini_o3_jax.main MAIN_ARGS, detached, logs to LOG_DIR/RUN.log
#   worker.sh stop RUN                   TERM (then KILL) the run's process group
#   worker.sh status RUN                 running / exit code, and the log's last lines
#   worker.sh logs RUN                   follow the log (tail -F)
#   worker.sh check RUN                  exit 0 if running, 3 if it finished with exit code 0, else 1
#
# Settings (environment): VENV, PYTHON_VERSION, JAX_TPU_SPEC, LOG_DIR, BUCKET, MOUNT_DIR, PYTHON (tests).
# The repository root is the parent of this script's directory; `start` runs from there, so relative
# config paths (configs/x.py) resolve against the checkout.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$HOME/mini_o3_venv}"
PYTHON="${PYTHON:-$VENV/bin/python}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
LOG_DIR="${LOG_DIR:-$HOME/mini_o3_logs}"
BUCKET="${BUCKET:-}"
MOUNT_DIR="${MOUNT_DIR:-/mnt/gcs}"

die() {
  echo "worker.sh: $*" >&2
  exit 1
}

log() {
  echo "[worker $HOSTNAME] $*"
}

# The jax[tpu] requirement matching the jax pin in requirements.txt.
jax_tpu_spec() {
  if [[ -n "${JAX_TPU_SPEC:-}" ]]; then
    echo "$JAX_TPU_SPEC"
    return
  fi
  local version
  version="$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' "$REPO_DIR/requirements.txt")"
  [[ -n "$version" ]] || die "no 'jax==X' pin in $REPO_DIR/requirements.txt; set JAX_TPU_SPEC"
  echo "jax[tpu]==$version"
}

install_gcsfuse() {
  command -v gcsfuse >/dev/null && return
  log "installing gcsfuse"
  local codename keyring=/usr/share/keyrings/cloud.google.asc
  codename="$(lsb_release -c -s)"
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "$keyring" >/dev/null
  echo "deb [signed-by=$keyring] https://packages.cloud.google.com/apt gcsfuse-$codename main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -q
  sudo apt-get install -y -q gcsfuse
}

cmd_install() {
  # The TPU VM images ship Python 3.10; the project needs >= 3.11. uv fetches a standalone Python.
  if ! command -v uv >/dev/null && [[ ! -x "$HOME/.local/bin/uv" ]]; then
    log "installing uv"
    python3 -m pip install --user --quiet uv ||
      python3 -m pip install --user --quiet --break-system-packages uv
  fi
  local uv
  uv="$(command -v uv || echo "$HOME/.local/bin/uv")"
  [[ -x "$VENV/bin/python" ]] || "$uv" venv --python "$PYTHON_VERSION" "$VENV"
  local spec
  spec="$(jax_tpu_spec)"
  log "installing the project, $spec and gcsfs into $VENV"
  # gcsfs: etils.epath (Orbax's directories, our HF export) reaches gs:// paths through fsspec.
  "$uv" pip install --python "$VENV/bin/python" -r "$REPO_DIR/requirements.txt" -e "$REPO_DIR" "$spec" gcsfs
  if [[ -n "$BUCKET" ]]; then
    install_gcsfuse
    sudo mkdir -p "$MOUNT_DIR"
    sudo chown "$(id -u):$(id -g)" "$MOUNT_DIR"
  fi
  # On a slice this runs on every worker at once, as JAX's multi-host start-up needs.
  timeout 600 "$VENV/bin/python" -c 'import jax; print("jax", jax.__version__, jax.local_devices())' ||
    log "warning: JAX could not list the TPU devices (see above)"
}

cmd_fetch_data() {
  (($# == 2)) || die "usage: worker.sh fetch-data SRC DST"
  mkdir -p "$2"
  log "gcloud storage rsync -r $1 $2"
  gcloud storage rsync -r "$1" "$2"
}

mount_bucket() {
  [[ -n "$BUCKET" ]] || return 0
  mountpoint -q "$MOUNT_DIR" && return 0
  log "mounting gs://$BUCKET at $MOUNT_DIR"
  mkdir -p "$MOUNT_DIR"
  # Orbax finalises every checkpoint step by renaming its temporary directory; on a bucket with a flat
  # namespace gcsfuse refuses directory renames unless rename-dir-limit admits them (it then copies
  # and deletes each object; a hierarchical-namespace bucket renames atomically).
  gcsfuse --implicit-dirs --rename-dir-limit=200000 "$BUCKET" "$MOUNT_DIR"
}

# The pid of a live run (its process group), or nothing.
live_pid() {
  local pid_file="$LOG_DIR/$1.pid"
  [[ -f "$pid_file" ]] || return 0
  local pid
  pid="$(cat "$pid_file")"
  if kill -0 "$pid" 2>/dev/null; then
    echo "$pid"
  fi
}

cmd_start() {
  (($# >= 1)) || die "usage: worker.sh start RUN [MAIN_ARGS...]"
  local run="$1"
  shift
  mkdir -p "$LOG_DIR"
  local pid
  pid="$(live_pid "$run")"
  [[ -z "$pid" ]] || die "run '$run' is already running (pid $pid); stop it first"
  rm -f "$LOG_DIR/$run.exit"
  # setsid: the run gets its own process group, so `stop` reaches every child.
  nohup setsid bash "$REPO_DIR/tpu/worker.sh" _run "$run" "$@" >>"$LOG_DIR/$run.log" 2>&1 </dev/null &
  echo "$!" >"$LOG_DIR/$run.pid"
  log "started '$run' (pid $!), log $LOG_DIR/$run.log"
}

# The detached body of `start`: mount, run the main command, record its exit code.
cmd_run() {
  local run="$1"
  shift
  cd "$REPO_DIR"
  echo "=== $(date -u +%FT%TZ) $HOSTNAME: $PYTHON -m mini_o3_jax.main $*"
  mount_bucket
  local rc=0
  "$PYTHON" -m mini_o3_jax.main "$@" || rc=$?
  # The log line first: the .exit file is what marks the run finished.
  echo "=== $(date -u +%FT%TZ) exit code $rc"
  echo "$rc" >"$LOG_DIR/$run.exit"
  return "$rc"
}

cmd_stop() {
  (($# == 1)) || die "usage: worker.sh stop RUN"
  local pid
  pid="$(live_pid "$1")"
  if [[ -z "$pid" ]]; then
    log "run '$1' is not running"
    return 0
  fi
  log "stopping '$1' (process group $pid)"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  local _
  for _ in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$LOG_DIR/$1.pid"
}

cmd_status() {
  (($# == 1)) || die "usage: worker.sh status RUN"
  local pid
  pid="$(live_pid "$1")"
  if [[ -n "$pid" ]]; then
    log "run '$1': running (pid $pid)"
  elif [[ -f "$LOG_DIR/$1.exit" ]]; then
    log "run '$1': exited with code $(cat "$LOG_DIR/$1.exit")"
  else
    log "run '$1': not running"
  fi
  if [[ -f "$LOG_DIR/$1.log" ]]; then
    tail -n "${TAIL_LINES:-5}" "$LOG_DIR/$1.log"
  fi
}

cmd_logs() {
  (($# == 1)) || die "usage: worker.sh logs RUN"
  [[ -f "$LOG_DIR/$1.log" ]] || die "no log $LOG_DIR/$1.log on $HOSTNAME"
  tail -n "${TAIL_LINES:-100}" -F "$LOG_DIR/$1.log"
}

cmd_check() {
  (($# == 1)) || die "usage: worker.sh check RUN"
  [[ -z "$(live_pid "$1")" ]] || return 0
  [[ "$(cat "$LOG_DIR/$1.exit" 2>/dev/null)" != 0 ]] || return 3
  return 1
}

main() {
  (($# >= 1)) || die "usage: worker.sh install|fetch-data|start|stop|status|logs|check ..."
  local cmd="$1"
  shift
  case "$cmd" in
    install) cmd_install "$@" ;;
    fetch-data) cmd_fetch_data "$@" ;;
    start) cmd_start "$@" ;;
    _run) cmd_run "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    logs) cmd_logs "$@" ;;
    check) cmd_check "$@" ;;
    *) die "unknown command '$cmd'" ;;
  esac
}

main "$@"
