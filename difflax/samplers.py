"""Samplers (pure, `lax.scan`; no jit, pmap or mesh inside).

Contract: every sampler is `fn(denoise_fn, diffusion, shape, key, **options) -> x0: shape` where
`denoise_fn(x_t: [B, H, W, C], t: [B]) -> [B, H, W, C or 2C]` is the network with its params and
conditioning closed over, called with the model time `diffusion.timestep_map[t]`. A respaced
`Diffusion` (`diffusion.from_config(cfg, respacing="ddim50")`) makes any sampler run on that
subsequence; its learned variance rescales automatically (paper 002 Sec. 2.2.2). The caller jits
and shards (e.g. `jax.jit(partial(sample, ...), out_shardings=...)`), so training previews,
evaluation and the CLI share these functions.

All reverse-process math comes from `difflax.diffusion.p_mean_variance`; the samplers only choose
the update. Per-step noise is `fold_in(step_key, i)` for chain index i in both DDPM and DDIM, so
DDIM with eta=1 reproduces ancestral sampling with fixed-small variance step for step.
Continuous-time schedules sample through the same two functions on `diffusion.from_gamma`'s chain.
Score models (NCSNv2) use `annealed_langevin(score_net, sigmas, shape, key, ...)`.
Surrogate Diffusion (paper 002 Algorithm 4): `surrogate_start` noises another model's samples to
chain step t_mid and the same samplers finish the chain from there (`start_at`).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from difflax import diffusion as diff_lib

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _init(d: diff_lib.Diffusion, shape, key, x_T):
  init_key, step_key = jax.random.split(key)
  x = jax.random.normal(init_key, shape, jnp.float32) if x_T is None else x_T
  return x, step_key


def _chain(d: diff_lib.Diffusion, stop_at: int, start_at: Optional[int] = None) -> jax.Array:
  """Chain indices the reverse process visits: `start_at` (default T-1: x is x_T) down to
  `stop_at` + 1. The result is then at the noise level of index `stop_at` (a truncated chain,
  CDM Sec. 3.2), or clean for -1. A start below T-1 continues from an intermediate x (Surrogate
  Diffusion, `surrogate_start`)."""
  start_at = d.num_timesteps - 1 if start_at is None else start_at
  if not -1 <= stop_at < d.num_timesteps - 1:
    raise ValueError(f"stop_at={stop_at} outside [-1, {d.num_timesteps - 2}].")
  if not stop_at <= start_at < d.num_timesteps:
    raise ValueError(f"start_at={start_at} outside [stop_at={stop_at}, {d.num_timesteps - 1}].")
  return jnp.arange(start_at, stop_at, -1)


def _predict(denoise_fn: DenoiseFn, d: diff_lib.Diffusion, x, i, clip_denoised: bool):
  """p(x_{t-1} | x_t) at chain index i for the whole batch; the net sees the model time."""
  t = jnp.full((x.shape[0],), i, dtype=jnp.int32)
  return diff_lib.p_mean_variance(d, denoise_fn(x, d.timestep_map[t]), x, t, clip_denoised)


def ddpm_sample(denoise_fn: DenoiseFn, d: diff_lib.Diffusion, shape, key, *,
                clip_denoised: bool = True, x_T: Optional[jax.Array] = None,
                stop_at: int = -1, start_at: Optional[int] = None) -> jax.Array:
  """Ancestral sampling (DDPM Algorithm 2) with the configured reverse variance. x: shape."""
  x, step_key = _init(d, shape, key, x_T)

  def body(x, i):
    out = _predict(denoise_fn, d, x, i, clip_denoised)
    z = jax.random.normal(jax.random.fold_in(step_key, i), shape, x.dtype)
    x = out.mean + (i > 0) * jnp.exp(0.5 * out.log_variance) * z
    return x, None

  x, _ = jax.lax.scan(body, x, _chain(d, stop_at, start_at))
  return x


def ddim_sample(denoise_fn: DenoiseFn, d: diff_lib.Diffusion, shape, key, *, eta: float = 0.0,
                clip_denoised: bool = True, x_T: Optional[jax.Array] = None,
                stop_at: int = -1, start_at: Optional[int] = None) -> jax.Array:
  """DDIM (Song et al. 2021, Eq. 12): eta=0 deterministic, eta=1 the ancestral DDPM chain."""
  x, step_key = _init(d, shape, key, x_T)

  def body(x, i):
    out = _predict(denoise_fn, d, x, i, clip_denoised)
    a, a_prev = d.alphas_cumprod[i], d.alphas_cumprod_prev[i]
    sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a)) * jnp.sqrt(1 - a / a_prev)
    mean = (out.pred_x0 * jnp.sqrt(a_prev)
            + jnp.sqrt(jnp.maximum(1 - a_prev - sigma ** 2, 0.0)) * out.pred_eps)
    z = jax.random.normal(jax.random.fold_in(step_key, i), shape, x.dtype)
    return mean + (i > 0) * sigma * z, None

  x, _ = jax.lax.scan(body, x, _chain(d, stop_at, start_at))
  return x


def surrogate_start(key, d: diff_lib.Diffusion, x0_surrogate, t_mid: int) -> jax.Array:
  """Surrogate Diffusion (paper 002 Algorithm 4, line 2): x_{t_mid} ~ q(x_{t_mid} | x0_surrogate)
  under chain `d`, where t_mid counts chain steps (0 ... T): the reverse chain then runs its
  last t_mid steps, chain indices t_mid - 1 ... 0 (`sample(..., x_T=x, start_at=t_mid - 1)`),
  instead of all T. t_mid = 0 returns the surrogate's samples themselves; t_mid = T starts from
  q(x_T | x0), which the forward process makes (nearly) the prior. x0_surrogate: [B, H, W, C]."""
  if not 0 <= t_mid <= d.num_timesteps:
    raise ValueError(f"t_mid={t_mid} outside [0, T={d.num_timesteps}].")
  if t_mid == 0:
    return x0_surrogate
  t = jnp.full((x0_surrogate.shape[0],), t_mid - 1, jnp.int32)
  noise = jax.random.normal(key, x0_surrogate.shape, x0_surrogate.dtype)
  return diff_lib.q_sample(d, x0_surrogate, t, noise)


def annealed_langevin(score_net: Callable, sigmas, shape, key, *, step_size: float,
                      steps_per_scale: int, final_denoise: bool = True,
                      x_init: Optional[jax.Array] = None) -> jax.Array:
  """Annealed Langevin dynamics (NCSNv2 Algorithm 1) as one `lax.scan` over L * T steps.

  `score_net(x, sigma: [B]) -> [B, ...]` is the unconditional network; the score is
  net(x) / sigma (Technique 3). Step i uses alpha_i = eps * sigma_i^2 / sigma_L^2; the chain
  starts from U(-1, 1) noise as in the paper, and `final_denoise` adds the Tweedie step
  x + sigma_L^2 s(x, sigma_L) (paper 004 Appendix). sigmas: [L] descending.
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)
  init_key, step_key = jax.random.split(key)
  x = jax.random.uniform(init_key, shape, jnp.float32, -1.0, 1.0) if x_init is None else x_init
  sigma_last = sigmas[-1]
  scale_of_step = jnp.repeat(jnp.arange(sigmas.shape[0]), steps_per_scale)

  def score(x, sigma):
    return score_net(x, jnp.full((shape[0],), sigma)) / sigma

  def body(x, j):
    sigma = sigmas[scale_of_step[j]]
    alpha = step_size * (sigma / sigma_last) ** 2
    z = jax.random.normal(jax.random.fold_in(step_key, j), shape, x.dtype)
    return x + alpha * score(x, sigma) + jnp.sqrt(2 * alpha) * z, None

  x, _ = jax.lax.scan(body, x, jnp.arange(scale_of_step.shape[0]))
  if final_denoise:
    x = x + sigma_last ** 2 * score(x, sigma_last)
  return x


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample}


def get_sampler(name: str) -> Callable:
  if name not in SAMPLERS:
    raise ValueError(f"Unknown sampler {name!r}; valid names: {sorted(SAMPLERS)}.")
  return SAMPLERS[name]


def sample(denoise_fn: DenoiseFn, d: diff_lib.Diffusion, shape, key, *, method: str = "ddim",
           eta: float = 0.0, clip_denoised: bool = True,
           x_T: Optional[jax.Array] = None, stop_at: int = -1,
           start_at: Optional[int] = None) -> jax.Array:
  """Dispatches to the sampler registered as `method` ("ddpm" or "ddim"). `stop_at` >= 0 returns
  the intermediate x at chain index `stop_at` instead of x0; `start_at` < T-1 starts from x_T
  given at that chain index (`surrogate_start`)."""
  kwargs = {"eta": eta} if method == "ddim" else {}
  return get_sampler(method)(denoise_fn, d, shape, key, clip_denoised=clip_denoised, x_T=x_T,
                             stop_at=stop_at, start_at=start_at, **kwargs)


def classifier_free_guidance(apply_fn: Callable, labels: jax.Array, null_label: int,
                             weight: float, channels: int) -> DenoiseFn:
  """Denoiser with classifier-free guidance (Ho & Salimans 2022).

  `apply_fn(x, t, labels) -> [B, H, W, C or 2C]`. The conditional and unconditional passes run as
  one batch of 2B; the mean channels become (1 + w) * cond - w * uncond, the variance channels (if
  any) stay conditional. weight=0 is the plain conditional model.
  """
  def denoise_fn(x, t):
    both = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    cond, uncond = jnp.split(both, 2)
    guided = (1 + weight) * cond[..., :channels] - weight * uncond[..., :channels]
    return jnp.concatenate([guided, cond[..., channels:]], axis=-1)
  return denoise_fn
