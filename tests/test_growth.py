import functools
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from difflax import data as data_lib
from difflax import experiment
from difflax import growth, models, parallel, train


def test_fade_weight_follows_eq_13_linear_and_abrupt():
  for t in (0, 25, 50, 75, 100, 150):
    x = min(t / 100, 1.0)
    want = math.sin((x + 0.7) / 1.7 * math.pi / 2)
    assert float(growth.fade_weight(t)) == pytest.approx(want, abs=1e-6)
    assert float(growth.fade_weight(t, kind="linear")) == pytest.approx(x, abs=1e-7)
    assert float(growth.fade_weight(t, kind="abrupt")) == 1.0
  assert float(growth.fade_weight(0)) == pytest.approx(0.6026, abs=1e-4)  # Not 0.1: see docs.
  assert float(growth.fade_weight(100)) == pytest.approx(1.0, abs=1e-7)
  assert float(growth.fade_weight(10, period=20, offset=0.0)) == pytest.approx(
      math.sin(math.pi / 4), abs=1e-6)
  with pytest.raises(ValueError, match="cubic"):
    growth.fade_weight(3, kind="cubic")


def test_surgery_keeps_old_leaves_adds_new_and_names_a_shape_mismatch():
  old = {"a": {"w": jnp.arange(3.0)}, "b": jnp.ones((2, 2)), "gone": jnp.zeros(1)}
  new = {"a": {"w": jnp.zeros(3)}, "b": jnp.zeros((2, 2)), "c": jnp.full((4,), 7.0)}
  out = growth.grow_params(old, new)
  assert set(out) == {"a", "b", "c"}
  np.testing.assert_array_equal(out["a"]["w"], old["a"]["w"])
  np.testing.assert_array_equal(out["b"], old["b"])
  np.testing.assert_array_equal(out["c"], new["c"])
  with pytest.raises(ValueError, match=r"params: b has shape \(2, 2\).*\(3, 2\)"):
    growth.grow_params(old, {"b": jnp.zeros((3, 2))})


def tiny(stages=(8, 16)):
  c = load_config("progressive_cifar10", "tiny")
  if stages == (8, 16):
    c.model.ch_mult = (1, 2)
    c.growth.update(resolutions=stages, stage_steps=(2,), fade_steps=2)
    c.train.update(num_steps=6, preview_every=0, checkpoint_every=100)
  return c


def test_growth_at_fade_zero_is_exactly_the_upsampled_old_network():
  c = tiny()
  old_m = models.build_model(c, growth.GrowthState(stage=0))
  new_m = models.build_model(c, growth.GrowthState(stage=1, fading=True))
  assert (old_m.skip_levels, new_m.skip_levels, new_m.fade) == (1, 0, True)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  t = jnp.array([3.0, 50.0])
  old_p = old_m.init(jax.random.key(1), x[:, ::2, ::2], t)["params"]
  old_p = jax.tree_util.tree_map(lambda p: p + 0.03, old_p)  # Zero-init heads: perturb.
  new_p = growth.grow_params(old_p, new_m.init(jax.random.key(2), x, t)["params"])
  assert "in_16" in new_p and "in_8" in new_p and "out_8" in new_p and "out_16" in new_p
  low = x.reshape(2, 8, 2, 8, 2, 3).mean(axis=(2, 4))
  want = jnp.repeat(jnp.repeat(old_m.apply({"params": old_p}, low, t), 2, 1), 2, 2)
  got = new_m.apply({"params": new_p}, x, t, fade_weight=0.0)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)  # Float reassociation only.
  half = new_m.apply({"params": new_p}, x, t, fade_weight=0.5)
  assert not np.allclose(half, want, atol=1e-4)  # The new level does contribute.


def test_optimizer_and_ema_state_survive_growth(tmp_path):
  c = tiny()
  s0 = experiment.setup(c, str(tmp_path), growth.GrowthState(stage=0))
  state = jax.jit(s0.init_fn)(s0.keys["init"])
  grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
  updates, opt = s0.optimizer.update(grads, state.opt_state, state.params)
  state = state.replace(opt_state=opt, ema_params=jax.tree_util.tree_map(
      lambda p: p + 1.0, state.params), step=jnp.int32(5))
  s1 = experiment.setup(c, str(tmp_path), growth.GrowthState(stage=1, stage_start=5, fading=True),
                   checkpointer=s0.checkpointer)
  fresh = jax.jit(s1.init_fn)(s1.keys["init"])
  grown, report = growth.grow_state(state, fresh)
  assert int(grown.step) == 5 and report["added"] and not report["dropped"]
  old_leaves = {jax.tree_util.keystr(p): v for p, v in
                jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
  fresh_leaves = {jax.tree_util.keystr(p): v for p, v in
                  jax.tree_util.tree_flatten_with_path(fresh.opt_state)[0]}
  for p, v in jax.tree_util.tree_flatten_with_path(grown.opt_state)[0]:
    k = jax.tree_util.keystr(p)
    want = old_leaves.get(k, fresh_leaves[k])  # Adam moments of kept params, zeros for new.
    np.testing.assert_array_equal(v, want)
  assert any(float(jnp.abs(v).max()) > 0 for v in old_leaves.values() if jnp.ndim(v) > 0)
  np.testing.assert_array_equal(grown.ema_params["mid_res_0"]["conv_0"]["kernel"],
                                state.ema_params["mid_res_0"]["conv_0"]["kernel"])
  np.testing.assert_array_equal(grown.ema_params["in_16"]["kernel"],
                                fresh.params["in_16"]["kernel"])  # New: EMA starts at init.
  # The step after a growth restarts the EMA's warm-up: decay (1 + 0) / (10 + 0) = 0.1, not
  # min(0.995, (1 + 5) / (10 + 5)) = 0.4 from the run's step count.
  batch = next(data_lib.host_batches(c.data, seed=0))
  stepped, _ = experiment.jit_train_step(s1)(  # It donates its state: step a copy.
      jax.tree_util.tree_map(jnp.copy, grown), parallel.host_to_global(batch, s1.mesh))
  for path in (("mid_res_0", "conv_0", "kernel"), ("in_16", "kernel")):
    get = lambda tree: functools.reduce(lambda t, k: t[k], path, tree)
    np.testing.assert_allclose(get(stepped.ema_params),
                               0.1 * get(grown.ema_params) + 0.9 * get(stepped.params),
                               rtol=1e-5, atol=1e-6)
  # The fade ends: the old input / output convolutions are dropped, nothing else changes.
  s2 = experiment.setup(c, str(tmp_path), growth.GrowthState(stage=1, stage_start=5),
                   checkpointer=s0.checkpointer)
  done, report = growth.grow_state(grown, jax.jit(s2.init_fn)(s2.keys["init"]))
  assert sorted({k.split("/")[0] for k in report["dropped"]}) == ["in_8", "out_8", "out_norm_8"]
  assert not report["added"]


def final_params(workdir):
  """(meta, params) of the latest checkpoint, restored into the architecture it records."""
  s = experiment.setup(load_config("progressive_cifar10", "tiny"), workdir)
  state, _ = experiment.restore_or_init(s)
  meta = s.checkpointer.read_meta()
  s.checkpointer.close()
  return meta, jax.device_get(state.params)


def test_grows_twice_and_a_run_killed_mid_fade_resumes_bit_identically(tmp_path, monkeypatch,
                                                                       caplog):
  """(The CLI, previews and fsdp across processes: tests/test_multihost.py.)"""
  c = load_config("progressive_cifar10", "tiny")
  c.train.preview_every = 4  # Step 4 is a growth step (stage 2 starts after it).
  ref = tmp_path / "ref"
  with caplog.at_level("INFO"):
    train.run(c, str(ref))
  assert caplog.text.count("Growth at step") == 4  # Two growths, each with its fade's end.
  assert sorted(os.listdir(ref / "samples")) == ["step_000004.png", "step_000008.png"]
  c.train.preview_every = 0
  meta, want = final_params(str(ref))
  assert meta["resolution"] == 16 and meta["growth"]["stage"] == 2
  assert not meta["growth"]["fading"] and "in_16" in want and "in_8" not in want

  real = data_lib.make_iterator

  def sigterm_mid_fade(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == 2:  # Step 3 is the first step of the first fade (stage 1 starts after step 2).
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  monkeypatch.setattr(data_lib, "make_iterator", sigterm_mid_fade)
  out = train.run(c, str(tmp_path / "killed"))
  assert out["step"] == 3
  meta, _ = final_params(str(tmp_path / "killed"))
  assert meta["growth"] == {"stage": 1, "stage_start": 2, "fading": True}
  monkeypatch.setattr(data_lib, "make_iterator", real)
  assert train.run(c, str(tmp_path / "killed"))["step"] == 8
  _, got = final_params(str(tmp_path / "killed"))
  flat_w, flat_g = jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves_with_path(
      got)
  assert [p for p, _ in flat_w] == [p for p, _ in flat_g]
  for (p, a), (_, b) in zip(flat_w, flat_g):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(p))


def test_a_run_ending_on_its_growth_step_draws_the_quality_line_with_the_grown_network(
    tmp_path, caplog):
  c = load_config("progressive_cifar10", "tiny")
  c.train.update(num_steps=2, preview_every=2)  # Stage 0 ends, and the run with it, at step 2.
  c.eval.update(quality_line=True, feature_steps=20)
  with caplog.at_level("INFO"):
    out = train.run(c, str(tmp_path))
  assert "Growth at step 2" in caplog.text and "Quality of 16 samples at step 2" in caplog.text
  assert out["quality"]["num"] == 16 and np.isfinite(out["quality"]["quick_fd"])
  meta, params = final_params(str(tmp_path))
  assert meta["growth"] == {"stage": 1, "stage_start": 2, "fading": True} and "in_8" in params
  assert os.path.exists(tmp_path / "samples" / "step_000002.png")


def test_plateau_on_quick_fd_needs_the_quick_eval():
  from difflax import config as config_lib
  c = load_config("progressive_cifar10", "paper")
  assert c.growth.plateau_metric == "quick_fd"
  with pytest.raises(config_lib.ConfigError, match="eval.quick_fd=True"):
    config_lib.load("progressive_cifar10:paper", [("eval.quick_fd", "false")])


def test_schedule_budget_plateau_and_fade_boundaries():
  c = load_config("progressive_cifar10", "")  # 8 -> 16 -> 32, 400 steps per stage, fade 100.
  gs = growth.GrowthState()
  assert growth.next_state(c, gs, 399) == gs
  gs = growth.next_state(c, gs, 400)
  assert gs == growth.GrowthState(stage=1, stage_start=400, fading=True)
  assert growth.next_state(c, gs, 499) == gs
  gs = growth.next_state(c, gs, 500)
  assert gs == growth.GrowthState(stage=1, stage_start=400, fading=False)
  assert growth.next_state(c, gs, 800).stage == 2
  last = growth.GrowthState(stage=2, stage_start=800)
  assert growth.next_state(c, last, 10_000) == last  # The last stage never grows.
  c.growth.update(trigger="plateau", min_stage_steps=50)
  assert growth.next_state(c, growth.GrowthState(), 10, plateaued=True).stage == 0
  assert growth.next_state(c, growth.GrowthState(), 60, plateaued=True).stage == 1
  c.growth.fade_kind = "abrupt"
  assert not growth.next_state(c, growth.GrowthState(), 60, plateaued=True).fading
  tracker = growth.PlateauTracker(patience=3)
  assert [tracker.update(v) for v in (5, 4, 4.5, 4.2, 4.1)] == [False, False, False, False, True]
  assert growth.resolution(c, growth.GrowthState(stage=1)) == 16
  assert growth.model_kwargs(c, growth.GrowthState(stage=0)) == {"skip_levels": 2, "fade": False}


def test_forward_process_views_and_config_errors():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  c = load_config("progressive_cifar10", "")  # 8 -> 16 -> 32.
  gs = growth.GrowthState(stage=1)
  full = growth.stage_view(c, gs)
  np.testing.assert_array_equal(full.objective(x)[0, :, :, 0], [[5, 7], [13, 15]])
  assert full.data(x) is x and full.to_stage is full.objective
  c.growth.forward = "stage_res"
  area = growth.stage_view(c, gs)
  np.testing.assert_array_equal(area.data(x)[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
  assert area.objective is None and area.to_stage is area.data
  top = growth.stage_view(c, growth.GrowthState(stage=2))
  assert top.data(x) is x and top.objective is None
  # Sub-sampled i.i.d. unit noise stays i.i.d. unit noise: the stage sees a valid DDPM.
  z = growth.subsample(jax.random.normal(jax.random.key(0), (64, 32, 32, 1)), 4)
  assert abs(float(z.std()) - 1) < 0.02
  for field, value, match in (("resolutions", (8, 32), "doubling"),
                              ("resolutions", (8, 16), "ends at 16"),
                              ("fade_kind", "cubic", "fade_kind"),
                              ("forward", "half_res", "forward")):
    bad = load_config("progressive_cifar10", "")
    bad.growth[field] = value
    with pytest.raises(ValueError, match=match):
      growth.validate(bad)
  bad = load_config("progressive_cifar10", "")
  bad.model.project_downsample = False
  with pytest.raises(ValueError, match="project_downsample"):
    growth.validate(bad)
  static = load_config("progressive_cifar10", "static")
  assert not growth.enabled(static) and static.model.project_downsample
