import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import diffusion as D
from difflax import losses
from difflax import schedules

T = 50


def setup(var_type="learned_range"):
  d = D.build(schedules.cosine_betas(T), var_type=var_type)
  k = jax.random.split(jax.random.key(0), 3)
  x0 = jnp.clip(jax.random.normal(k[0], (4, 4, 4, 2)) * 0.5, -1, 1)
  noise = jax.random.normal(k[1], x0.shape)
  t = jnp.array([0, 3, 20, 49])
  out = jax.random.normal(k[2], x0.shape[:-1] + (4,)) * 0.1
  return d, x0, noise, t, out


def test_hybrid_gradients_reach_variance_only_through_vlb():
  d, x0, noise, t, out = setup()

  def loss(out, kind, **kw):
    return losses.training_losses(d, lambda x, tt: out, x0, t, noise, loss_type=kind,
                                  **kw)["loss"].sum()
  g_hybrid = jax.grad(loss)(out, "hybrid")
  g_vlb_only = jax.grad(lambda o: loss(o, "hybrid", vlb_weight=1.0))(out)
  # Mean channels: exactly the L_simple gradient (the VLB sees a stop-gradient mean).
  g_mse = jax.grad(lambda o: ((o[..., :2] - noise) ** 2).mean(axis=(1, 2, 3)).sum())(out)
  np.testing.assert_allclose(g_hybrid[..., :2], g_mse[..., :2], atol=1e-7)
  # Variance channels: only the lambda * T * L_vlb term, which scales with lambda.
  assert float(jnp.abs(g_hybrid[..., 2:]).max()) > 0
  np.testing.assert_allclose(g_vlb_only[..., 2:], g_hybrid[..., 2:] * 1000, rtol=1e-3, atol=1e-9)


def test_hybrid_value_is_simple_plus_scaled_vb():
  d, x0, noise, t, out = setup()
  terms = losses.training_losses(d, lambda x, tt: out, x0, t, noise, loss_type="hybrid")
  np.testing.assert_allclose(terms["loss"], terms["mse"] + 0.001 * T * terms["vb"], rtol=1e-6)
  vlb = losses.training_losses(d, lambda x, tt: out, x0, t, noise, loss_type="vlb")
  np.testing.assert_allclose(vlb["loss"], T * terms["vb"], rtol=1e-6)


@pytest.mark.parametrize("model_output", ["eps", "x0", "v"])
def test_simple_loss_is_zero_for_the_true_target(model_output):
  d = D.build(schedules.linear_betas(100), model_output=model_output)
  _, x0, noise, t, _ = setup()
  target = lambda x, tt: D.training_target(d, x0, t, noise)
  assert float(losses.training_losses(d, target, x0, t, noise)["loss"].max()) < 1e-10


def test_simple_loss_refuses_learned_variance():
  d, x0, noise, t, out = setup()
  with pytest.raises(ValueError, match="hybrid"):
    losses.training_losses(d, lambda x, tt: out, x0, t, noise, loss_type="simple")


def test_bits_per_dim_decomposes_and_is_reasonable():
  d, x0, _, _, _ = setup(var_type="fixed_small")
  zero_eps = lambda x, tt: jnp.zeros_like(x)
  out = losses.bits_per_dim(d, zero_eps, x0, jax.random.key(1))
  assert out["vb"].shape == (4, T)
  np.testing.assert_allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"], rtol=1e-5)
  assert bool(jnp.all(out["total_bpd"] > 0))
  # The data-aware optimal denoiser for x0 known exactly gives a far better bound.
  oracle = lambda x, tt: D.predict_eps_from_x0(d, x, tt.astype(jnp.int32), x0)
  better = losses.bits_per_dim(d, oracle, x0, jax.random.key(1))
  assert float(better["total_bpd"].mean()) < float(out["total_bpd"].mean())


def test_continuous_loss_matches_discrete_loss_on_the_same_chain():
  gamma = schedules.get_gamma("cosine", start=0.2)
  d = D.from_gamma(gamma, 40, model_output="v")
  x0 = jax.random.normal(jax.random.key(0), (3, 4, 4, 1)) * 0.5
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  net = lambda x, t: 0.3 * x + 1e-3 * t.reshape(-1, 1, 1, 1)
  idx = jnp.array([0, 10, 39])
  disc = losses.training_losses(d, net, x0, idx, noise)["loss"]
  cont = losses.continuous_losses(gamma, net, x0, (idx + 1) / 40, noise, model_output="v")["loss"]
  np.testing.assert_allclose(cont, disc, rtol=1e-4)
  # Input scaling b: the process runs on b * x0.
  scaled = losses.continuous_losses(gamma, net, x0 / 0.5, (idx + 1) / 40, noise, model_output="v",
                                    input_scale=0.5)["loss"]
  np.testing.assert_allclose(scaled, cont, rtol=1e-4)


def test_dsm_loss_closed_form():
  x0 = jnp.zeros((2, 3, 3, 1))
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  sigma = jnp.array([0.1, 2.0])
  # sigma * s(x~, sigma) = net(x~) = -z is the exact minimiser (Eq. 2 weighted by sigma^2).
  exact = losses.dsm_loss(lambda x, s: -(x - 0.0) / s.reshape(-1, 1, 1, 1), x0, sigma, noise)
  np.testing.assert_allclose(exact["loss"], 0.0, atol=1e-5)
  zero = losses.dsm_loss(lambda x, s: jnp.zeros_like(x), x0, sigma, noise)
  np.testing.assert_allclose(zero["loss"], 0.5 * (noise ** 2).sum(axis=(1, 2, 3)), rtol=1e-6)
