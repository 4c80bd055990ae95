import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO

from difflax import data
from difflax import experiment
from difflax import parallel


def run_steps(config, devices, num_steps=2):
  """Init + `num_steps` jitted train steps on a mesh over `devices`; returns (state, metrics)."""
  exp = experiment.setup(config, "/nonexistent", devices=devices)
  state, step, shardings = experiment.init_state(exp), experiment.jit_train_step(exp), exp.shardings
  it = data.make_iterator(config.data, exp.mesh, seed=0)
  metrics = None
  for _ in range(num_steps):
    state, metrics = step(state, next(it))
  return state, metrics, shardings


@pytest.fixture(scope="module")
def single_device_run():
  """6 steps on one device with warm-up 1, so the learning rate is at its peak from step 1 and
  every step moves the params, EMA and Adam moments (the equivalence below has signal), in 2
  micro-batches."""
  from conftest import load_config
  c = load_config("ddpm_cifar10", "tiny")
  c.model.class_conditional = True
  c.mesh.fsdp_min_size = 64
  c.optim.update(warmup_steps=1, lr=1e-2, grad_accum=2)
  # Paper 002's objectives ride along: importance-sampled t (a history that warms up in a few
  # steps, +1 refresh), IWDiff k=2; the loss history is compared like the params.
  c.diffusion.update(num_timesteps=8, schedule="cosine")
  c.loss.update(timestep_sampler="importance", resampler_history=2, resampler_extra_updates=1,
                iwdiff_k=2)
  init, _, _ = run_steps(c, jax.devices()[:1], num_steps=0)
  ref, ref_m, _ = run_steps(c, jax.devices()[:1], num_steps=6)
  return c, jax.device_get(init), jax.device_get(ref), ref_m


@pytest.mark.parametrize("data_axis,fsdp_axis", [(8, 1), (4, 2)])
def test_sharded_step_matches_single_device(single_device_run, data_axis, fsdp_axis):
  c, init, ref, ref_m = single_device_run
  c = c.copy_and_resolve_references()
  c.mesh.update(data=data_axis, fsdp=fsdp_axis)
  got, got_m, shardings = run_steps(c, jax.devices(), num_steps=6)
  if fsdp_axis > 1:  # Some parameters really are sharded over fsdp.
    specs = [s.spec for s in jax.tree_util.tree_leaves(shardings.params)]
    assert any("fsdp" in tuple(sp) for sp in specs)
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree_util.tree_leaves(init.params),
                           jax.tree_util.tree_leaves(ref.params))]
  assert np.median(moved) > 1e-3  # The comparison below is not of untouched initial values.
  assert int(got.step) == 6
  for part in ("params", "ema_params", "opt_state"):  # Adam's mu and nu included.
    for a, b in zip(jax.tree_util.tree_leaves(getattr(ref, part)),
                    jax.tree_util.tree_leaves(getattr(got, part))):
      # atol: 1 % of one Adam step at this lr. Adam's g / sqrt(v) turns the last-bit differences
      # of near-zero gradients (another reduction order) into differences of this size.
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-4,
                                 err_msg=part)
  np.testing.assert_allclose(ref_m["loss"], got_m["loss"], rtol=1e-5)
  # The loss history, updated inside the step from the losses of all devices, is the
  # one-device history: the same counts, the same losses to float rounding; replicated.
  assert int(ref.resampler["count"].sum()) == 6 * 16 and (ref.resampler["count"] >= 2).all()
  np.testing.assert_array_equal(got.resampler["count"], ref.resampler["count"])
  np.testing.assert_allclose(got.resampler["losses"], ref.resampler["losses"], rtol=1e-4)
  assert shardings.resampler["losses"].spec == P()
  assert float(got_m["loss"]) != float(got_m["loss_unweighted"])  # Importance weights active.


def test_partition_rule_and_mesh_errors(tiny_config):
  assert parallel.partition_spec("params/down_8/res_0/conv_0/kernel", (3, 3, 8, 16), 2, 10) == \
      P(None, None, None, "fsdp")
  assert parallel.partition_spec("params/out_norm_8/scale", (64,), 2, 10) == P()
  assert parallel.partition_spec("params/x/kernel", (3, 3), 2, 100) == P()  # Too small.
  assert parallel.partition_spec("params/x/kernel", (3, 5), 2, 1) == P()    # Not divisible.
  tiny_config.mesh.update(data=3, fsdp=2)
  with pytest.raises(ValueError, match="data=-1"):
    parallel.make_mesh(tiny_config.mesh)


def _affine(p, x):
  return (x.reshape(len(x), -1) @ p["w"]) + p["b"]


def test_map_batches_is_sharded_padded_and_equal_to_one_call():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(12, 5)).astype(np.float32), "b": np.float32(0.5)}
  x = rng.normal(size=(19, 2, 2, 3)).astype(np.float32)  # 19 = 2 full batches of 8 + 3.
  mesh = parallel.make_mesh(type("M", (), {"data": 4, "fsdp": 2})())
  got = parallel.map_batches(_affine, params, x, mesh, batch_size=8)
  np.testing.assert_allclose(got, _affine(params, x), rtol=1e-5, atol=1e-5)
  assert got.shape == (19, 5)
  compiled = parallel._sharded(_affine, mesh).lower(
      parallel.place(params, parallel.replicated(mesh)),
      parallel.place(x[:8], parallel.batch_sharding(mesh))).compile()
  assert compiled.output_shardings.spec == parallel.BATCH_SPEC  # Each device did its slice.
  with pytest.raises(ValueError, match="at least one"):
    parallel.map_batches(_affine, params, x[:0], mesh)


DETECT = ("import json; from difflax import parallel; "
          "print(json.dumps([parallel.resolve_distributed(m) for m in ('auto', 'off', 'on')]))")


def test_distributed_auto_follows_jax_cluster_environments(tmp_path):
  """--distributed=auto initialises where JAX's own cluster detection finds a multi-process
  job (SLURM's variables here, resolved without initialising) and never on one machine."""
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("SLURM_", "OMPI_", "TPU_WORKER", "JAX_COORDINATOR"))}
  slurm = dict(base, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="node[07-08]", SLURM_NTASKS="2",
               SLURM_PROCID="1", SLURM_LOCALID="0")
  single = dict(slurm, SLURM_NTASKS="1", SLURM_PROCID="0")
  out = {}
  for name, env in (("slurm", slurm), ("single", single), ("none", base)):
    proc = subprocess.run([sys.executable, "-c", DETECT], env=dict(env, PYTHONPATH=REPO),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["slurm"][0] == {"cluster": "SlurmCluster (2 processes)"}
  assert out["slurm"][1] is None  # off
  assert out["single"][0] is None and out["none"][0] is None  # One machine: never.
  assert out["none"][2] == {"cluster": "forced (--distributed=on)"}
  assert parallel.resolve_distributed("auto", "127.0.0.1:1234", 2, 0) == {
      "coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 0,
      "cluster": "explicit settings"}
