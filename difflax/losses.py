"""Training objectives and likelihood evaluation (pure).

Contract: `denoise_fn(x_t: [B, H, W, C], t: [B]) -> [B, H, W, C or 2C]` is the network closed over
its params (and labels / conditioning); it receives the model time `d.timestep_map[t]`. Losses
return per-example values ([B]) in a dict with key "loss" plus diagnostics; the caller averages.

Objectives (paper 002 Sec. 2.1-2.2, improved-DDPM):
  simple  L_simple: MSE between the network output and its target (eps, x0 or v).
  hybrid  L_simple + lambda * L_vlb with the mean frozen (stop-gradient) in the VLB term, so the
          VLB trains only the variance; lambda = 0.001 by default. L_vlb = T * L_t is the
          single-sample estimate of the full bound, hence the per-example term vb * T * lambda,
          improved-DDPM's `vb * num_timesteps / 1000`.
  vlb     T * L_t (improved-DDPM's rescaled KL), the full bound up to the prior term.

Continuous time (Chen, paper 003): t ~ U(0, 1), x_t = sqrt(gamma(t)) b x0 + sqrt(1 - gamma(t)) eps
(`continuous_losses`), MSE on eps / x0 / v of the scaled data b x0.
Score matching (NCSNv2, paper 004): `dsm_loss`, Eq. 2 weighted by sigma^2 with the score
s(x, sigma) = net(x) / sigma (Technique 3), i.e. 1/2 ||net(x + sigma z) + z||^2.
`make_objective(config, ...)` binds one of them to a config: `objective(denoise_fn, x0, key)`.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from difflax import diffusion as diff_lib
from difflax import schedules

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
LOSS_TYPES = ("simple", "hybrid", "vlb")


def sample_timesteps(key, batch_size: int, num_timesteps: int):
  """t ~ U{0, ..., T-1}: [B] int32."""
  return jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)


def training_losses(d: diff_lib.Diffusion, denoise_fn: DenoiseFn, x0, t, noise, *,
                    loss_type: str = "simple", vlb_weight: float = 0.001) -> dict:
  """Per-example losses at chain indices t: [B] for clean x0 and noise: [B, H, W, C]."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"Unknown loss type {loss_type!r}; valid: {LOSS_TYPES}.")
  if loss_type == "simple" and d.learned_variance:
    raise ValueError("loss 'simple' cannot train var_type='learned_range' (L_simple does not "
                     "depend on the variance); use loss.type='hybrid' or 'vlb'.")
  x_t = diff_lib.q_sample(d, x0, t, noise)
  model_out = denoise_fn(x_t, d.timestep_map[t])
  mean_out, var_out = diff_lib.split_output(d, model_out, x0.shape[-1])
  terms = {}
  if loss_type in ("hybrid", "vlb"):
    # improved-DDPM Sec. 3.1: the VLB term must not move the mean in the hybrid objective.
    frozen = mean_out if loss_type == "vlb" else jax.lax.stop_gradient(mean_out)
    frozen_out = frozen if var_out is None else jnp.concatenate([frozen, var_out], axis=-1)
    vb, _ = diff_lib.vb_terms_bpd(d, frozen_out, x0, x_t, t, clip_denoised=False)
    terms["vb"] = vb
  if loss_type in ("simple", "hybrid"):
    target = diff_lib.training_target(d, x0, t, noise)
    terms["mse"] = diff_lib.mean_flat((target - mean_out) ** 2)
  if loss_type == "simple":
    terms["loss"] = terms["mse"]
  elif loss_type == "hybrid":
    terms["loss"] = terms["mse"] + vlb_weight * d.num_timesteps * terms["vb"]
  else:
    terms["loss"] = d.num_timesteps * terms["vb"]
  return terms


def continuous_losses(gamma_fn: Callable, denoise_fn: DenoiseFn, x0, t, noise, *,
                      model_output: str = "eps", input_scale: float = 1.0,
                      time_input: str = "t") -> dict:
  """Per-example MSE at continuous times t: [B] in [0, 1] (paper 003 Sec. 2 and Algorithm 2).

  The network sees `diffusion.model_time(t, gamma(t), time_input)`; targets refer to the scaled
  data b * x0, so sampling returns b * x0 and the caller divides by b.
  """
  gamma_t = gamma_fn(t)
  a = gamma_t.reshape(t.shape + (1,) * (x0.ndim - 1))
  z0 = input_scale * x0
  x_t = diff_lib.q_sample_ab(z0, a, noise)
  out = denoise_fn(x_t, diff_lib.model_time(t, gamma_t, time_input))
  if out.shape != x0.shape:
    raise ValueError(f"Continuous-time models predict {x0.shape[-1]} channels, got "
                     f"{out.shape[-1]} (learned variances are discrete-time only).")
  mse = diff_lib.mean_flat((diff_lib.target_ab(z0, noise, a, model_output) - out) ** 2)
  return {"loss": mse, "mse": mse}


def dsm_loss(score_net: DenoiseFn, x0, sigma, noise) -> dict:
  """Denoising score matching, paper 004 Eq. 2 with lambda(sigma) = sigma^2: per-example
  1/2 ||sigma s(x~, sigma) + z||^2 summed over dims, with x~ = x0 + sigma z and
  s(x, sigma) = score_net(x, sigma) / sigma (Technique 3: the net's output is divided by sigma).
  sigma: [B]."""
  s = sigma.reshape(sigma.shape + (1,) * (x0.ndim - 1))
  out = score_net(x0 + s * noise, sigma)
  loss = 0.5 * jnp.sum((out + noise) ** 2, axis=tuple(range(1, x0.ndim)))
  return {"loss": loss}


def make_objective(config, diffusion: Optional[diff_lib.Diffusion] = None,
                   sigmas: Optional[jax.Array] = None) -> Callable:
  """`objective(denoise_fn, x0, key, view=None) -> per-example terms` for
  `config.diffusion.type`; `view` maps full-resolution arrays to a growth stage's resolution.

  discrete: t ~ U{0..T-1} and `training_losses` on `diffusion`; continuous: t ~ U(0, 1) and
  `continuous_losses`; ncsn: sigma uniform over `sigmas` and `dsm_loss` (denoise_fn is then the
  unconditional network called with sigma).
  """
  c = config.diffusion

  def data_and_noise(x0, k_noise, view):
    # Pro-DDPM Sec. 3.1: noise drawn at full resolution, then the clean image and the noise
    # (hence x_t and the target, both linear in them) are mapped to the stage resolution.
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    return (x0, noise) if view is None else (view(x0), view(noise))

  if c.type == "discrete":
    def objective(denoise_fn, x0, key, view=None):
      k_t, k_noise = jax.random.split(key)
      t = sample_timesteps(k_t, x0.shape[0], diffusion.num_timesteps)
      x0, noise = data_and_noise(x0, k_noise, view)
      return training_losses(diffusion, denoise_fn, x0, t, noise,
                             loss_type=config.loss.type, vlb_weight=config.loss.vlb_weight)
  elif c.type == "continuous":
    gamma_fn = schedules.parse_gamma(c.gamma)

    def objective(denoise_fn, x0, key, view=None):
      k_t, k_noise = jax.random.split(key)
      t = jax.random.uniform(k_t, (x0.shape[0],))
      x0, noise = data_and_noise(x0, k_noise, view)
      return continuous_losses(gamma_fn, denoise_fn, x0, t, noise,
                               model_output=c.model_output, input_scale=c.input_scale,
                               time_input=c.time_input)
  elif c.type == "ncsn":
    def objective(denoise_fn, x0, key, view=None):
      k_s, k_noise = jax.random.split(key)
      sigma = sigmas[jax.random.randint(k_s, (x0.shape[0],), 0, sigmas.shape[0])]
      x0, noise = data_and_noise(x0, k_noise, view)
      return dsm_loss(denoise_fn, x0, sigma, noise)
  else:
    raise ValueError(f"Unknown config.diffusion.type {c.type!r}; valid: discrete, continuous, "
                     "ncsn.")
  return objective


def bits_per_dim(d: diff_lib.Diffusion, denoise_fn: DenoiseFn, x0, key,
                 clip_denoised: bool = True) -> dict:
  """The full VLB in bits/dim of x0: [B, ...], summing L_t over every t plus the prior term.

  Runs the network once per timestep with `lax.scan` (improved-DDPM's `calc_bpd_loop`). Returns
  {"total_bpd": [B], "prior_bpd": [B], "vb": [B, T], "x0_mse": [B, T]}.
  """
  batch = x0.shape[0]

  def body(_, i):
    t = jnp.full((batch,), i, dtype=jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape, x0.dtype)
    x_t = diff_lib.q_sample(d, x0, t, noise)
    model_out = denoise_fn(x_t, d.timestep_map[t])
    vb, out = diff_lib.vb_terms_bpd(d, model_out, x0, x_t, t, clip_denoised=clip_denoised)
    return None, (vb, diff_lib.mean_flat((out.pred_x0 - x0) ** 2))

  _, (vb, mse) = jax.lax.scan(body, None, jnp.arange(d.num_timesteps))
  prior = diff_lib.prior_bpd(d, x0)
  return {"total_bpd": vb.sum(axis=0) + prior, "prior_bpd": prior, "vb": vb.T, "x0_mse": mse.T}
