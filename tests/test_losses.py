import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import diffusion as D
from difflax import losses
from difflax import processes
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


# ------------------------------------------------------------------- paper 002: importance sampling
def sequential_history(num_t, size, updates):
  """improved-DDPM's LossSecondMomentResampler.update_with_all_losses, entry by entry."""
  hist, count = np.zeros((num_t, size)), np.zeros(num_t, int)
  for ts, ls in updates:
    for t, l in zip(ts, ls):
      if count[t] >= size:
        hist[t, :-1] = hist[t, 1:]
        hist[t, -1] = l
      else:
        hist[t, count[t]] = l
      count[t] += 1
  return hist, count


def test_resampler_keeps_the_newest_losses_of_each_t_in_order():
  rng = np.random.default_rng(0)
  updates = [(rng.integers(0, 4, 9), rng.random(9).astype(np.float32)) for _ in range(5)]
  updates.append((np.array([2] * 7), np.arange(7, dtype=np.float32)))  # More than `history`.
  state = losses.resampler_init(4, history=3)
  update = jax.jit(losses.resampler_update)
  for t, l in updates:
    state = update(state, t, l)
  want, count = sequential_history(4, 3, updates)
  np.testing.assert_array_equal(state["count"], count)
  # A ring buffer: the same losses per t (the order inside a row does not enter p_t).
  np.testing.assert_allclose(np.sort(state["losses"], 1), np.sort(want, 1), rtol=1e-6)
  np.testing.assert_array_equal(np.sort(state["losses"][2]), [4, 5, 6])


def test_resampler_is_uniform_until_every_t_has_its_history_then_follows_eq_9():
  state = losses.resampler_init(5, history=2)
  state = losses.resampler_update(state, jnp.array([0, 1, 2, 3, 4, 0, 1, 2, 3]),
                                  jnp.arange(1.0, 10.0))
  np.testing.assert_allclose(losses.resampler_probs(state), np.full(5, 0.2))  # t=4: one loss.
  hist = np.array([[1, 1], [2, 2], [3, 4], [0.5, 0.5], [6, 8]], np.float32)
  state = {"losses": jnp.asarray(hist), "count": jnp.full((5,), 2, jnp.int32)}
  w = np.sqrt((hist.astype(np.float64) ** 2).mean(1))
  want = w / w.sum() * (1 - 0.001) + 0.001 / 5
  p = losses.resampler_probs(state, uniform_prob=0.001)
  np.testing.assert_allclose(p, want, rtol=1e-6)
  np.testing.assert_allclose(float(p.sum()), 1.0, rtol=1e-6)


def test_importance_weighted_loss_is_an_unbiased_estimate_of_the_uniform_mean():
  """E_{t~p}[L_t / (T p_t)] = mean_t L_t for any p (eq. 8): exactly as a sum, and for the
  draws of the objective itself as a Monte Carlo average."""
  from conftest import load_config
  c = load_config("ddpm_cifar10", "tiny")
  c.diffusion.update(num_timesteps=6, schedule="cosine")
  c.loss.timestep_sampler = "importance"
  table = jnp.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.1])  # A fixed L_t.
  hist = jnp.stack([table, 0.5 * table], axis=1) + 0.05
  state = {"losses": hist, "count": jnp.full((6,), 2, jnp.int32)}
  p = losses.resampler_probs(state, 0.001)
  assert float(jnp.max(p) / jnp.min(p)) > 10  # Far from uniform.
  np.testing.assert_allclose(float(jnp.sum(p * table / (6 * p))), float(table.mean()),
                             rtol=1e-6)
  obj = processes.from_config(c).objective()
  draw = jax.jit(lambda key: obj.draw(key, jnp.zeros((20_000, 2, 2, 1)), state))(
      jax.random.key(0))
  est = np.asarray(table[draw["t"]] * draw["weight"])
  assert abs(est.mean() - float(table.mean())) < 4 * est.std() / np.sqrt(est.size)
  np.testing.assert_allclose(np.bincount(np.asarray(draw["t"]), minlength=6) / 20_000, p,
                             atol=0.01)


# ------------------------------------------------------------------------------ paper 002: IWDiff
def test_iwdiff_weights_are_a_stable_softmax_over_the_draws():
  l = jnp.array([[1.0, 1e4], [2.0, 1e4 + 1.0], [0.5, 1e4 - 3.0]])  # [k=3, B=2]
  w = losses.iwdiff_weights(l, axis=0)
  assert np.isfinite(w).all()
  np.testing.assert_allclose(w, jax.nn.softmax(l, axis=0), rtol=1e-6)
  np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-6)


def test_iwdiff_with_one_draw_is_the_plain_objective():
  d, x0, noise, t, _ = setup("fixed_small")
  net = lambda x, tt: 0.3 * x + 0.01 * tt[:, None, None, None]
  fn = lambda x, tt, n: losses.training_losses(d, net, x, tt, n, loss_type="simple")
  plain = fn(x0, t, noise)
  iw = losses.iwdiff_losses(fn, x0, t, noise[None])
  np.testing.assert_array_equal(iw["loss"], plain["loss"])
  np.testing.assert_array_equal(iw["mse"], plain["mse"])


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_iwdiff_gradient_matches_the_hand_written_estimator(stop_gradient):
  """Toy loss l_i(theta) = ||theta * x - n_i||^2 per draw. Weights held constant (eq. 14):
  grad = sum_i w_i dl_i. Differentiated through (Algorithm 3 line 10 literally):
  grad = sum_i w_i (1 + l_i - sum_j w_j l_j) dl_i."""
  k = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(k[0], (2, 3))              # B=2 examples.
  n = jax.random.normal(k[1], (4, 2, 3))           # k=4 draws.
  fn = lambda theta: (lambda xx, tt, nn: {"loss": jnp.sum((theta * xx - nn) ** 2, axis=-1)})
  total = lambda theta: losses.iwdiff_losses(fn(theta), x, jnp.zeros(2), n,
                                             stop_gradient=stop_gradient)["loss"].sum()
  theta = 0.7
  got = jax.grad(total)(theta)
  l = np.asarray(jnp.sum((theta * x[None] - n) ** 2, axis=-1))           # [k, B]
  dl = np.asarray(jnp.sum(2 * (theta * x[None] - n) * x[None], axis=-1))  # [k, B]
  w = np.exp(l - l.max(0)) / np.exp(l - l.max(0)).sum(0)
  if stop_gradient:
    want = (w * dl).sum()
  else:
    want = (w * (1 + l - (w * l).sum(0)) * dl).sum()
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_importance_sampling_and_iwdiff_serve_hybrid_and_vlb_objectives():
  """The switches wrap any discrete objective: with learned variances, hybrid and vlb losses
  are importance-weighted and IWDiff-combined per example (finite, positive, [B])."""
  from conftest import load_config
  for kind in ("hybrid", "vlb"):
    c = load_config("ddpm_cifar10", "tiny")
    c.diffusion.update(num_timesteps=T, schedule="cosine", var_type="learned_range")
    c.loss.update(type=kind, timestep_sampler="importance", iwdiff_k=3)
    obj = processes.from_config(c).objective()
    hist = jnp.linspace(0.1, 2.0, 2 * T).reshape(T, 2)
    res = {"losses": hist, "count": jnp.full((T,), 2, jnp.int32)}
    net = lambda x, t: jnp.concatenate([0.1 * x, jnp.zeros_like(x)], axis=-1)
    x0 = jnp.clip(jax.random.normal(jax.random.key(0), (4, 4, 4, 2)) * 0.5, -1, 1)
    terms = obj(net, x0, jax.random.key(1), resampler=res)
    assert terms["loss"].shape == (4,) and np.isfinite(terms["loss"]).all()
    assert (terms["loss"] > 0).all() and "iwdiff_max_weight" in terms


def test_short_chain_preset_is_sec_4_3s():
  from difflax import config as config_lib
  c = config_lib.load("dgm_cifar10:short")
  betas = np.asarray(D.from_config(c.diffusion).betas)
  assert len(betas) == 100 and c.sample.steps == ""
  np.testing.assert_allclose([betas[0], betas[-1]], [4e-4, 0.18], rtol=1e-6)
  # Like the T=1000 chain it ends at (almost) pure noise.
  long = np.cumprod(1 - schedules.linear_betas(1000))[-1]
  assert np.cumprod(1 - betas)[-1] < 1e-3 and long < 1e-3


@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_gamma_is_the_same_x0_loss_in_every_parameterization(gamma):
  # Hang et al. 2023 Sec. 3.4: whatever the network predicts, the weighted loss is
  # min(SNR_t, gamma) ||x0_hat - x0||^2 for the x0_hat its output implies.
  _, x0, noise, t, _ = setup()
  x0_hat = x0 + 0.1 * jax.random.normal(jax.random.key(7), x0.shape)
  want = None
  for model_output in ("eps", "x0", "v"):
    d = D.build(schedules.linear_betas(T), model_output=model_output)
    ab = d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = D.q_sample(d, x0, t, noise)
    eps_hat = (x_t - jnp.sqrt(ab) * x0_hat) / jnp.sqrt(1 - ab)
    out = {"eps": eps_hat, "x0": x0_hat,
           "v": jnp.sqrt(ab) * eps_hat - jnp.sqrt(1 - ab) * x0_hat}[model_output]
    got = losses.training_losses(d, lambda x, tt: out, x0, t, noise,
                                 min_snr_gamma=gamma)["loss"]
    snr = d.alphas_cumprod[t] / (1 - d.alphas_cumprod[t])
    want = jnp.minimum(snr, gamma) * ((x0_hat - x0) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-7)
  # The cap binds: at t=0 the SNR is far above gamma, at t=T-1 far below.
  snr = d.alphas_cumprod / (1 - d.alphas_cumprod)
  assert float(snr[0]) > gamma > float(snr[-1])


def test_min_snr_gamma_weights_the_continuous_loss_too():
  gamma = schedules.get_gamma("cosine")
  x0 = jax.random.normal(jax.random.key(0), (3, 4, 4, 1)) * 0.5
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  net = lambda x, t: 0.3 * x
  t = jnp.array([0.1, 0.5, 0.9])
  plain = losses.continuous_losses(gamma, net, x0, t, noise, model_output="x0")["loss"]
  weighted = losses.continuous_losses(gamma, net, x0, t, noise, model_output="x0",
                                      min_snr_gamma=1.0)["loss"]
  g = gamma(t)
  np.testing.assert_allclose(weighted, plain * jnp.minimum(g / (1 - g), 1.0), rtol=1e-5)


# -------------------------------------------------------------------- logit-normal timesteps
@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_logit_normal_timesteps_follow_the_logit_normal_cdf(kind):
  """Esser et al. 2024 Sec. 3.1: P(t/T <= u) = Phi((logit(u) - m) / s), drawn by the objective
  itself, unweighted; the middle of the chain gets more of the batch than under U(0, 1)."""
  from math import erf, log, sqrt

  from conftest import load_config
  c = load_config("ddpm_cifar10" if kind == "discrete" else "chen_schedules", "tiny")
  c.loss.update(timestep_sampler="logit_normal", logit_normal_mean=0.5, logit_normal_std=0.8)
  process = processes.from_config(c)
  d = process.chain() if kind == "discrete" else None
  obj = process.objective()
  draw = jax.jit(lambda key: obj.draw(key, jnp.zeros((20_000, 2, 2, 1))))(jax.random.key(0))
  np.testing.assert_array_equal(draw["weight"], 1.0)
  cdf = lambda q: 0.5 * (1 + erf((log(q / (1 - q)) - 0.5) / (0.8 * sqrt(2))))
  t = np.asarray(draw["t"])
  if kind == "discrete":
    T = d.num_timesteps
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= T - 1
    # t = floor(u T) <= k  <=>  u < (k + 1) / T.
    checks = [(np.mean(t <= k), cdf((k + 1) / T)) for k in range(T // 10, T - 1, max(T // 5, 1))]
    u = (t + 0.5) / T
  else:
    checks = [(np.mean(t <= q), cdf(q)) for q in (0.1, 0.3, 0.5, 0.7, 0.9)]
    u = t
  assert len(checks) >= 4
  for got, want in checks:
    assert abs(got - want) < 0.015, checks
  assert np.mean((u > 0.25) & (u < 0.75)) > 0.6  # Uniform: 0.5.


def test_logit_normal_config_errors():
  from conftest import load_config
  from difflax import config as config_lib
  for name, over in [("ddpm_cifar10", dict(logit_normal_std=0.0)),
                     ("ncsnv2_cifar10", {})]:
    c = load_config(name, "tiny")
    c.loss.update(timestep_sampler="logit_normal", **over)
    with pytest.raises(config_lib.ConfigError, match="logit_normal"):
      config_lib.validate(c)
