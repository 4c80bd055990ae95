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
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from difflax import diffusion as diff_lib

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
