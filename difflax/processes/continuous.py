"""Chen's continuous-time Gaussian chain (paper 003, "On the Importance of Noise Scheduling for
Diffusion Models") as a `Process` (pure).

Contract: `ContinuousProcess(config)`: t ~ U(0, 1) (or logit-normal) and
`losses.continuous_losses` on the gamma(t) of `diffusion.gamma` with input scale b
(`diffusion.input_scale`), the network fed `diffusion.model_time(t, gamma(t), time_input)`;
with `diffusion.normalize_input` x_t is divided by its per-example standard deviation before
the network (Sec. 2.2), at training and sampling alike. Sampling runs the discrete samplers on
the chain of `diffusion.inference_gamma` (or the training gamma) at `steps` steps
(`diffusion.from_gamma`) and returns x0 = (b x0) / b.
"""
from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp

from difflax import diffusion as diff_lib
from difflax import losses
from difflax import samplers
from difflax import schedules
from difflax.processes import base


class ContinuousProcess(base.Process):
  name = "continuous"
  config_keys = ("diffusion.gamma diffusion.inference_gamma diffusion.input_scale "
                 "diffusion.normalize_input diffusion.time_input")
  sampler_names = tuple(samplers.SAMPLERS)

  @classmethod
  def validate(cls, config) -> None:
    super().validate(config)
    d = config.diffusion
    schedules.parse_gamma(d.gamma)
    if d.inference_gamma:
      schedules.parse_gamma(d.inference_gamma)
    if config.loss.type != "simple":
      raise ValueError("Continuous-time diffusion trains with loss.type='simple' and fixed "
                       "variances (diffusion.var_type='fixed_small').")

  def chain(self, steps: Any = None) -> diff_lib.Diffusion:
    """The discretised chain of the inference gamma with `steps` steps (an int or a digit
    string, 'ddim' prefix allowed; default diffusion.num_timesteps)."""
    c = self.config.diffusion
    n = str(steps or c.num_timesteps).removeprefix("ddim")
    if not n.isdigit() or int(n) < 1:
      raise ValueError(f"Continuous-time sampling takes a number of steps (e.g. '100' or "
                       f"'ddim50'), got {steps!r}.")
    return diff_lib.from_gamma(schedules.parse_gamma(c.inference_gamma or c.gamma), int(n),
                               model_output=c.model_output, var_type=c.var_type,
                               time_input=c.time_input, clip_value=c.input_scale)

  def objective(self) -> losses.Objective:
    c, lc = self.config.diffusion, self.config.loss
    gamma_fn = schedules.parse_gamma(c.gamma)

    def per_draw(denoise_fn, x0, t, noise):
      return losses.continuous_losses(gamma_fn, denoise_fn, x0, t, noise,
                                      model_output=c.model_output, input_scale=c.input_scale,
                                      time_input=c.time_input, min_snr_gamma=lc.min_snr_gamma)
    return losses.build_objective(lc, losses.continuous_time_draw(lc), per_draw)

  def model_input(self, x, t):
    if self.config.diffusion.normalize_input:
      x = x / jnp.sqrt(jnp.var(x, axis=tuple(range(1, x.ndim)), keepdims=True) + 1e-5)
    return x, t

  def sampler(self, method: str, steps: Any, *, eta: float = 0.0, clip_denoised: bool = True,
              truncate_level: int = 0, surrogate_t_mid: Optional[int] = None) -> base.Run:
    self._no_truncation(truncate_level, surrogate_t_mid)
    d, scale = self.chain(steps), self.config.diffusion.input_scale

    def run(denoise_fn, shape, key, x0_surrogate=None):
      x = samplers.sample(denoise_fn, d, shape, key, method=method, eta=eta,
                          clip_denoised=clip_denoised)
      return x / scale
    return run
