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
