"""NCSNv2 score models (Song & Ermon 2020, paper 004) as a `Process` (pure).

Contract: `NCSNProcess(config, sample_data)`: the noise scales of `noise_scales.from_config`
(Techniques 1, 2 and 4; `sample_data(n)` gives training images for Technique 1 and is called
only when `ncsn.sigma_first` is 0), sigma uniform over them with `losses.dsm_loss`, an
unconditional network (Technique 3: the noise level is not fed; `model_input` zeroes it) and
annealed Langevin dynamics (Algorithm 1, `samplers.annealed_langevin`) whatever sampler is
named. The scales go into the checkpoint's metadata, so every process and every resumption
sample with the scales the network trained on.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from difflax import losses
from difflax import noise_scales
from difflax import samplers
from difflax.processes import base


class NCSNProcess(base.Process):
  name = "ncsn"
  config_keys = "ncsn"
  sampler_names = ()  # Always annealed Langevin; the sampler fields are not read.
  growable = False

  @classmethod
  def validate(cls, config) -> None:
    super().validate(config)
    lc, d = config.loss, config.diffusion
    if config.model.class_conditional:
      raise ValueError("NCSNv2 score models are unconditional here: set "
                       "model.class_conditional=False.")
    if lc.timestep_sampler != "uniform":
      raise ValueError(f"config.loss.timestep_sampler={lc.timestep_sampler!r} draws diffusion "
                       "times; NCSN draws its noise scales uniformly: set 'uniform'.")
    if lc.min_snr_gamma > 0:
      raise ValueError(f"config.loss.min_snr_gamma={lc.min_snr_gamma} weights diffusion losses; "
                       "NCSN has its own sigma^2 weighting (Eq. 2): set 0.")
    if d.input_scale != 1.0 or d.normalize_input:
      raise ValueError("diffusion.input_scale / normalize_input apply to "
                       "diffusion.type='continuous' only.")

  def __init__(self, config, sample_data=None):
    super().__init__(config, sample_data)
    self.scales = noise_scales.from_config(config, sample_data)
    s = self.scales
    logging.info("NCSN noise scales: sigma %.4g -> %.4g, L=%d, ratio %.5f (coverage %.3f), "
                 "step size %.3g", s["sigmas"][0], s["sigmas"][-1], len(s["sigmas"]),
                 s["ratio"], s["coverage"], s["step_size"])

  def objective(self) -> losses.Objective:
    sigmas = jnp.asarray(self.scales["sigmas"], jnp.float32)

    def draw_t(key, batch, resampler):
      return jax.random.randint(key, (batch,), 0, sigmas.shape[0]), None

    def per_draw(denoise_fn, x0, t, noise):
      return losses.dsm_loss(denoise_fn, x0, sigmas[t], noise)
    return losses.build_objective(self.config.loss, draw_t, per_draw)

  def model_input(self, x, t):
    return x, jnp.zeros_like(t)

  def sampler(self, method: str, steps: Any, *, eta: float = 0.0, clip_denoised: bool = True,
              truncate_level: int = 0, surrogate_t_mid: Optional[int] = None) -> base.Run:
    self._no_truncation(truncate_level, surrogate_t_mid)
    n, s = self.config.ncsn, self.scales

    def run(denoise_fn, shape, key, x0_surrogate=None):
      return samplers.annealed_langevin(denoise_fn, s["sigmas"], shape, key,
                                        step_size=s["step_size"],
                                        steps_per_scale=n.steps_per_scale,
                                        final_denoise=n.final_denoise)
    return run

  def sample_tag(self, method: str, steps: Any, eta: float) -> str:
    return "langevin"

  def meta(self) -> dict:
    return {"ncsn": {k: np.asarray(v).tolist() for k, v in self.scales.items()}}
