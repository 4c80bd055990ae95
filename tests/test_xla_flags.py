"""difflax's XLA:CPU default (xla_flags.py): when it is added to XLA_FLAGS, and that the train
step computes the same with and without it."""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO
from difflax import xla_flags


def test_the_convolution_default_is_added_only_where_it_applies():
  on = xla_flags.cpu_defaults({}, jaxlib="0.10.2")
  assert on == xla_flags.FLAG
  keep = "--xla_force_host_platform_device_count=8"
  assert xla_flags.cpu_defaults({"XLA_FLAGS": keep}, jaxlib="0.10.2") == f"{keep} {xla_flags.FLAG}"
  assert xla_flags.cpu_defaults({"JAX_PLATFORMS": "cpu"}, jaxlib="0.10.2") == xla_flags.FLAG
  # The user's own setting of that flag wins, whatever its value.
  mine = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
  assert xla_flags.cpu_defaults({"XLA_FLAGS": mine}, jaxlib="0.10.2") is None
  # Not for accelerators only, not when switched off, not for unmeasured jaxlib builds.
  assert xla_flags.cpu_defaults({"JAX_PLATFORMS": "tpu"}, jaxlib="0.10.2") is None
  assert xla_flags.cpu_defaults({"JAX_PLATFORMS": "cuda,cpu"}, jaxlib="0.10.2") is not None
  assert xla_flags.cpu_defaults({"DIFFLAX_XLA_DEFAULTS": "0"}, jaxlib="0.10.2") is None
  assert xla_flags.cpu_defaults({}, jaxlib="0.11.0") is None
  # This test process imported difflax before its backend started: the default is in effect
  # beside the tests' own fast-compile flags.
  if xla_flags._jaxlib_version().startswith(xla_flags.MEASURED_JAXLIB):
    assert xla_flags.FLAG in os.environ["XLA_FLAGS"]
    assert "--xla_backend_optimization_level=0" in os.environ["XLA_FLAGS"]


STEP = """
import json, jax, numpy as np, os
from difflax import config as config_lib, experiment, data
c = config_lib.load("ddpm_cifar10:tiny")
exp = experiment.setup(c, "unused")
state = experiment.init_state(exp)
batch = next(data.make_iterator(c.data, exp.mesh, seed=0))
step = experiment.compile_train_step(exp, batch)
for _ in range(2):
  state, m = step(state, batch)
leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))
print(json.dumps({"flags": os.environ["XLA_FLAGS"], "loss": float(m["loss"]),
                  "grad_norm": float(m["grad_norm"]),
                  "params": [float(np.abs(l).sum()) for l in leaves]}))
"""


def test_train_steps_agree_with_and_without_the_default():
  base = os.environ["XLA_FLAGS"].replace(xla_flags.FLAG, "").strip()
  runs = {}
  for name, extra in (("on", {}), ("off", {"DIFFLAX_XLA_DEFAULTS": "0"})):
    env = dict(os.environ, XLA_FLAGS=base, PYTHONPATH=REPO, **extra)
    proc = subprocess.run([sys.executable, "-c", STEP], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
  on, off = runs["on"], runs["off"]
  if xla_flags._jaxlib_version().startswith(xla_flags.MEASURED_JAXLIB):
    assert xla_flags.FLAG in on["flags"] and xla_flags.FLAG not in off["flags"]
  np.testing.assert_allclose(on["loss"], off["loss"], rtol=1e-5)
  np.testing.assert_allclose(on["grad_norm"], off["grad_norm"], rtol=1e-4)
  np.testing.assert_allclose(on["params"], off["params"], rtol=1e-4)


def test_libtpu_is_told_it_has_one_local_worker_only_off_tpu_machines():
  assert xla_flags.libtpu_defaults({}, has_tpu=False, has_libtpu=True) == {
      "TPU_WORKER_HOSTNAMES": "localhost"}
  assert xla_flags.libtpu_defaults({}, has_tpu=True, has_libtpu=True) == {}  # A TPU VM.
  assert xla_flags.libtpu_defaults({}, has_tpu=False, has_libtpu=False) == {}
  assert xla_flags.libtpu_defaults({"TPU_WORKER_HOSTNAMES": "w0,w1"}, False, True) == {}
