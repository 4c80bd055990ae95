import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from difflax import diffusion as D
from difflax import schedules


def make(var_type="fixed_small", model_output="eps", T=100):
  return D.build(schedules.linear_betas(T), model_output=model_output, var_type=var_type)


def test_posterior_matches_bayes_on_scalars():
  d = make()
  betas = np.asarray(schedules.linear_betas(100))
  acp = np.cumprod(1 - betas)
  x0, xt = 0.3, -0.7
  for t in (1, 10, 50, 99):
    # q(x_{t-1}|x0) = N(sqrt(acp[t-1]) x0, 1-acp[t-1]); q(x_t|x_{t-1}) = N(sqrt(alpha_t) x, beta_t).
    prec = 1 / (1 - acp[t - 1]) + (1 - betas[t]) / betas[t]
    mean = (np.sqrt(acp[t - 1]) * x0 / (1 - acp[t - 1])
            + np.sqrt(1 - betas[t]) * xt / betas[t]) / prec
    m, v, _ = D.q_posterior_mean_variance(d, jnp.full((1, 1), x0), jnp.full((1, 1), xt),
                                          jnp.array([t]))
    np.testing.assert_allclose(float(m[0, 0]), mean, rtol=1e-5)
    np.testing.assert_allclose(float(v[0, 0]), 1 / prec, rtol=1e-4)


def test_normal_kl_matches_direct_formula():
  m1, lv1, m2, lv2 = 0.3, np.log(0.5), -0.2, np.log(2.0)
  s1, s2 = np.exp(lv1 / 2), np.exp(lv2 / 2)
  direct = np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
  np.testing.assert_allclose(float(D.normal_kl(m1, lv1, m2, lv2)), direct, rtol=1e-6)
  assert float(D.normal_kl(m1, lv1, m1, lv1)) == pytest.approx(0.0, abs=1e-7)


def test_discretized_likelihood_matches_normal_cdf_and_normalises():
  bins = jnp.linspace(-1, 1, 256)
  mean, log_scale = 0.1, np.log(0.3)
  ll = D.discretized_gaussian_log_likelihood(bins, jnp.full_like(bins, mean),
                                             jnp.full_like(bins, log_scale))
  assert float(jnp.exp(ll).sum()) == pytest.approx(1.0, abs=1e-4)
  # Interior bin [x - 1/255, x + 1/255] against the exact normal CDF (tanh approx ~1e-3).
  x = float(bins[140])
  exact = (stats.norm.cdf(x + 1 / 255, mean, 0.3) - stats.norm.cdf(x - 1 / 255, mean, 0.3))
  np.testing.assert_allclose(np.exp(float(ll[140])), exact, rtol=5e-3)
  # Edge bins are open-ended.
  edge = D.discretized_gaussian_log_likelihood(jnp.array([-1.0, 1.0]), jnp.array([-0.9, 0.9]),
                                               jnp.full((2,), log_scale))
  np.testing.assert_allclose(np.exp(edge), stats.norm.cdf(-1 + 1 / 255, -0.9, 0.3), rtol=5e-3)


@pytest.mark.parametrize("model_output", ["eps", "x0", "v"])
def test_p_mean_variance_with_true_prediction_is_posterior(model_output):
  d = make(model_output=model_output)
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jnp.clip(jax.random.normal(k1, (4, 4, 4, 3)) * 0.3, -1, 1)
  noise = jax.random.normal(k2, x0.shape)
  t = jnp.array([1, 20, 50, 99])
  xt = D.q_sample(d, x0, t, noise)
  out = D.p_mean_variance(d, D.training_target(d, x0, t, noise), xt, t, clip_denoised=False)
  mean, _, logvar = D.q_posterior_mean_variance(d, x0, xt, t)
  np.testing.assert_allclose(out.pred_x0, x0, atol=2e-4)
  np.testing.assert_allclose(out.pred_eps, noise, atol=2e-3)
  np.testing.assert_allclose(out.mean, mean, atol=1e-4)
  np.testing.assert_allclose(out.log_variance, jnp.broadcast_to(logvar, xt.shape), atol=1e-6)


def test_learned_range_interpolates_log_beta_and_log_beta_tilde():
  d = make(var_type="learned_range")
  t = jnp.array([5, 60])
  x = jnp.zeros((2, 2, 2, 1))
  for v, expected in ((1.0, d.log_betas[t]), (-1.0, d.posterior_log_variance_clipped[t]),
                      (0.0, 0.5 * (d.log_betas[t] + d.posterior_log_variance_clipped[t]))):
    out = jnp.concatenate([x, jnp.full_like(x, v)], -1)
    lv = D.p_mean_variance(d, out, x, t).log_variance
    np.testing.assert_allclose(lv[:, 0, 0, 0], expected, rtol=1e-6)
  with pytest.raises(ValueError, match="2\\*1 output"):
    D.p_mean_variance(d, x, x, t)


def test_fixed_large_uses_betas():
  d = make(var_type="fixed_large")
  t = jnp.array([3, 70])
  x = jnp.zeros((2, 1, 1, 1))
  np.testing.assert_allclose(D.p_mean_variance(d, x, x, t).log_variance[:, 0, 0, 0],
                             d.log_betas[t], rtol=1e-6)


def test_prior_bpd_is_small_for_long_chains_and_vb_terms_shape():
  d = make(T=1000)
  x0 = jnp.ones((2, 4, 4, 3)) * 0.5
  assert float(D.prior_bpd(d, x0).max()) < 1e-4
  t = jnp.array([0, 500])
  xt = D.q_sample(d, x0, t, jnp.zeros_like(x0))
  vb, _ = D.vb_terms_bpd(d, jnp.zeros_like(x0), x0, xt, t)
  assert vb.shape == (2,) and bool(jnp.all(vb >= 0))


def test_build_rejects_bad_inputs():
  with pytest.raises(ValueError, match="beta=1"):
    D.build(schedules.linear_betas(20))
  with pytest.raises(ValueError, match="model_output"):
    D.build(schedules.linear_betas(100), model_output="score")


def test_continuous_chain_has_the_gamma_marginals():
  """b=1, no normalisation: the continuous process equals the discrete VP marginal at matching
  alpha-bar (paper 003 Sec. 2.2)."""
  gamma = schedules.get_gamma("sigmoid", start=0, end=3, tau=0.7)
  d = D.from_gamma(gamma, 50, time_input="logsnr")
  t_cont = np.arange(1, 51) / 50
  np.testing.assert_allclose(d.alphas_cumprod, gamma(t_cont), rtol=2e-5, atol=1e-8)
  g = gamma(t_cont)
  np.testing.assert_allclose(d.timestep_map, np.log(g) - np.log1p(-g), rtol=1e-4, atol=1e-4)
  x0 = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  idx = jnp.array([0, 20, 49])
  a = jnp.asarray(g[np.array([0, 20, 49])], jnp.float32)[:, None, None, None]
  np.testing.assert_allclose(D.q_sample(d, x0, idx, noise), D.q_sample_ab(x0, a, noise),
                             rtol=1e-5, atol=1e-6)
  for out in ("eps", "x0", "v"):
    d2 = D.from_gamma(gamma, 50, model_output=out)
    np.testing.assert_allclose(D.training_target(d2, x0, idx, noise),
                               D.target_ab(x0, noise, a, out), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="learned"):
    D.from_gamma(gamma, 10, var_type="learned_range")
  with pytest.raises(ValueError, match="time_input"):
    D.model_time(jnp.ones(2), jnp.ones(2) * 0.5, "sigma")
