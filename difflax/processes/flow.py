"""Flow matching with the rectified-flow path (Lipman et al. 2023, "Flow Matching for Generative
Modeling"; Liu et al. 2023, "Flow Straight and Fast"; the conventions of Esser et al. 2024,
"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", Sec. 2-3) as a
`Process` (pure).

Contract: the straight path x_t = (1 - t) x0 + t eps between data (t = 0) and N(0, I) noise
(t = 1); the network v(x_t, 1000 t) regresses the path's velocity dx_t/dt = eps - x0
(`flow_loss`, Esser et al. Eq. 1-3 with the conditional flow-matching target); t ~ U(0, 1) or
logit-normal (`loss.timestep_sampler`, their Sec. 3.1 "rf/lognorm(0.00, 1.00)", the paper's
best). Sampling integrates dx/dt = v from t = 1 to 0 on a uniform grid of `steps` steps with
Euler (`euler_sample`, one network call a step) or Heun (`heun_sample`, two a step, Euler on the
last step to t = 0, as EDM does); `steps` is a number (empty: `diffusion.num_timesteps`). No
likelihood, truncation or surrogate start; classifier-free guidance combines velocities.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from difflax import diffusion as diff_lib
from difflax import losses
from difflax.processes import base

# The UNet's sinusoidal time embedding is tuned for DDPM's 0..999 (as Chen's "t" input).
TIME_SCALE = 1000.0


def interpolate(x0, noise, t):
  """x_t = (1 - t) x0 + t eps; x0, noise: [B, ...], t: [B]."""
  t = t.reshape(t.shape + (1,) * (x0.ndim - 1))
  return (1.0 - t) * x0 + t * noise


def flow_loss(velocity_fn: Callable, x0, t, noise) -> dict:
  """Per-example conditional flow-matching loss: mean over dims of ||v(x_t, t) - (eps - x0)||^2
  at t: [B] in [0, 1]; `velocity_fn(x_t, model_time)`."""
  out = velocity_fn(interpolate(x0, noise, t), TIME_SCALE * t)
  if out.shape != x0.shape:
    raise ValueError(f"Flow models predict {x0.shape[-1]} channels, got {out.shape[-1]}.")
  mse = diff_lib.mean_flat((noise - x0 - out) ** 2)
  return {"loss": mse, "mse": mse}


def _grid(steps: int):
  return jnp.linspace(1.0, 0.0, steps + 1)


def euler_sample(velocity_fn: Callable, shape, key, steps: int) -> jax.Array:
  """x_{t - h} = x_t - h v(x_t, t) from x_1 ~ N(0, I) over `steps` uniform steps."""
  ts = _grid(steps)

  def body(x, i):
    t, t_next = ts[i], ts[i + 1]
    v = velocity_fn(x, jnp.full((shape[0],), TIME_SCALE * t))
    return x + (t_next - t) * v, None

  x, _ = jax.lax.scan(body, jax.random.normal(key, shape, jnp.float32), jnp.arange(steps))
  return x


def heun_sample(velocity_fn: Callable, shape, key, steps: int) -> jax.Array:
  """Heun's second-order method (the trapezoid of the Euler predictor's two velocities); the
  last step, to t = 0, stays Euler (Karras et al. 2022, Algorithm 1)."""
  ts = _grid(steps)
  v_at = lambda x, t: velocity_fn(x, jnp.full((shape[0],), TIME_SCALE * t))

  def body(x, i):
    t, t_next = ts[i], ts[i + 1]
    v = v_at(x, t)
    x_euler = x + (t_next - t) * v
    v_next = jax.lax.cond(i < steps - 1, lambda: v_at(x_euler, t_next), lambda: v)
    return x + (t_next - t) * 0.5 * (v + v_next), None

  x, _ = jax.lax.scan(body, jax.random.normal(key, shape, jnp.float32), jnp.arange(steps))
  return x


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}


class FlowProcess(base.Process):
  name = "flow"
  sampler_names = tuple(SAMPLERS)

  @classmethod
  def validate(cls, config) -> None:
    super().validate(config)
    d, lc = config.diffusion, config.loss
    if lc.type != "simple" or lc.min_snr_gamma > 0:
      raise ValueError("Flow matching regresses the velocity: set loss.type='simple' and "
                       "loss.min_snr_gamma=0.")
    if d.input_scale != 1.0 or d.normalize_input or d.time_input != "t":
      raise ValueError("diffusion.input_scale / normalize_input / time_input are Chen's "
                       "continuous-time settings; flow matching takes none of them.")
    for field in ("train.preview_steps", "sample.steps"):
      block, key = field.split(".")
      cls.num_steps(config, config[block][key], field)

  @staticmethod
  def num_steps(config, steps: Any, field: str = "steps") -> int:
    n = str(steps or config.diffusion.num_timesteps)
    if not n.isdigit() or int(n) < 1:
      raise ValueError(f"config.{field}={steps!r}: flow matching integrates a number of "
                       "uniform steps (e.g. '50').")
    return int(n)

  def objective(self) -> losses.Objective:
    lc = self.config.loss
    return losses.build_objective(lc, losses.continuous_time_draw(lc), flow_loss)

  def sampler(self, method: str, steps: Any, *, eta: float = 0.0, clip_denoised: bool = True,
              truncate_level: int = 0, surrogate_t_mid: Optional[int] = None) -> base.Run:
    self._no_truncation(truncate_level, surrogate_t_mid)
    if method not in SAMPLERS:
      raise ValueError(f"Unknown flow sampler {method!r}; valid: {sorted(SAMPLERS)}.")
    n = self.num_steps(self.config, steps)

    def run(denoise_fn, shape, key, x0_surrogate=None):
      x = SAMPLERS[method](denoise_fn, shape, key, n)
      return jnp.clip(x, -1.0, 1.0) if clip_denoised else x
    return run

  def sample_tag(self, method: str, steps: Any, eta: float) -> str:
    return f"{method}{self.num_steps(self.config, steps)}"
