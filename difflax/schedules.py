"""Noise schedules (pure, float64 numpy at construction).

Contract: the discrete functions return float64 numpy arrays (or plain Python lists of ints for
respacing) and have no side effects; the continuous-time `gamma_*` functions follow Chen (paper
003) Algorithm 1 exactly and work on numpy inputs (float64, as written in the paper) and on jax
arrays (inside jit), returning the signal fraction gamma(t) = alpha-bar in [clip_min, 1]. `difflax.diffusion` casts them to float32 once, when it builds a
`Diffusion`. Conventions follow improved-DDPM (Nichol & Dhariwal 2021, summarised in paper 002
Sec. 2.2): discrete time `t` indexes betas `0..T-1`, and `alpha_bar[t] = prod_{s<=t}(1 - beta_s)`.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import functools

import jax.numpy as jnp
import numpy as np

__all__ = ["linear_betas", "cosine_betas", "space_timesteps", "respace_betas", "get_betas",
           "BETA_SCHEDULES", "gamma_linear", "gamma_sigmoid", "gamma_cosine", "gamma_vp_linear",
           "get_gamma", "parse_gamma", "GAMMA_SCHEDULES"]


def linear_betas(num_timesteps: int, beta_start: float | None = None,
                 beta_end: float | None = None) -> np.ndarray:
  """DDPM's linear schedule (Ho et al. 2020). Returns betas: [T] float64.

  With no bounds given they are 1e-4 and 0.02 scaled by 1000 / T, improved-DDPM's convention that
  keeps the total noise comparable when T differs from 1000.
  """
  scale = 1000.0 / num_timesteps
  beta_start = scale * 1e-4 if beta_start is None else beta_start
  beta_end = scale * 0.02 if beta_end is None else beta_end
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Improved-DDPM's cosine schedule (Nichol & Dhariwal Eq. 17). Returns betas: [T] float64.

  alpha_bar(t) = cos^2(((t/T) + s)/(1 + s) * pi/2); beta_t = 1 - alpha_bar(t+1)/alpha_bar(t),
  clipped at `max_beta` to avoid the singularity at t = T.
  """
  def alpha_bar(u):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
           for i in range(num_timesteps)]
  return np.asarray(betas, dtype=np.float64)


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def get_betas(name: str, num_timesteps: int, **kwargs) -> np.ndarray:
  """Betas of the schedule registered under `name` ("linear" or "cosine")."""
  if name not in BETA_SCHEDULES:
    raise ValueError(f"Unknown beta schedule {name!r}; valid names: {sorted(BETA_SCHEDULES)}.")
  return BETA_SCHEDULES[name](num_timesteps, **kwargs)


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> list[int]:
  """Timesteps to keep from a T-step chain, improved-DDPM's respacing spec.

  `section_counts` is "ddimN" (the stride giving exactly N steps, as DDIM), or a comma-separated
  string / list of counts: the chain is cut into that many equal sections and each section is
  strided (fractional strides rounded) to keep its count, e.g. "10,15,20" over T=300 keeps 10 steps
  of the first 100, 15 of the next 100 and 20 of the last 100. Returns a sorted list of ints.
  """
  if isinstance(section_counts, int):
    section_counts = [section_counts]
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired = int(section_counts[len("ddim"):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f"Cannot create exactly {desired} steps with an integer stride over "
                       f"{num_timesteps} timesteps; use a plain count like '{desired}'.")
    section_counts = [int(x) for x in section_counts.split(",")]
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start, steps = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"Cannot take {count} steps from a section of {size} timesteps "
                       f"(T={num_timesteps}, sections={list(section_counts)}).")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      steps.append(start + round(cur))
      cur += stride
    start += size
  return sorted(set(steps))


def respace_betas(betas: np.ndarray, timesteps: Sequence[int]) -> np.ndarray:
  """Betas of the shortened chain that keeps `timesteps` (paper 002 Eq. 10).

  beta_{S_i} = 1 - alpha_bar[S_i] / alpha_bar[S_{i-1}], so the shortened chain has exactly the
  original alpha_bar at every kept step. betas: [T]; returns [len(timesteps)] float64.
  """
  timesteps = sorted(int(t) for t in timesteps)
  if not timesteps or timesteps[0] < 0 or timesteps[-1] >= len(betas):
    raise ValueError(f"Timesteps must lie in [0, {len(betas)}); got {timesteps[:3]}...")
  alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
  kept = alphas_cumprod[np.asarray(timesteps)]
  prev = np.concatenate([[1.0], kept[:-1]])
  return 1.0 - kept / prev


# ------------------------------------------------------------------ continuous time (Chen 2023)
def _xp(t):
  return np if isinstance(t, (int, float, np.ndarray, np.generic)) else jnp


def _sigmoid(xp, x):
  return 1.0 / (1.0 + xp.exp(-x))


def gamma_linear(t, clip_min: float = 1e-9):
  """gamma(t) = 1 - t, clipped to [clip_min, 1] (paper 003 Algorithm 1, simple_linear_schedule)."""
  xp = _xp(t)
  return xp.clip(1 - xp.asarray(t), clip_min, 1.0)


def gamma_sigmoid(t, start: float = -3, end: float = 3, tau: float = 1.0, clip_min: float = 1e-9):
  """Sigmoid gamma(t) of paper 003 Algorithm 1 (sigmoid_schedule)."""
  xp = _xp(t)
  v_start = _sigmoid(np, start / tau)
  v_end = _sigmoid(np, end / tau)
  output = _sigmoid(xp, (xp.asarray(t) * (end - start) + start) / tau)
  output = (v_end - output) / (v_end - v_start)
  return xp.clip(output, clip_min, 1.0)


def gamma_cosine(t, start: float = 0, end: float = 1, tau: float = 1, clip_min: float = 1e-9):
  """Cosine gamma(t) of paper 003 Algorithm 1 (cosine_schedule)."""
  xp = _xp(t)
  v_start = math.cos(start * math.pi / 2) ** (2 * tau)
  v_end = math.cos(end * math.pi / 2) ** (2 * tau)
  output = xp.cos((xp.asarray(t) * (end - start) + start) * math.pi / 2) ** (2 * tau)
  output = (v_end - output) / (v_end - v_start)
  return xp.clip(output, clip_min, 1.0)


def gamma_vp_linear(t, beta_min: float = 0.1, beta_max: float = 20.0, clip_min: float = 1e-9):
  """Continuous limit of DDPM's linear betas: gamma(t) = exp(-(b0 t + (b1 - b0) t^2 / 2)) with
  b = T * beta, so (0.1, 20) is linear_betas(T) for any T. What "continuous noise conditioning"
  on a linear schedule trains with (paper 001 Appendix B, via SR3)."""
  xp = _xp(t)
  t = xp.asarray(t)
  return xp.clip(xp.exp(-(beta_min * t + 0.5 * (beta_max - beta_min) * t ** 2)), clip_min, 1.0)


GAMMA_SCHEDULES = {"linear": gamma_linear, "sigmoid": gamma_sigmoid, "cosine": gamma_cosine,
                   "vp_linear": gamma_vp_linear}


def get_gamma(name: str, **params):
  """gamma(t) of the schedule registered as `name` with its parameters bound, e.g.
  get_gamma("sigmoid", start=0, end=3, tau=0.7)."""
  if name not in GAMMA_SCHEDULES:
    raise ValueError(f"Unknown gamma schedule {name!r}; valid names: {sorted(GAMMA_SCHEDULES)}.")
  return functools.partial(GAMMA_SCHEDULES[name], **params)


def parse_gamma(spec: str):
  """gamma(t) from a config string "name" or "name:key=value,...", e.g.
  "sigmoid:start=0,end=3,tau=0.7" or "cosine:start=0.2,end=1,tau=2"."""
  name, _, rest = spec.partition(":")
  params = {}
  for item in filter(None, rest.split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"Bad gamma spec {spec!r}: expected name:key=value,...")
    params[key.strip()] = float(value)
  return get_gamma(name.strip(), **params)
