"""The discrete DDPM chain (Ho et al. 2020; improved DDPM, Nichol & Dhariwal 2021) as a
`Process` (pure).

Contract: `DiscreteProcess(config)` over `diffusion.from_config(config.diffusion)`: t ~ U{0..T-1}
(importance-sampled from the train state's loss history, or logit-normal) with
`losses.training_losses` (simple / hybrid / vlb); ancestral or DDIM sampling on any respacing,
truncated at a cascade's level (CDM, paper 001 Sec. 3.2) or started midway from a surrogate
(paper 002 Algorithm 4); bits/dim over the full chain. `chain(respacing)` is the chain a
sampler runs; `surrogate_steps(d, t_mid)` / `surrogate_cost(steps, t_mid)` the model
evaluations a surrogate start costs.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from difflax import diffusion as diff_lib
from difflax import losses
from difflax import samplers
from difflax import schedules
from difflax.processes import base


def surrogate_steps(d: diff_lib.Diffusion, t_mid: int) -> int:
  """Chain steps of `d` below training timestep `t_mid` (paper 002's t_mid of a T-step chain):
  t_mid itself on the full chain, fewer on a respaced one, whose kept step j - 1 is then the
  last one below t_mid. These are the model evaluations a surrogate-started sample costs."""
  if not 0 <= t_mid <= int(np.max(d.timestep_map)) + 1:
    raise ValueError(f"sample.surrogate_t_mid={t_mid} outside [0, T].")
  return int(np.sum(np.asarray(d.timestep_map) < t_mid))


class DiscreteProcess(base.Process):
  name = "discrete"
  sampler_names = tuple(samplers.SAMPLERS)
  has_bpd = True
  discrete_time = True
  truncatable = True
  surrogate = True

  @classmethod
  def validate(cls, config) -> None:
    super().validate(config)
    d, s = config.diffusion, config.sample
    if config.loss.type == "simple" and d.var_type == "learned_range":
      raise ValueError("config.loss.type='simple' cannot learn variances; set "
                       "config.loss.type='hybrid' or config.diffusion.var_type='fixed_small'.")
    if d.input_scale != 1.0 or d.normalize_input:
      raise ValueError("diffusion.input_scale / normalize_input apply to "
                       "diffusion.type='continuous' only.")
    if s.surrogate and not 0 <= s.surrogate_t_mid <= d.num_timesteps:
      raise ValueError("config.sample.surrogate starts a discrete chain at "
                       "config.sample.surrogate_t_mid, which must lie in [0, num_timesteps="
                       f"{d.num_timesteps}] (got {s.surrogate_t_mid}).")

  def __init__(self, config, sample_data=None):
    super().__init__(config, sample_data)
    self.diffusion = self.chain()

  def chain(self, respacing: Any = None) -> diff_lib.Diffusion:
    return diff_lib.from_config(self.config.diffusion, respacing=respacing)

  def objective(self) -> losses.Objective:
    lc, d = self.config.loss, self.diffusion
    num_t = d.num_timesteps

    def draw_t(key, batch, resampler):
      if lc.timestep_sampler == "logit_normal":
        return losses.logit_normal_timesteps(key, batch, num_t, lc.logit_normal_mean,
                                             lc.logit_normal_std), None
      if resampler is None:
        return losses.sample_timesteps(key, batch, num_t), None
      # Paper 002 eq. 8-9: t ~ p_t, the loss reweighted by 1 / (T p_t) keeps its expectation.
      p = losses.resampler_probs(resampler, lc.resampler_uniform_prob)
      t = jax.random.categorical(key, jnp.log(p), shape=(batch,)).astype(jnp.int32)
      return t, 1.0 / (num_t * p[t])

    hybrid = {"vlb_weight": lc.vlb_weight} if lc.type == "hybrid" else {}

    def per_draw(denoise_fn, x0, t, noise):
      return losses.training_losses(d, denoise_fn, x0, t, noise, loss_type=lc.type,
                                    min_snr_gamma=lc.min_snr_gamma, **hybrid)
    return losses.build_objective(lc, draw_t, per_draw)

  def _truncated_chain(self, respacing, truncate_level: int):
    """(chain, stop index) of a chain that stops at CDM's z_s: the noise level of original step
    s - 1, added to the respaced chain so the stop is exact (paper 001 Sec. 3.2)."""
    t_max = int(self.config.diffusion.num_timesteps)
    if truncate_level > t_max:
      raise ValueError(f"Truncation level {truncate_level} exceeds the chain's T={t_max}.")
    kept = (set(range(t_max)) if respacing in (None, "", 0)
            else set(schedules.space_timesteps(t_max, respacing)))
    kept = sorted(kept | {truncate_level - 1})
    return self.chain(kept), kept.index(truncate_level - 1)

  def sampler(self, method: str, steps: Any, *, eta: float = 0.0, clip_denoised: bool = True,
              truncate_level: int = 0, surrogate_t_mid: Optional[int] = None) -> base.Run:
    """With `truncate_level` s > 0 the chain stops at z_s; with `surrogate_t_mid` (a timestep of
    the training chain) `x0_surrogate` is noised to that level and only the chain steps below it
    run (`surrogate_steps`)."""
    stop_at = -1
    if truncate_level > 0:
      d, stop_at = self._truncated_chain(steps, truncate_level)
    else:
      d = self.chain(steps)
    start = None
    if surrogate_t_mid is not None:
      if truncate_level:
        raise ValueError("Surrogate Diffusion and a truncated chain cannot be combined.")
      start = surrogate_steps(d, surrogate_t_mid)

    def run(denoise_fn, shape, key, x0_surrogate=None):
      x_T = start_at = None
      if start is not None:
        k_start, key = jax.random.split(key)
        x_T = samplers.surrogate_start(k_start, d, x0_surrogate, start)
        start_at = start - 1
      return samplers.sample(denoise_fn, d, shape, key, method=method, eta=eta,
                             clip_denoised=clip_denoised, x_T=x_T, stop_at=stop_at,
                             start_at=start_at)
    return run

  def surrogate_cost(self, steps: Any, t_mid: int) -> tuple[int, int]:
    """(model evaluations per sample started at `t_mid`, those of the whole chain) of the
    chain sampled with `steps` (paper 002 Table 4.5's speed-up)."""
    d = self.chain(steps)
    return surrogate_steps(d, t_mid), d.num_timesteps

  def bits_per_dim(self, denoise_fn, x0, key) -> dict:
    return losses.bits_per_dim(self.diffusion, denoise_fn, x0, key)
