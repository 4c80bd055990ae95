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
  logs = "".join(open(os.path.join(workdir, "logs", f)).read()[-3000:]
                 for f in sorted(os.listdir(os.path.join(workdir, "logs"))))
  return proc, logs


FLAGS = ("--config.train.num_steps=8", "--config.train.log_every=1",
         "--config.train.checkpoint_every=8", "--config.train.preview_every=0",
         "--config.optim.warmup_steps=1", "--config.mesh.data=4", "--config.mesh.fsdp=2",
         "--config.mesh.fsdp_min_size=64")


def test_two_processes_train_like_one_process_with_fsdp_across_them(tmp_path):
  proc, logs = local_sh(2, "ddpm_cifar10:tiny", tmp_path / "mp", *FLAGS)
  assert proc.returncode == 0, logs
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
