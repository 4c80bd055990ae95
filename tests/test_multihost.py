"""Multi-process runs for real: 2 processes x 4 CPU devices on 127.0.0.1 (gloo collectives),
started through launch/local.sh, against the same config on 1 process x 8 devices."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from difflax import experiment
from difflax import train
from difflax import writers

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo test bed on Linux")


def local_sh(n, config, workdir, *flags, timeout=600):
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO)
  proc = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), str(n), config,
                         str(workdir), *flags], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)
  logs = "".join(open(os.path.join(workdir, "logs", f)).read()
                 for f in sorted(os.listdir(os.path.join(workdir, "logs"))))
  return proc, logs


FLAGS = ("--config.train.num_steps=8", "--config.train.log_every=1",
         "--config.train.checkpoint_every=8", "--config.train.preview_every=0",
         "--config.optim.warmup_steps=1", "--config.mesh.data=4", "--config.mesh.fsdp=2",
         "--config.mesh.fsdp_min_size=64")


def test_two_processes_train_like_one_process_with_fsdp_across_them(tmp_path):
  proc, logs = local_sh(2, "ddpm_cifar10:tiny", tmp_path / "mp", *FLAGS)
  assert proc.returncode == 0, logs[-5000:]
  assert "process 1 of 2, 4 local / 8 global devices" in logs
  # The same config on one process with 8 devices.
  c = load_config("ddpm_cifar10", "tiny")
  c.train.update(num_steps=8, log_every=1, checkpoint_every=8, preview_every=0)
  c.optim.warmup_steps = 1
  c.mesh.update(data=4, fsdp=2, fsdp_min_size=64)
  train.run(c, str(tmp_path / "sp"))
  loss = lambda w: [r["loss"] for r in writers.history(str(w)) if "loss" in r]
  want, got = loss(tmp_path / "sp"), loss(tmp_path / "mp")
  assert len(got) == 8
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The 2-process checkpoint restores on this single process (another topology) and matches.
  states = []
  for w in ("sp", "mp"):
    exp = experiment.setup(c, str(tmp_path / w))
    states.append(jax.device_get(experiment.restore_or_init(exp)[0]))
    exp.close()
  assert int(states[1].step) == 8
  for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(states[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """SIGTERM reaches process 1 only (one preempted host): both checkpoint one step and exit 0."""
  import signal
  import time
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO)
  workdir = tmp_path / "mp"
  flags = [f for f in FLAGS if "num_steps" not in f] + ["--config.train.num_steps=100000",
                                                         "--config.train.checkpoint_every=100000"]
  proc = subprocess.Popen(["bash", os.path.join(REPO, "launch", "local.sh"), "2",
                           "ddpm_cifar10:tiny", str(workdir), *flags], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  log1 = workdir / "logs" / "process_1.log"
  deadline = time.time() + 300
  while time.time() < deadline and "loss=" not in (log1.read_text() if log1.exists() else ""):
    time.sleep(1)  # Process 1 logs its metrics too (log lines only) once it trains.
  out = subprocess.run(["pgrep", "-f", "--", "--process_id=1"], capture_output=True, text=True)
  pids = [int(p) for p in out.stdout.split() if int(p) != proc.pid]
  assert pids, "process 1 not found"
  for pid in pids:
    os.kill(pid, signal.SIGTERM)
  assert proc.wait(timeout=300) == 0
  logs = [(workdir / "logs" / f"process_{i}.log").read_text() for i in range(2)]
  stopped = [l.split("Stopped at step ")[1].split()[0] for l in logs]
  assert stopped[0] == stopped[1]
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps == [int(stopped[0])]
