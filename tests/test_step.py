import re

import jax
import numpy as np

from difflax import data
from difflax import experiment
from difflax import state as state_lib
from difflax import step as step_lib


def fresh_step(c):
  """(initial state, jitted train step) of config `c` on one device."""
  exp = experiment.setup(c, "/nonexistent", devices=jax.devices()[:1])
  return experiment.init_state(exp), jax.jit(step_lib.make_train_step(exp))


def test_loss_on_a_fixed_batch_decreases(tiny_config):
  c = tiny_config
  c.optim.update(lr=3e-3, warmup_steps=1)
  c.loss.type = "hybrid"
  c.diffusion.var_type = "learned_range"
  state, step = fresh_step(c)
  images, labels = data.embedded_dataset(8, 8)
  batch = {"image": images.astype(np.float32) / 127.5 - 1, "label": labels}
  history = []
  for _ in range(80):
    state, m = step(state, batch)
    history.append(float(m["loss"]))
  assert int(state.step) == 80 and np.isfinite(history).all()
  assert np.mean(history[-10:]) < 0.6 * np.mean(history[:10]), history
  assert {"mse", "vb", "grad_norm", "lr"} <= set(m)
  # EMA moved towards the params but lags them.
  p, e = jax.tree_util.tree_leaves(state.params)[0], jax.tree_util.tree_leaves(state.ema_params)[0]
  assert not np.allclose(p, e)


def test_ema_decay_warmup():
  np.testing.assert_allclose(state_lib.ema_decay_at(0, 0.999, True), 0.1)
  np.testing.assert_allclose(state_lib.ema_decay_at(10**6, 0.999, True), 0.999)
  np.testing.assert_allclose(state_lib.ema_decay_at(0, 0.9999, False), 0.9999)


def test_gradient_accumulation_takes_the_one_pass_step_with_paper_002_objectives(tiny_config):
  """Importance-sampled t (a warm, far-from-uniform history) and IWDiff (k=2): the step in 2
  or 4 micro-batches makes the same update and the same history update as in one pass. Adam's
  eps is 1 so its first update is about 0.1 lr g (at the usual eps it is lr * sign(g), which
  hides gradient differences)."""
  c = tiny_config
  c.diffusion.update(num_timesteps=8, schedule="cosine")
  c.loss.update(timestep_sampler="importance", resampler_history=2, iwdiff_k=2)
  c.optim.update(warmup_steps=1, eps=1.0, lr=1.0, grad_clip=0.0)
  state, _ = fresh_step(c)
  hist = np.linspace(0.1, 3.0, 16, dtype=np.float32).reshape(8, 2)
  state = state.replace(resampler={"losses": hist, "count": np.full((8,), 2, np.int32)})
  images, labels = data.embedded_dataset(8, 8)
  batch = {"image": images.astype(np.float32) / 127.5 - 1, "label": labels}
  out = {}
  for accum in (1, 2, 4):
    c.optim.grad_accum = accum
    step = fresh_step(c)[1]
    if accum == 1:  # The optimizer's first step has lr 0 (warm-up): compare second steps.
      state = jax.device_get(step(state, batch)[0])
    out[accum] = step(state, batch)
  (ref, ref_m) = out[1]
  delta = lambda s: [np.asarray(a) - np.asarray(b) for a, b in
                     zip(jax.tree_util.tree_leaves(s.params),
                         jax.tree_util.tree_leaves(state.params))]
  assert max(float(np.abs(d).max()) for d in delta(ref)) > 0
  assert ref_m["iwdiff_max_weight"] > 0.5 and "loss_unweighted" in ref_m
  for accum in (2, 4):
    got, got_m = out[accum]
    np.testing.assert_allclose(got_m["loss"], ref_m["loss"], rtol=1e-5)
    for a, b in zip(delta(ref), delta(got)):
      np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * float(np.abs(a).max()) + 1e-12)
    np.testing.assert_array_equal(got.resampler["count"], ref.resampler["count"])
    np.testing.assert_allclose(got.resampler["losses"], ref.resampler["losses"], rtol=1e-5)
  assert int(ref.resampler["count"].sum()) == 16 + 8 + 8  # Each step recorded its 8 losses.


def test_bfloat16_compute_trains_close_to_float32(tiny_config):
  """model.dtype=bfloat16: params, EMA and Adam moments stay float32, the loss is float32, and
  8 steps on a fixed batch follow the float32 run (bf16 has an 8-bit mantissa: ~0.4 % per
  rounding, so the losses agree to a few percent, the params to a few percent of their change)."""
  c = tiny_config
  c.optim.update(lr=3e-3, warmup_steps=1)
  images, labels = data.embedded_dataset(8, 8)
  batch = {"image": images.astype(np.float32) / 127.5 - 1, "label": labels}
  runs = {}
  for dtype in ("float32", "bfloat16"):
    c.model.dtype = dtype
    state, step = fresh_step(c)
    init = jax.device_get(state.params)
    history = []
    for _ in range(8):
      state, m = step(state, batch)
      history.append(m["loss"])
    runs[dtype] = (init, jax.device_get(state), np.asarray(history))
  (init, fp32, l32), (_, bf16, l16) = runs["float32"], runs["bfloat16"]
  assert {x.dtype for x in jax.tree_util.tree_leaves((bf16.params, bf16.ema_params,
                                                      bf16.opt_state))} <= {np.dtype(np.float32), np.dtype(np.int32)}
  assert l16.dtype == np.float32 and np.isfinite(l16).all()
  np.testing.assert_allclose(l16, l32, rtol=0.05)
  moved = lambda s: np.concatenate([np.ravel(a - b) for a, b in zip(
      jax.tree_util.tree_leaves(s.params), jax.tree_util.tree_leaves(init))])
  d32, d16 = moved(fp32), moved(bf16)
  assert np.linalg.norm(d16 - d32) < 0.1 * np.linalg.norm(d32)


def test_remat_changes_memory_not_math(tiny_config):
  """model.remat="dots" / "full" recompute blocks in the backward pass: the parameter tree is the
  same (checkpoints move between settings) and two train steps with dropout on give the same
  loss, gradient norm and parameters as without remat, to float32 rounding."""
  c = tiny_config
  c.model.dropout = 0.3  # Dropout masks must be drawn identically in the recomputation.
  c.optim.update(lr=3e-3, warmup_steps=1)
  images, labels = data.embedded_dataset(8, 8)
  batch = {"image": images.astype(np.float32) / 127.5 - 1, "label": labels}
  runs = {}
  for remat in ("none", "dots", "full"):
    c.model.remat = remat
    state, step = fresh_step(c)
    jaxpr = str(jax.make_jaxpr(step)(state, batch))  # The blocks are rematerialised:
    assert bool(re.search(r"\b(remat\d*|checkpoint)\[", jaxpr)) == (remat != "none"), remat
    metrics = []
    for _ in range(2):
      state, m = step(state, batch)
      metrics.append((float(m["loss"]), float(m["grad_norm"])))
    runs[remat] = (jax.device_get(state.params), np.asarray(metrics))
  ref_params, ref_metrics = runs["none"]
  for remat in ("dots", "full"):
    params, metrics = runs[remat]
    assert (jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(ref_params))
    np.testing.assert_allclose(metrics, ref_metrics, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
