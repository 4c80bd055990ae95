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
`build_objective(config.loss, draw_t, per_draw)` binds one of them, as a process supplies it
(`difflax.processes`), to an `Objective` (draw the batch's randomness, then evaluate terms):
`objective(denoise_fn, x0, key)`; `validate(config.loss)` is its config check. Timesteps are
uniform, importance-sampled (below) or logit-normal (`logit_normal_timesteps`, Esser et al. 2024
Sec. 3.1).

Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy", Sec. 3.4): `loss.min_snr_gamma = g > 0` weights each example's MSE so the loss equals
min(SNR_t, g) ||x0_hat - x0||^2 whatever the network predicts (`min_snr_weight`): eps targets get
min(SNR, g) / SNR, v targets min(SNR, g) / (SNR + 1), x0 targets min(SNR, g). It caps the weight
of the nearly clean timesteps, whose easy gradients otherwise conflict with the rest (their
reported 3.4x faster convergence). Discrete and continuous time; not the VLB terms.

Paper 002's objectives, switches on any of them:
  importance sampling  `resampler_init / resampler_update / resampler_probs`: improved-DDPM's
          loss-second-moment resampler (eq. 8-9), a small pytree in the train state updated
          inside the jitted step; t ~ p_t and the loss weighted by 1 / (T p_t).
  IWDiff  `iwdiff_losses` / `iwdiff_weights` (Algorithm 3): k noise draws of the same (x0, t),
          loss sum_i softmax(l)_i l_i, the weights constant in the gradient by default (eq. 14).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from difflax import diffusion as diff_lib

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
LOSS_TYPES = ("simple", "hybrid", "vlb")
TIMESTEP_SAMPLERS = ("uniform", "importance", "logit_normal")


def validate(lc) -> None:
  """Raises ValueError on `config.loss` settings that cannot work (a process's own limits are
  checked by the process: `difflax.processes`)."""
  if lc.type not in LOSS_TYPES:
    raise ValueError(f"config.loss.type={lc.type!r}; valid: {LOSS_TYPES}.")
  if lc.timestep_sampler not in TIMESTEP_SAMPLERS:
    raise ValueError(f"config.loss.timestep_sampler={lc.timestep_sampler!r}; valid: "
                     f"{', '.join(TIMESTEP_SAMPLERS)}.")
  if lc.timestep_sampler == "logit_normal" and not lc.logit_normal_std > 0:
    raise ValueError("config.loss.timestep_sampler='logit_normal' needs "
                     f"config.loss.logit_normal_std > 0 (got {lc.logit_normal_std}).")
  if lc.timestep_sampler == "importance" and lc.resampler_history < 1:
    raise ValueError(f"config.loss.resampler_history={lc.resampler_history}; it must be >= 1.")
  if lc.resampler_extra_updates and lc.timestep_sampler != "importance":
    raise ValueError("config.loss.resampler_extra_updates refreshes the importance sampler's "
                     "history: set config.loss.timestep_sampler='importance' too.")
  if lc.min_snr_gamma < 0:
    raise ValueError(f"config.loss.min_snr_gamma={lc.min_snr_gamma}; it must be >= 0 (0 = off).")
  if lc.iwdiff_k < 1:
    raise ValueError(f"config.loss.iwdiff_k={lc.iwdiff_k}; it must be >= 1 (1 = off).")


def uniform_times(key, batch_size: int):
  """t ~ U(0, 1): [B] float32."""
  return jax.random.uniform(key, (batch_size,))


def continuous_time_draw(lc):
  """`build_objective`'s `draw_t` for times in [0, 1] under `config.loss` (`lc`): logit-normal
  with `loss.timestep_sampler="logit_normal"`, else uniform; weights one."""
  def draw_t(key, batch, resampler=None):
    if lc.timestep_sampler == "logit_normal":
      return logit_normal_times(key, batch, lc.logit_normal_mean, lc.logit_normal_std), None
    return uniform_times(key, batch), None
  return draw_t


def sample_timesteps(key, batch_size: int, num_timesteps: int):
  """t ~ U{0, ..., T-1}: [B] int32."""
  return jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)


def logit_normal_times(key, batch_size: int, mean: float = 0.0, std: float = 1.0):
  """u = sigmoid(mean + std n), n ~ N(0, 1): [B] float32 in (0, 1), the fraction of the way to
  pure noise (Esser et al. 2024, "Scaling Rectified Flow Transformers", Sec. 3.1 "logit-normal
  sampling"). It spends the training batch on the middle of the chain, where a noisy image
  still shows where the object is but not yet what it is; the ends get little. Unweighted: it
  changes the objective's weighting over t, as in the paper."""
  n = jax.random.normal(key, (batch_size,), jnp.float32)
  return jax.nn.sigmoid(mean + std * n)


def logit_normal_timesteps(key, batch_size: int, num_timesteps: int, mean: float = 0.0,
                           std: float = 1.0):
  """`logit_normal_times` on the discrete chain: t = floor(u T) in {0, ..., T-1}: [B] int32."""
  u = logit_normal_times(key, batch_size, mean, std)
  return jnp.clip(jnp.floor(u * num_timesteps), 0, num_timesteps - 1).astype(jnp.int32)


def min_snr_weight(alpha_bar, gamma: float, model_output: str):
  """Per-example MSE weight of min-SNR-gamma (Hang et al. 2023 Sec. 3.4, their Eq. 7-8 for the
  eps and v parameterizations): SNR = alpha_bar / (1 - alpha_bar); alpha_bar: [B] -> [B]."""
  snr = alpha_bar / (1.0 - alpha_bar)
  clipped = jnp.minimum(snr, gamma)
  if model_output == "eps":
    return clipped / snr
  if model_output == "v":
    return clipped / (snr + 1.0)
  if model_output == "x0":
    return clipped
  raise ValueError(f"Unknown model_output {model_output!r}; valid: {diff_lib.MODEL_OUTPUTS}.")


def training_losses(d: diff_lib.Diffusion, denoise_fn: DenoiseFn, x0, t, noise, *,
                    loss_type: str = "simple", vlb_weight: float = 0.001,
                    min_snr_gamma: float = 0.0) -> dict:
  """Per-example losses at chain indices t: [B] for clean x0 and noise: [B, H, W, C];
  `min_snr_gamma` > 0 weights the MSE term by `min_snr_weight`."""
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
    if min_snr_gamma > 0:
      terms["mse"] = terms["mse"] * min_snr_weight(d.alphas_cumprod[t], min_snr_gamma,
                                                   d.model_output)
  if loss_type == "simple":
    terms["loss"] = terms["mse"]
  elif loss_type == "hybrid":
    terms["loss"] = terms["mse"] + vlb_weight * d.num_timesteps * terms["vb"]
  else:
    terms["loss"] = d.num_timesteps * terms["vb"]
  return terms


def continuous_losses(gamma_fn: Callable, denoise_fn: DenoiseFn, x0, t, noise, *,
                      model_output: str = "eps", input_scale: float = 1.0,
                      time_input: str = "t", min_snr_gamma: float = 0.0) -> dict:
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
  if min_snr_gamma > 0:
    mse = mse * min_snr_weight(gamma_t, min_snr_gamma, model_output)
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


@dataclasses.dataclass(frozen=True)
class Objective:
  """A config's training objective as two pure halves, so a step can draw the randomness of the
  whole batch once and evaluate it in micro-batches (gradient accumulation) with the same result.

  draw(key, x0, resampler=None) -> {"t": [B], "weight": [B], "noise": [B, k, H, W, C]}: times
    (chain indices, continuous times or noise-level indices), importance weights (1 unless
    `resampler` holds a loss history: then t ~ `resampler_probs` and weight = 1 / (T p_t)) and
    k >= 1 noise draws per example (IWDiff's k; draw 0 is the stream a k=1 objective uses).
  terms(denoise_fn, x0, draw, view=None) -> per-example terms ([B]); "loss" unweighted.
  Calling it, `objective(denoise_fn, x0, key, view=None, resampler=None)`, returns the terms
  of one draw with "loss" weighted.
  """
  draw: Callable
  terms: Callable

  def __call__(self, denoise_fn, x0, key, view=None, resampler=None) -> dict:
    d = self.draw(key, x0, resampler)
    terms = self.terms(denoise_fn, x0, d, view)
    return dict(terms, loss=terms["loss"] * d["weight"])


def build_objective(lc, draw_t: Callable, per_draw: Callable) -> Objective:
  """The `Objective` of a process's time draw and per-draw loss under `config.loss` (`lc`):
  `draw_t(key, batch, resampler) -> (t: [B], weight: [B] or None for ones)` (chain indices,
  continuous times or noise-level indices) and `per_draw(denoise_fn, x0, t, noise) -> terms`.
  `loss.iwdiff_k > 1` turns any of them into IWDiff over k noise draws (`iwdiff_losses`);
  `view` (in `terms`) maps full-resolution arrays to a growth stage's resolution. The processes
  (`difflax.processes`) supply the two functions."""
  k = int(lc.iwdiff_k)
  if k < 1:
    raise ValueError(f"config.loss.iwdiff_k={k}; it must be >= 1 (1 = no IWDiff).")

  def draw(key, x0, resampler=None):
    k_t, k_noise = jax.random.split(key)
    t, weight = draw_t(k_t, x0.shape[0], resampler)
    if weight is None:
      weight = jnp.ones(t.shape, jnp.float32)
    noise = jax.random.normal(k_noise, (x0.shape[0], k) + x0.shape[1:], x0.dtype)
    return {"t": t, "weight": weight, "noise": noise}

  def terms(denoise_fn, x0, d, view=None):
    noise = jnp.moveaxis(d["noise"], 1, 0)  # [k, B, ...]
    if view is not None:
      # Pro-DDPM Sec. 3.1: noise drawn at full resolution, then the clean image and the noise
      # (hence x_t and the target, both linear in them) are mapped to the stage resolution.
      x0, noise = view(x0), jax.vmap(view)(noise)
    fn = lambda x, t, n: per_draw(denoise_fn, x, t, n)
    if k == 1:
      return fn(x0, d["t"], noise[0])
    return iwdiff_losses(fn, x0, d["t"], noise, stop_gradient=lc.iwdiff_stop_gradient)

  return Objective(draw, terms)


# ----------------------------------------------------------------------------- IWDiff (paper 002)
def iwdiff_weights(draw_losses, axis: int = 0):
  """Paper 002 Algorithm 3 lines 8-10: w_i = exp(l_i - l_max) / s over the k draws along `axis`,
  s = sum_j exp(l_j - l_max): a softmax of the losses, finite for any loss scale."""
  l_max = jnp.max(draw_losses, axis=axis, keepdims=True)
  e = jnp.exp(draw_losses - l_max)
  return e / jnp.sum(e, axis=axis, keepdims=True)


def iwdiff_losses(loss_fn: Callable, x0, t, noises, *, stop_gradient: bool = True) -> dict:
  """IWDiff (paper 002 Algorithm 3): k noise draws `noises: [k, B, ...]` of the same x0: [B, ...]
  and t: [B]; `loss_fn(x0, t, noise) -> terms` gives the per-draw losses l: [k, B] (vmapped
  over the draws). Per example, loss = sum_i w_i l_i with w = `iwdiff_weights(l)`
  held constant in the gradient (IWAE's estimator, eq. 14), or differentiated through with
  `stop_gradient=False` (line 10 read literally). Other terms are averaged over the draws;
  "iwdiff_max_weight" is the largest w_i (1/k: draws agree; 1: one draw dominates)."""
  # vmap over the draws: the network sees batches of B (batched by XLA into one k*B call), so
  # per-example inputs the caller closed over (labels, conditioning) need no repeating.
  terms = jax.vmap(lambda n: loss_fn(x0, t, n))(noises)
  losses = terms.pop("loss")
  w = iwdiff_weights(jax.lax.stop_gradient(losses) if stop_gradient else losses, axis=0)
  out = {name: v.mean(axis=0) for name, v in terms.items()}
  out.update(loss=jnp.sum(w * losses, axis=0), iwdiff_max_weight=w.max(axis=0))
  return out


# -------------------------------------------------------------- timestep resampling (paper 002)
def resampler_init(num_timesteps: int, history: int = 10) -> dict:
  """An empty loss history for improved-DDPM's second-moment resampler (a train-state pytree):
  {"losses": [T, history] float32, "count": [T] int32 (losses recorded per t so far)}."""
  return {"losses": jnp.zeros((num_timesteps, history), jnp.float32),
          "count": jnp.zeros((num_timesteps,), jnp.int32)}


def resampler_update(state: dict, t, losses) -> dict:
  """Appends each (t_j, losses_j), in order of j, to t_j's history, dropping the oldest once
  `history` are held. t: [N] int; losses: [N] unweighted per-example losses (in a sharded step,
  those of all devices: the gather is XLA's, with no host round-trip).

  Vectorised rather than a loop over j: entry j lands in slot (count[t_j] + rank_j) mod history,
  rank_j = the number of earlier entries with the same t, and only the newest `history` entries
  of each t are written, so no two writes of one update hit the same slot."""
  hist, count = state["losses"], state["count"]
  size = hist.shape[1]
  t = jnp.asarray(t, jnp.int32).reshape(-1)
  losses = jnp.asarray(losses, jnp.float32).reshape(-1)
  same = t[:, None] == t[None, :]
  rank = jnp.sum(jnp.tril(same, k=-1), axis=1)
  newest = rank >= jnp.sum(same, axis=1) - size
  rows = jnp.where(newest, t, hist.shape[0])  # Out of range: dropped by the scatter.
  hist = hist.at[rows, (count[t] + rank) % size].set(losses, mode="drop")
  return {"losses": hist, "count": count.at[t].add(1)}


def resampler_probs(state: dict, uniform_prob: float = 0.001):
  """[T] probabilities of paper 002 eq. 9: uniform until every t holds a full history, then
  p_t ∝ sqrt(mean(L_t^2)) scaled by 1 - uniform_prob, plus uniform_prob / T."""
  hist, count = state["losses"], state["count"]
  num_t, size = hist.shape
  w = jnp.sqrt(jnp.mean(hist ** 2, axis=1))
  p = w / jnp.maximum(jnp.sum(w), 1e-30) * (1.0 - uniform_prob) + uniform_prob / num_t
  return jnp.where(jnp.all(count >= size), p, jnp.full((num_t,), 1.0 / num_t, jnp.float32))


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
