import functools
import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import load_config
from difflax import cascade
from difflax import checkpoint as ckpt_lib
from difflax import data as data_lib
from difflax import diffusion as D
from difflax import samplers, schedules, train
from difflax.models.unet import UNet


def cond_cfg(**kw):
  c = dict(aug="gaussian", blur_sigma_min=0.4, blur_sigma_max=0.6, blur_prob=0.5, blur_kernel=3,
           schedule="linear", num_timesteps=100, train_level=-1, max_level=0, sample_level=0,
           sample_mode="non_truncated")
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_blur_matches_a_direct_convolution_with_the_normalised_gaussian():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 9, 9, 2)).astype(np.float32)
  sigma = np.array([0.4, 0.5, 1.3], np.float32)
  out = np.asarray(cascade.gaussian_blur(jnp.asarray(x), jnp.asarray(sigma)))
  for b in range(3):
    o = np.arange(-1, 2)
    k = np.exp(-(o[:, None] ** 2 + o[None] ** 2) / (2 * sigma[b] ** 2))
    k /= k.sum()
    for i in range(1, 8):
      for j in range(1, 8):
        want = np.einsum("uv,uvc->c", k, x[b, i - 1:i + 2, j - 1:j + 2])
        np.testing.assert_allclose(out[b, i, j], want, rtol=1e-5, atol=1e-5)
  ident = cascade.gaussian_blur(jnp.asarray(x), jnp.zeros(3))
  np.testing.assert_allclose(np.asarray(ident), x, atol=1e-6)
  np.testing.assert_allclose(np.asarray(cascade.gaussian_blur(jnp.asarray(x), 1e-3)), x, atol=1e-6)


def test_blur_augmentation_hits_about_the_configured_fraction():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4000, 4, 4, 1)), jnp.float32)
  for p in (0.5, 0.2):
    out, level = cascade.augment_condition(jax.random.key(2), x, cond_cfg(aug="blur", blur_prob=p))
    changed = np.abs(np.asarray(out - x)).reshape(4000, -1).max(1) > 1e-6
    assert abs(changed.mean() - p) < 0.03, (p, changed.mean())
    assert (np.asarray(level) == 0).all()
  out, _ = cascade.augment_condition(jax.random.key(2), x, cond_cfg(aug="none"))
  assert out is x


def test_gaussian_augmentation_amortizes_s_and_has_the_forward_marginal():
  cfg = cond_cfg(max_level=60)
  z0 = jnp.full((20000, 2, 2, 1), 0.7)
  z, level = cascade.augment_condition(jax.random.key(3), z0, cfg)
  s = np.round(np.asarray(level) * cfg.num_timesteps / cascade.MODEL_LEVEL_SCALE).astype(int)
  assert s.min() == 0 and s.max() == 60 and len(np.unique(s)) == 61
  unchanged = np.asarray(z)[s == 0]
  np.testing.assert_allclose(unchanged, 0.7, atol=1e-6)  # s = 0 is the clean z0.
  # Fixed s: z_s ~ N(sqrt(a) z0, 1 - a) with a = alpha_bar[s - 1] (non-truncated, Sec. 3.3).
  a = cascade.aug_alphas_cumprod(cfg)[39]
  z, level = cascade.augment_condition(jax.random.key(4), z0, cond_cfg(train_level=40))
  np.testing.assert_allclose(np.asarray(level), 400.0)
  assert abs(float(z.mean()) - np.sqrt(a) * 0.7) < 0.01
  assert abs(float(z.var()) - (1 - a)) < 0.01


def test_truncated_chain_stops_at_the_forward_marginal_of_level_s():
  """Sec. 3.2: the base chain stopped at s gives z_s ~ q(z_s) when the base model is exact (a
  Gaussian 'dataset' with its analytic denoiser), also on a respaced chain that includes s - 1."""
  mu, sd, T, s = 0.3, 0.2, 100, 30
  betas = schedules.linear_betas(T)
  acp = np.cumprod(1 - betas)

  def eps(x, t):
    a = jnp.asarray(acp, jnp.float32)[t.astype(jnp.int32)].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * sd ** 2 + 1 - a)

  a = acp[s - 1]
  for kept in (list(range(T)), sorted(set(schedules.space_timesteps(T, "20")) | {s - 1})):
    d = D.build(betas, timesteps=kept)
    fn = jax.jit(functools.partial(samplers.sample, eps, d, (20000, 1, 1, 1), method="ddpm",
                                   clip_denoised=False, stop_at=kept.index(s - 1)))
    z = np.asarray(fn(jax.random.key(5))).ravel()
    assert abs(z.mean() - np.sqrt(a) * mu) < 0.01
    assert abs(z.var() - (a * sd ** 2 + 1 - a)) < 0.02 * (a * sd ** 2 + 1 - a)


def test_sr_model_receives_s_through_its_embedding():
  model = UNet(ch=8, ch_mult=(1, 2), attn_resolutions=(), num_groups=4, aug_level_cond=True)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 8, 8, 3)), jnp.float32)
  low = jnp.asarray(np.random.default_rng(7).normal(size=(2, 4, 4, 3)), jnp.float32)
  t = jnp.array([10.0, 10.0])
  params = model.init(jax.random.key(0), x, t, low_res=low, aug_level=t)["params"]
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # Zero-init output: perturb.
  out = lambda s, lr=low: model.apply({"params": params}, x, t, low_res=lr, aug_level=s)
  assert not np.allclose(out(jnp.array([0.0, 0.0])), out(jnp.array([500.0, 500.0])), atol=1e-5)
  assert not np.allclose(out(t), out(t, low * 0), atol=1e-5)  # The image matters too.


def test_data_serves_consistent_high_and_low_res_pairs():
  c = load_config("cascade_32_64", "tiny")
  d = cascade.stage_config(c, "sr_64").data
  batch = next(data_lib.host_batches(d, seed=0))
  assert batch["image"].shape == (8, 16, 16, 3) and batch["low_res"].shape == (8, 8, 8, 3)
  np.testing.assert_allclose(batch["low_res"], batch["image"].reshape(8, 8, 2, 8, 2, 3)
                             .mean(axis=(2, 4)), atol=1e-6)


def test_stage_whose_resolution_does_not_match_its_predecessor_fails_at_load():
  c = load_config("cascade_32_64", "tiny")
  c.unlock()
  c.stages.sr_64.data.low_res = 4
  with pytest.raises(ValueError, match="does not match the output of the previous stage"):
    cascade.validate(c)
  c.stages.sr_64.data.low_res = 8
  c.cascade.stage = "sr_128"
  with pytest.raises(ValueError, match="is not a stage"):
    cascade.validate(c)


def test_kill_in_stage_two_resumes_it_without_retraining_stage_one(tmp_path, monkeypatch):
  c = load_config("cascade_32_64", "tiny")
  for st in c.stages.values():
    st.train.update(preview_every=0, checkpoint_every=100)
  real = data_lib.make_iterator

  def sigterm_in_sr(config, *args, **kwargs):
    for i, batch in enumerate(real(config, *args, **kwargs)):
      if config.low_res and i == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  monkeypatch.setattr(data_lib, "make_iterator", sigterm_in_sr)
  out = train.run(c, str(tmp_path))
  assert out["base"]["step"] == 4 and out["sr_64"]["step"] == 3
  base_ckpt = tmp_path / "base" / "checkpoints"
  stamp = {p: os.stat(base_ckpt / p).st_mtime_ns for p in os.listdir(base_ckpt)}
  monkeypatch.setattr(data_lib, "make_iterator", real)
  out = train.run(c, str(tmp_path))
  assert out["base"] == {"step": 4} and out["sr_64"]["step"] == 4  # Base: nothing to do.
  assert {p: os.stat(base_ckpt / p).st_mtime_ns for p in os.listdir(base_ckpt)} == stamp
  sr = ckpt_lib.Checkpointer(str(tmp_path / "sr_64" / "checkpoints"))
  assert sr.latest_step() == 4
  # Truncated sampling reruns the base chain and stops at z_s.
  c.stages.sr_64.cond.sample_mode = "truncated"
  result = train.run(c, str(tmp_path), mode="sample")
  assert "truncated-s10" in result["dir"] and os.path.exists(result["png"])
  sweep = train.run(c, str(tmp_path), mode="sweep")
  assert [r["s"] for r in sweep["rows"]] == [0, 10, 50] and os.path.exists(sweep["png"])
  assert json.load(open(tmp_path / "sweep" / "sweep.json"))["stage"] == "sr_64"
  # The stored base samples are named by what drew them (sampler, guidance), like the pipeline.
  assert os.path.basename(sweep["base_samples"]).endswith("_w0_seed0_n8.npz")
  # --config.cascade.stage=<name> --mode=sample samples that stage alone, into its own workdir.
  for name, res in (("base", 8), ("sr_64", 16)):  # :tiny's resolutions.
    c.cascade.stage = name
    one = train.run(c, str(tmp_path), mode="sample")
    assert one["step"] == 4 and one["png"].startswith(str(tmp_path / name / "samples"))
    assert np.load(one["npz"])["images"].shape[1:] == (res, res, 3)
