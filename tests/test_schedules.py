import math

import numpy as np
import pytest

from difflax import schedules


def test_linear_betas_closed_form_and_scaling():
  b = schedules.linear_betas(1000)
  np.testing.assert_allclose(b[[0, -1]], [1e-4, 0.02])
  assert b.dtype == np.float64 and np.allclose(np.diff(b), np.diff(b)[0])
  # improved-DDPM: defaults scale by 1000/T.
  np.testing.assert_allclose(schedules.linear_betas(4000)[[0, -1]], [2.5e-5, 0.005])
  np.testing.assert_allclose(schedules.linear_betas(10, 0.1, 0.2), np.linspace(0.1, 0.2, 10))


def test_cosine_betas_match_alpha_bar_formula():
  T, s = 4000, 0.008
  b = schedules.cosine_betas(T)
  f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
  acp = np.cumprod(1 - b)
  for t in (0, 1, 100, 2000, 3500):
    np.testing.assert_allclose(acp[t], f(t + 1) / f(0), rtol=1e-9)
  assert b.max() == pytest.approx(0.999)  # Clipped at the end of the chain.
  assert b.dtype == np.float64


def test_space_timesteps_published_behaviour():
  assert schedules.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
  # Docstring example of improved-diffusion: 10, 15, 20 steps of three 100-step sections.
  steps = schedules.space_timesteps(300, "10,15,20")
  assert len(steps) == 45
  assert sum(s < 100 for s in steps) == 10 and sum(100 <= s < 200 for s in steps) == 15
  assert steps[0] == 0 and steps[9] == 99 and steps[-1] == 299
  s250 = schedules.space_timesteps(1000, "250")
  assert len(s250) == 250 and s250[0] == 0 and s250[-1] == 999
  assert schedules.space_timesteps(100, [10]) == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
  assert schedules.space_timesteps(100, 100) == list(range(100))
  with pytest.raises(ValueError, match="Cannot take"):
    schedules.space_timesteps(10, "20")
  with pytest.raises(ValueError, match="exactly"):
    schedules.space_timesteps(10, "ddim6")


def test_respace_betas_keeps_alpha_bar():
  betas = schedules.cosine_betas(1000)
  np.testing.assert_allclose(schedules.respace_betas(betas, range(1000)), betas, rtol=1e-10)
  kept = schedules.space_timesteps(1000, "ddim10")
  new = schedules.respace_betas(betas, kept)
  np.testing.assert_allclose(np.cumprod(1 - new), np.cumprod(1 - betas)[kept], rtol=1e-12)
  with pytest.raises(ValueError):
    schedules.respace_betas(betas, [1000])


def test_unknown_schedule_lists_valid_names():
  with pytest.raises(ValueError, match="cosine"):
    schedules.get_betas("quadratic", 10)


# Chen (paper 003) Algorithm 1, transcribed verbatim as the reference.
def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def ref_sigmoid(t, start=-3, end=3, tau=1.0, clip_min=1e-9):
  v_start = _sigmoid(start / tau)
  v_end = _sigmoid(end / tau)
  output = _sigmoid((t * (end - start) + start) / tau)
  output = (v_end - output) / (v_end - v_start)
  return np.clip(output, clip_min, 1.)


def ref_cosine(t, start=0, end=1, tau=1, clip_min=1e-9):
  v_start = math.cos(start * math.pi / 2) ** (2 * tau)
  v_end = math.cos(end * math.pi / 2) ** (2 * tau)
  output = math.cos((t * (end - start) + start) * math.pi / 2) ** (2 * tau)
  output = (v_end - output) / (v_end - v_start)
  return np.clip(output, clip_min, 1.)


@pytest.mark.parametrize("params", [dict(start=-3, end=3, tau=1.0), dict(start=0, end=3, tau=0.7),
                                    dict(start=-3, end=3, tau=1.1), dict(start=0, end=3, tau=0.5)])
def test_gamma_sigmoid_matches_algorithm_1(params):
  import jax.numpy as jnp
  t = np.linspace(0, 1, 101)
  np.testing.assert_allclose(schedules.gamma_sigmoid(t, **params), ref_sigmoid(t, **params),
                             rtol=1e-12)
  np.testing.assert_allclose(schedules.gamma_sigmoid(jnp.asarray(t), **params),
                             ref_sigmoid(t, **params), rtol=2e-5, atol=1e-6)
  assert schedules.gamma_sigmoid(0.0, **params) == pytest.approx(1.0)
  assert schedules.gamma_sigmoid(1.0, **params) == pytest.approx(1e-9)  # Clipped.


@pytest.mark.parametrize("params", [dict(start=0, end=1, tau=1), dict(start=0.2, end=1, tau=1),
                                    dict(start=0.2, end=1, tau=2), dict(start=0, end=1, tau=3)])
def test_gamma_cosine_matches_algorithm_1(params):
  for t in np.linspace(0, 1, 41):
    assert schedules.gamma_cosine(t, **params) == pytest.approx(ref_cosine(t, **params),
                                                                rel=1e-12, abs=1e-15)
  assert schedules.gamma_cosine(0.0, **params) == pytest.approx(1.0)


def test_gamma_linear_and_registry():
  t = np.array([0.0, 0.25, 1.0, 1.5, -0.5])
  np.testing.assert_allclose(schedules.gamma_linear(t), [1.0, 0.75, 1e-9, 1e-9, 1.0])
  g = schedules.get_gamma("sigmoid", start=0, end=3, tau=0.7)
  assert g(0.3) == pytest.approx(ref_sigmoid(0.3, 0, 3, 0.7))
  with pytest.raises(ValueError, match="sigmoid"):
    schedules.get_gamma("exp")


def test_vp_linear_gamma_is_the_continuous_limit_of_linear_betas():
  for T in (1000, 2000, 4000):
    acp = np.cumprod(1 - schedules.linear_betas(T))
    t = np.arange(1, T + 1) / T
    err = np.abs(schedules.gamma_vp_linear(t) - acp).max()
    assert err < 2.0 / T  # First-order discretisation error, halving as T doubles.
  assert schedules.parse_gamma("vp_linear:beta_min=0.1,beta_max=20")(0.0) == 1.0
