"""Gaussian diffusion math (pure): forward process, posteriors, reverse-process parameters, VLB.

Contract: a `Diffusion` is an immutable pytree of float32 coefficient arrays ([T] each) built once
from float64 schedules (improved-DDPM's convention), plus static strings naming the model output
("eps", "x0" or "v") and the reverse variance ("fixed_small", "fixed_large", "learned_range").
Every function takes a `Diffusion`, arrays and chain indices `t: [B] int` and returns arrays; none
jits, samples keys on its own or touches a mesh. A respaced `Diffusion` (from `build(...,
timesteps=...)`) is an ordinary shorter chain whose `timestep_map[t]` is the original-chain time the
model was trained on, which is what a denoiser must be called with. A continuous-time schedule
gamma(t) (Chen, paper 003) sampled with N steps is the same object (`from_gamma`): the chain on
the grid t_i = (i + 1) / N with alpha_bar_i = gamma(t_i), whose `timestep_map` holds the model's
continuous time input, so DDPM and DDIM updates serve both without a copy of their math.
`q_sample_ab` / `target_ab` are the forward process and regression targets at given alpha_bar,
shared by the discrete and continuous objectives.

Images are x: [B, H, W, C] in [-1, 1]. Log-likelihood terms are in bits per dimension.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from difflax import schedules

MODEL_OUTPUTS = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")


def validate(diffusion_config) -> None:
  """Raises ValueError on an unknown `config.diffusion.var_type` / `model_output`."""
  d = diffusion_config
  if d.var_type not in VAR_TYPES:
    raise ValueError(f"config.diffusion.var_type={d.var_type!r}; valid: {VAR_TYPES}.")
  if d.model_output not in MODEL_OUTPUTS:
    raise ValueError(f"config.diffusion.model_output={d.model_output!r}; valid: "
                     f"{MODEL_OUTPUTS}.")


@flax.struct.dataclass
class Diffusion:
  """Coefficients of a discrete Gaussian diffusion chain; every array is [T] float32."""
  betas: jax.Array
  log_betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  fixed_large_log_variance: jax.Array
  timestep_map: jax.Array  # [T] float32: chain index -> time the model sees.
  model_output: str = flax.struct.field(pytree_node=False, default="eps")
  var_type: str = flax.struct.field(pytree_node=False, default="fixed_small")
  # Predicted x0 is clipped to [-clip_value, clip_value] (b for inputs scaled by b, Chen Sec. 2.2).
  clip_value: float = flax.struct.field(pytree_node=False, default=1.0)

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @property
  def learned_variance(self) -> bool:
    return self.var_type == "learned_range"


def build(betas: np.ndarray, *, model_output: str = "eps", var_type: str = "fixed_small",
          timesteps: Optional[Sequence[int]] = None, model_times: Optional[np.ndarray] = None,
          clip_value: float = 1.0) -> Diffusion:
  """Diffusion from float64 `betas: [T]`; with `timesteps`, the respaced chain keeping those steps.

  Respacing keeps alpha_bar at the kept steps (paper 002 Eq. 10-11); since the learned variance
  interpolates between this chain's beta and beta-tilde it rescales to the shorter chain for free.
  """
  if model_output not in MODEL_OUTPUTS:
    raise ValueError(f"Unknown model_output {model_output!r}; valid: {MODEL_OUTPUTS}.")
  if var_type not in VAR_TYPES:
    raise ValueError(f"Unknown var_type {var_type!r}; valid: {VAR_TYPES}.")
  betas = np.asarray(betas, dtype=np.float64)
  if timesteps is None:
    timestep_map = np.arange(len(betas))
  else:
    timestep_map = np.asarray(sorted(int(t) for t in timesteps))
    betas = schedules.respace_betas(betas, timestep_map)
  if model_times is not None:
    timestep_map = np.asarray(model_times, np.float64)
  if not ((betas > 0).all() and (betas < 1).all()):
    raise ValueError(f"betas must lie in (0, 1), got range [{betas.min()}, {betas.max()}]. "
                     "linear_betas scales its default bounds by 1000/T, so T < 51 reaches "
                     "beta=1: use more timesteps or explicit bounds.")
  alphas = 1.0 - betas
  acp = np.cumprod(alphas)
  acp_prev = np.append(1.0, acp[:-1])
  post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
  # The posterior variance is 0 at t=0; improved-DDPM clips its log to the t=1 value.
  post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(
      np.maximum(post_var, 1e-20))
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Diffusion(
      betas=f32(betas), log_betas=f32(np.log(betas)), alphas_cumprod=f32(acp),
      alphas_cumprod_prev=f32(acp_prev), sqrt_alphas_cumprod=f32(np.sqrt(acp)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - acp)),
      sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / acp)),
      sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / acp - 1)),
      posterior_variance=f32(post_var), posterior_log_variance_clipped=f32(post_log_var),
      posterior_mean_coef1=f32(betas * np.sqrt(acp_prev) / (1.0 - acp)),
      posterior_mean_coef2=f32((1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)),
      # DDPM's sigma^2 = beta choice; at t=0 improved-DDPM uses the posterior variance instead so
      # the decoder term stays well defined.
      fixed_large_log_variance=f32(np.log(np.append(post_var[1] if len(betas) > 1 else betas[0],
                                                    betas[1:]))),
      timestep_map=jnp.asarray(timestep_map, dtype=jnp.float32),
      model_output=model_output, var_type=var_type, clip_value=float(clip_value))


TIME_INPUTS = ("t", "logsnr")


def model_time(t, gamma_t, time_input: str = "t"):
  """What a continuous-time model is conditioned on: 1000 t (the discrete models' time range, so
  the sinusoidal embedding's frequencies suit it) or the log-SNR log(gamma / (1 - gamma))."""
  if time_input == "t":
    return 1000.0 * t
  if time_input == "logsnr":
    xp = np if isinstance(gamma_t, np.ndarray) else jnp
    return xp.log(gamma_t) - xp.log1p(-gamma_t)
  raise ValueError(f"Unknown time_input {time_input!r}; valid: {TIME_INPUTS}.")


def from_gamma(gamma_fn, num_steps: int, *, model_output: str = "eps",
               var_type: str = "fixed_small", time_input: str = "t",
               clip_value: float = 1.0) -> Diffusion:
  """The N-step chain of a continuous schedule: alpha_bar_i = gamma((i + 1) / N), i < N.

  gamma(0) = 1 is the clean data, so beta_0 = 1 - gamma(1/N); the model sees `model_time`.
  Learned variances are a discrete-time construction and are refused here.
  """
  if var_type == "learned_range":
    raise ValueError("Continuous-time diffusion has no learned variance: use fixed_small or "
                     "fixed_large.")
  t = np.arange(1, num_steps + 1, dtype=np.float64) / num_steps
  acp = np.asarray(gamma_fn(t), np.float64)
  betas = 1.0 - acp / np.append(1.0, acp[:-1])
  return build(betas, model_output=model_output, var_type=var_type,
               model_times=model_time(t, acp, time_input), clip_value=clip_value)


def from_config(config: Any, respacing: Any = None) -> Diffusion:
  """The discrete chain of a `config.diffusion` block (`processes.DiscreteProcess.chain`):
  schedule, num_timesteps (and beta_start / beta_end of a linear
  schedule, 0 = scaled DDPM bounds), model_output, var_type; `respacing` is a
  `schedules.space_timesteps` spec ("ddim50", "250", 100, ...), a list of kept steps, or None / ""
  for the full chain.
  Chen's continuous-time chains are `from_gamma`'s (`processes.ContinuousProcess.chain`).
  """
  t_max = int(config.num_timesteps)
  bounds = {}
  if config.schedule == "linear" and (config.beta_start or config.beta_end):
    bounds = {"beta_start": config.beta_start or None, "beta_end": config.beta_end or None}
  betas = schedules.get_betas(config.schedule, t_max, **bounds)
  timesteps = None
  if isinstance(respacing, (list, tuple)):  # Explicit kept steps (e.g. a truncated chain's).
    timesteps = sorted(int(t) for t in respacing)
  elif respacing not in (None, "", 0) and str(respacing) != str(t_max):
    timesteps = schedules.space_timesteps(t_max, respacing)
  return build(betas, model_output=config.model_output, var_type=config.var_type,
               timesteps=timesteps)


def _at(arr: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """arr[t] for t: [B], broadcastable against a [B, ...] array of rank `ndim`."""
  return arr[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_mean_variance(d: Diffusion, x0, t):
  """Mean, variance and log variance of q(x_t | x_0)."""
  mean = _at(d.sqrt_alphas_cumprod, t, x0.ndim) * x0
  var = _at(1.0 - d.alphas_cumprod, t, x0.ndim)
  return mean, var, jnp.log(var)


def q_sample_ab(x0, alpha_bar, noise):
  """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, alpha_bar broadcastable to x0."""
  return jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * noise


def target_ab(x0, noise, alpha_bar, model_output: str):
  """The regression target at alpha_bar: eps, x0 or v = sqrt(a) eps - sqrt(1 - a) x0."""
  if model_output == "eps":
    return noise
  if model_output == "x0":
    return x0
  if model_output == "v":
    return jnp.sqrt(alpha_bar) * noise - jnp.sqrt(1.0 - alpha_bar) * x0
  raise ValueError(f"Unknown model_output {model_output!r}; valid: {MODEL_OUTPUTS}.")


def q_sample(d: Diffusion, x0, t, noise):
  """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps. x0, noise: [B, ...]; t: [B]."""
  return q_sample_ab(x0, _at(d.alphas_cumprod, t, x0.ndim), noise)


def q_posterior_mean_variance(d: Diffusion, x0, x_t, t):
  """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7)."""
  mean = (_at(d.posterior_mean_coef1, t, x_t.ndim) * x0
          + _at(d.posterior_mean_coef2, t, x_t.ndim) * x_t)
  return (mean, _at(d.posterior_variance, t, x_t.ndim),
          _at(d.posterior_log_variance_clipped, t, x_t.ndim))


def predict_x0_from_eps(d: Diffusion, x_t, t, eps):
  return (_at(d.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
          - _at(d.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_x0(d: Diffusion, x_t, t, x0):
  return ((_at(d.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
          / _at(d.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))


def predict_x0_from_v(d: Diffusion, x_t, t, v):
  return (_at(d.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
          - _at(d.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)


def training_target(d: Diffusion, x0, t, noise):
  """What the network regresses onto for `d.model_output`: eps, x0 or v. [B, ...]."""
  return target_ab(x0, noise, _at(d.alphas_cumprod, t, x0.ndim), d.model_output)


def split_output(d: Diffusion, model_out, channels: int):
  """Splits [B, H, W, C or 2C] into (mean part [.., C], variance part [.., C] or None)."""
  if d.learned_variance:
    if model_out.shape[-1] != 2 * channels:
      raise ValueError(f"var_type='learned_range' needs a model with 2*{channels} output "
                       f"channels, got {model_out.shape[-1]}.")
    return model_out[..., :channels], model_out[..., channels:]
  if model_out.shape[-1] != channels:
    raise ValueError(f"Expected {channels} model output channels for var_type={d.var_type!r}, "
                     f"got {model_out.shape[-1]}.")
  return model_out, None


def model_log_variance(d: Diffusion, var_out, t, ndim: int):
  """Log variance of p(x_{t-1} | x_t).

  learned_range: improved-DDPM Eq. 15, log Sigma = v log beta_t + (1 - v) log beta-tilde_t with
  the network output in [-1, 1] mapped to v in [0, 1].
  """
  if d.var_type == "fixed_small":
    return _at(d.posterior_log_variance_clipped, t, ndim)
  if d.var_type == "fixed_large":
    return _at(d.fixed_large_log_variance, t, ndim)
  frac = (var_out + 1.0) / 2.0
  return (frac * _at(d.log_betas, t, ndim)
          + (1.0 - frac) * _at(d.posterior_log_variance_clipped, t, ndim))


class MeanVariance(NamedTuple):
  mean: jax.Array
  log_variance: jax.Array
  pred_x0: jax.Array
  pred_eps: jax.Array


def p_mean_variance(d: Diffusion, model_out, x_t, t, clip_denoised: bool = True) -> MeanVariance:
  """Parameters of p(x_{t-1} | x_t) from the network output (eps / x0 / v, +variance channels).

  The predicted x0 is clipped to [-1, 1] when `clip_denoised`, and eps is re-derived from the
  clipped x0 so DDPM and DDIM updates agree (improved-DDPM does the same). Clipping uses
  `d.clip_value` (the data range after input scaling).
  """
  mean_out, var_out = split_output(d, model_out, x_t.shape[-1])
  if d.model_output == "eps":
    pred_x0 = predict_x0_from_eps(d, x_t, t, mean_out)
  elif d.model_output == "x0":
    pred_x0 = mean_out
  else:
    pred_x0 = predict_x0_from_v(d, x_t, t, mean_out)
  if clip_denoised:
    pred_x0 = jnp.clip(pred_x0, -d.clip_value, d.clip_value)
  pred_eps = predict_eps_from_x0(d, x_t, t, pred_x0)
  mean, _, _ = q_posterior_mean_variance(d, pred_x0, x_t, t)
  log_var = jnp.broadcast_to(model_log_variance(d, var_out, t, x_t.ndim), x_t.shape)
  return MeanVariance(mean, log_var, pred_x0, pred_eps)


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """Fast tanh approximation of the standard normal CDF (improved-DDPM)."""
  return 0.5 * (1.0 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log p(x) of data in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2).

  Each bin has width 2/255; the edge bins extend to -inf / +inf (DDPM's decoder L_0). Returns
  natural-log likelihoods with the shape of x.
  """
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  cdf_delta = cdf_plus - cdf_min
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min,
                             jnp.log(jnp.maximum(cdf_delta, 1e-12))))


def mean_flat(x):
  """Mean over all but the batch axis: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vb_terms_bpd(d: Diffusion, model_out, x0, x_t, t, clip_denoised: bool = False):
  """L_t of the VLB in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL
  -log p(x0|x1) for t == 0. Returns ([B] bits/dim, MeanVariance)."""
  true_mean, _, true_log_var = q_posterior_mean_variance(d, x0, x_t, t)
  out = p_mean_variance(d, model_out, x_t, t, clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance)) / np.log(2.0)
  nll = -mean_flat(discretized_gaussian_log_likelihood(
      x0, out.mean, 0.5 * out.log_variance)) / np.log(2.0)
  return jnp.where(t == 0, nll, kl), out


def prior_bpd(d: Diffusion, x0):
  """KL(q(x_T | x0) || N(0, I)) in bits/dim, [B]: the VLB's L_T (no learnable part)."""
  t = jnp.full((x0.shape[0],), d.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_var = q_mean_variance(d, x0, t)
  return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / np.log(2.0)
