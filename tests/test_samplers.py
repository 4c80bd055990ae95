import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import diffusion as D
from difflax import samplers
from difflax import schedules

MU, SIGMA, T = 0.2, 0.3, 100
BETAS = schedules.linear_betas(T)
ACP = jnp.asarray(np.cumprod(1 - BETAS), jnp.float32)


def gaussian_eps(x, t_model):
  """E[eps | x_t] for data ~ N(MU, SIGMA^2): the exact optimal denoiser of the full chain."""
  a = ACP[t_model.astype(jnp.int32)].reshape(-1, *([1] * (x.ndim - 1)))
  return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * SIGMA ** 2 + 1 - a)


def run(d, key, n=4000, **kw):
  fn = jax.jit(functools.partial(samplers.sample, gaussian_eps, d, (n, 1, 1, 1),
                                 clip_denoised=False, **kw))
  return np.asarray(fn(key)).ravel()


def test_ddim_eta1_equals_ancestral_step_for_step():
  d = D.build(BETAS, var_type="fixed_small")
  key = jax.random.key(1)
  a = run(d, key, n=64, method="ddpm")
  b = run(d, key, n=64, method="ddim", eta=1.0)
  np.testing.assert_allclose(a, b, atol=2e-4)


def test_ddim_eta1_matches_ancestral_in_distribution():
  d = D.build(BETAS, var_type="fixed_small")
  a = run(d, jax.random.key(2), method="ddpm")
  b = run(d, jax.random.key(3), method="ddim", eta=1.0)
  for x in (a, b):
    assert abs(x.mean() - MU) < 0.03 and abs(x.std() - SIGMA) < 0.03
  assert abs(a.mean() - b.mean()) < 0.03 and abs(a.std() - b.std()) < 0.03


def test_respaced_chain_with_all_steps_equals_full_chain():
  full = D.build(BETAS)
  respaced = D.build(BETAS, timesteps=list(range(T)))
  np.testing.assert_array_equal(respaced.timestep_map, full.timestep_map)
  np.testing.assert_allclose(respaced.betas, full.betas, rtol=1e-6)
  key = jax.random.key(4)
  for method in ("ddpm", "ddim"):
    np.testing.assert_allclose(run(full, key, n=32, method=method),
                               run(respaced, key, n=32, method=method), atol=1e-5)


def test_respaced_ddim_converges_to_the_data_distribution_with_more_steps():
  errors = []
  for spec in ("ddim10", "ddim20", "ddim50"):
    d = D.build(BETAS, timesteps=schedules.space_timesteps(T, spec))
    assert d.num_timesteps == int(spec[4:])
    x = run(d, jax.random.key(5), method="ddim", eta=0.0)
    assert abs(x.mean() - MU) < 0.01  # Deterministic DDIM keeps the mean exactly (linear ODE).
    errors.append(abs(x.std() - SIGMA))
  assert errors[0] > errors[1] > errors[2], errors


def test_learned_variance_rescales_to_the_short_chain():
  kept = schedules.space_timesteps(T, "10")
  d = D.build(BETAS, var_type="learned_range", timesteps=kept)
  acp = np.cumprod(1 - BETAS)[kept]
  acp_prev = np.append(1.0, acp[:-1])
  new_betas = 1 - acp / acp_prev
  t = jnp.arange(1, 10)
  x = jnp.zeros((9, 1, 1, 1))
  lo = D.p_mean_variance(d, jnp.concatenate([x, -jnp.ones_like(x)], -1), x, t).log_variance
  hi = D.p_mean_variance(d, jnp.concatenate([x, jnp.ones_like(x)], -1), x, t).log_variance
  tilde = (1 - acp_prev) / (1 - acp) * new_betas
  np.testing.assert_allclose(np.exp(lo.ravel()), tilde[1:], rtol=1e-4)
  np.testing.assert_allclose(np.exp(hi.ravel()), new_betas[1:], rtol=1e-4)


def test_samplers_are_vmappable_and_unknown_names_fail():
  d = D.build(BETAS, timesteps=schedules.space_timesteps(T, "5"))
  keys = jax.random.split(jax.random.key(0), 3)
  out = jax.vmap(lambda k: samplers.sample(gaussian_eps, d, (2, 1, 1, 1), k, method="ddpm"))(keys)
  assert out.shape == (3, 2, 1, 1, 1) and bool(jnp.isfinite(out).all())
  with pytest.raises(ValueError, match="ddim"):
    samplers.get_sampler("euler")


def test_classifier_free_guidance_combines_eps_and_keeps_variance():
  def apply_fn(x, t, y):  # eps = label; variance channel = 10 * label
    y = y.astype(jnp.float32)[:, None, None, None]
    return jnp.concatenate([jnp.broadcast_to(y, x.shape), jnp.broadcast_to(10 * y, x.shape)], -1)
  x = jnp.zeros((2, 1, 1, 1))
  t = jnp.zeros((2,), jnp.int32)
  labels = jnp.array([3, 4])
  out = samplers.classifier_free_guidance(apply_fn, labels, 7, 2.0, 1)(x, t)
  np.testing.assert_allclose(out[:, 0, 0, 0], 3 * labels - 2 * 7)  # (1+w) c - w u
  np.testing.assert_allclose(out[:, 0, 0, 1], 10 * labels)
  out0 = samplers.classifier_free_guidance(apply_fn, labels, 7, 0.0, 1)(x, t)
  np.testing.assert_allclose(out0[:, 0, 0, 0], labels)


def gaussian_eps_for(alpha_bar_of_model_time):
  def eps(x, t_model):
    a = alpha_bar_of_model_time(t_model).reshape(-1, *([1] * (x.ndim - 1)))
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * SIGMA ** 2 + 1 - a)
  return eps


def frechet_1d(x):
  return (x.mean() - MU) ** 2 + (x.std() - SIGMA) ** 2


def test_continuous_ddim_with_1000_steps_agrees_with_the_discrete_sampler():
  gamma = schedules.get_gamma("cosine", start=0.2)
  den = gaussian_eps_for(lambda mt: gamma(mt / 1000.0))
  key = jax.random.key(7)
  cont = {}
  for steps in (10, 1000):
    d = D.from_gamma(gamma, steps)
    fn = jax.jit(functools.partial(samplers.sample, den, d, (4000, 1, 1, 1), method="ddim",
                                   clip_denoised=False))
    cont[steps] = np.asarray(fn(key)).ravel()
  disc_d = D.build(schedules.linear_betas(1000))
  disc_acp = jnp.asarray(np.cumprod(1 - schedules.linear_betas(1000)), jnp.float32)
  disc = np.asarray(jax.jit(functools.partial(
      samplers.sample, gaussian_eps_for(lambda mt: disc_acp[mt.astype(jnp.int32)]), disc_d,
      (4000, 1, 1, 1), method="ddim", clip_denoised=False))(key)).ravel()
  assert abs(cont[1000].mean() - disc.mean()) < 0.01 and abs(cont[1000].std() - disc.std()) < 0.01
  assert frechet_1d(cont[1000]) < frechet_1d(cont[10])  # More steps, closer to the truth.
  assert frechet_1d(cont[1000]) < 1e-3


def test_annealed_langevin_reaches_the_gaussian_and_improves_with_more_steps():
  from difflax import noise_scales
  sigmas = noise_scales.geometric_sigmas(1.0, 0.01, 20)
  # net(x, sigma) = sigma * grad log N(x; MU, SIGMA^2 + sigma^2): the exact noisy score.
  net = lambda x, s: -s.reshape(-1, 1, 1, 1) * (x - MU) / (SIGMA ** 2 + s.reshape(-1, 1, 1, 1) ** 2)
  fds = []
  for steps in (1, 10):
    eps = noise_scales.langevin_step_size(sigmas[0] / sigmas[1], sigmas[-1], steps)
    x = jax.jit(functools.partial(samplers.annealed_langevin, net, sigmas, (4000, 1, 1, 1),
                                  step_size=eps, steps_per_scale=steps))(jax.random.key(3))
    fds.append(frechet_1d(np.asarray(x).ravel()))
  assert fds[1] < fds[0] and fds[1] < 2e-3, fds


def test_continuous_chain_on_the_discrete_grid_reproduces_the_discrete_sampler():
  """A continuous gamma that passes through the discrete alpha-bars gives the discrete chain, so
  with a fixed denoiser DDPM and DDIM samples agree step for step (shared update math)."""
  acp = np.cumprod(1 - BETAS)
  gamma = lambda t: np.interp(t, np.arange(1, T + 1) / T, acp)
  cont = D.from_gamma(gamma, T)
  disc = D.build(BETAS)
  np.testing.assert_allclose(cont.alphas_cumprod, disc.alphas_cumprod, rtol=1e-6)
  fixed = lambda x, t: 0.5 * x  # Independent of the time input, which differs by convention.
  key = jax.random.key(11)
  for method in ("ddpm", "ddim"):
    a = samplers.sample(fixed, cont, (8, 2, 2, 1), key, method=method)
    b = samplers.sample(fixed, disc, (8, 2, 2, 1), key, method=method)
    np.testing.assert_allclose(a, b, atol=1e-5)


# ------------------------------------------------------------- Surrogate Diffusion (paper 002)
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_surrogate_start_at_t_equals_T_is_the_normal_sampler(method):
  """t_mid = T: x_T ~ q(x_T | x0~) is (up to sqrt(alpha-bar_T) ~ 0.006 of x0~) the prior's
  noise, and the chain from it is the full chain: the normal sampler from the same x_T."""
  d = D.build(BETAS, var_type="fixed_small")
  x0s = jnp.full((64, 1, 1, 1), 0.9)
  start = samplers.surrogate_start(jax.random.key(5), d, x0s, T)
  noise = jax.random.normal(jax.random.key(5), x0s.shape)
  bound = float(jnp.sqrt(ACP[-1])) * 0.9 + float(1 - jnp.sqrt(1 - ACP[-1])) * 4
  assert float(jnp.abs(start - noise).max()) < bound
  a = run(d, jax.random.key(6), n=64, method=method, x_T=start, start_at=T - 1)
  b = run(d, jax.random.key(6), n=64, method=method, x_T=start)
  np.testing.assert_array_equal(a, b)
  c = run(d, jax.random.key(6), n=64, method=method, x_T=noise)  # From the prior's noise.
  np.testing.assert_allclose(a, c, atol=0.05)


@pytest.mark.parametrize("method,respace", [("ddpm", None), ("ddim", None), ("ddim", "ddim50")])
def test_surrogate_start_with_small_t_mid_keeps_a_perfect_surrogate(method, respace):
  """A perfect surrogate (its samples are drawn from the data, N(MU, SIGMA^2)) started at
  t_mid = 3 of 100 (full or respaced chain): the chain only polishes them, so the output stays
  within 0.3 of the distance between independent samples (2 SIGMA / sqrt(pi)) of the
  surrogate's and keeps the data's distribution, with 3 (full) or 2 (ddim50) model
  evaluations instead of 100."""
  from difflax.processes import discrete
  d = D.build(BETAS, var_type="fixed_small",
              timesteps=schedules.space_timesteps(T, respace) if respace else None)
  steps = discrete.surrogate_steps(d, 3)
  assert steps == (3 if respace is None else 2)
  x0s = MU + SIGMA * jax.random.normal(jax.random.key(7), (4000, 1, 1, 1))
  calls = []

  def counted(x, t):
    calls.append(1)
    return gaussian_eps(x, t)
  start = samplers.surrogate_start(jax.random.key(8), d, x0s, steps)
  out = np.asarray(samplers.sample(counted, d, x0s.shape, jax.random.key(9), method=method,
                                   clip_denoised=False, x_T=start, start_at=steps - 1)).ravel()
  assert len(calls) == 1  # Traced once inside lax.scan: the scan has `steps` iterations.
  assert np.abs(out - np.asarray(x0s).ravel()).mean() < 0.3 * 2 * SIGMA / np.sqrt(np.pi)
  assert abs(out.mean() - MU) < 0.03 and abs(out.std() - SIGMA) < 0.03
  np.testing.assert_array_equal(samplers.surrogate_start(jax.random.key(8), d, x0s, 0), x0s)
  with pytest.raises(ValueError, match="t_mid"):
    samplers.surrogate_start(jax.random.key(8), d, x0s, d.num_timesteps + 1)
