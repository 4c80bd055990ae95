"""The `Process` interface: what the step, the sampler, the evaluator and the checkpoint need
from a generative process, and nothing about how any one process does it (pure).

Contract: a `Process` is built from a whole (stage) config by `processes.from_config` and owns
  - `objective() -> losses.Objective`: the training randomness and per-example loss terms;
  - `model_input(x, t) -> (x, t)`: what the network sees of (x_t, model time), applied at
    training and sampling alike (input normalisation, a time-free score network);
  - `sampler(method, steps, ...) -> run(denoise_fn, shape, key, x0_surrogate=None) -> x0`: the
    reverse process for a conditioned, guided `denoise_fn(x: [B, H, W, C], t: [B])`, returning
    images in [-1, 1] (or the chain stopped at a cascade's truncation level);
  - `sample_tag(method, steps, eta)`: the part of a sample file's name this process decides;
  - `bits_per_dim(denoise_fn, x0, key)` where `has_bpd` (a discrete VLB);
  - `meta()`: JSON for the checkpoint (what a resumed or sampling run must agree on);
  - class-level `validate(config)` (its config checks, raising ValueError) and capabilities
    read by other modules instead of process names: `has_bpd`, `discrete_time` (t is a chain
    index: the importance sampler's history is per t), `truncatable` (a cascade may
    stop its chain at the next stage's level), `growable` (progressive growth applies),
    `surrogate` (paper 002's Surrogate Diffusion can start it midway).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

from difflax import growth
from difflax import losses

# A sampler: (denoise_fn, shape, key, x0_surrogate=None) -> images [B, H, W, C].
Run = Callable[..., Any]


class Process:
  """Base class: the defaults a process overrides (see the module docstring)."""
  name: ClassVar[str] = ""
  sampler_names: ClassVar[tuple] = ()
  has_bpd: ClassVar[bool] = False
  discrete_time: ClassVar[bool] = False
  truncatable: ClassVar[bool] = False
  growable: ClassVar[bool] = True
  surrogate: ClassVar[bool] = False
  # Config keys only this process reads ("block" or "block.key", space separated): a resolved
  # config keeps them only while diffusion.type names this process (`config.OPTIONAL`).
  config_keys: ClassVar[str] = ""

  def __init__(self, config, sample_data=None):
    self.config = config

  @classmethod
  def validate(cls, config) -> None:
    """Raises ValueError on settings this process cannot run (each message says what to set)."""
    d, lc = config.diffusion, config.loss
    for field in ("train.preview_sampler", "sample.sampler"):
      block, key = field.split(".")
      name = config[block][key]
      if cls.sampler_names and name not in cls.sampler_names:
        raise ValueError(f"config.{field}={name!r} is not a sampler of diffusion.type="
                         f"{cls.name!r}; valid: {', '.join(cls.sampler_names)}.")
    if config.sample.surrogate and not cls.surrogate:
      raise ValueError("config.sample.surrogate starts a discrete chain midway (paper 002 "
                       f"Algorithm 4); diffusion.type={cls.name!r} has none.")
    if growth.enabled(config) and not cls.growable:
      raise ValueError(f"Progressive growth is not implemented for diffusion.type={cls.name!r}.")
    if lc.timestep_sampler == "importance" and not cls.discrete_time:
      raise ValueError("config.loss.timestep_sampler='importance' keeps a loss history per "
                       "discrete timestep: it needs diffusion.type='discrete'.")
    if d.var_type == "learned_range" and not cls.has_bpd:
      raise ValueError(f"diffusion.type={cls.name!r} trains fixed variances: set "
                       "diffusion.var_type='fixed_small' and loss.type='simple'.")

  def objective(self) -> losses.Objective:
    raise NotImplementedError

  def model_input(self, x, t):
    return x, t

  def sampler(self, method: str, steps: Any, *, eta: float = 0.0, clip_denoised: bool = True,
              truncate_level: int = 0, surrogate_t_mid: Optional[int] = None) -> Run:
    raise NotImplementedError

  def sample_tag(self, method: str, steps: Any, eta: float) -> str:
    return f"{method}{steps or 'all'}_eta{eta:g}"

  def bits_per_dim(self, denoise_fn, x0, key) -> dict:
    raise ValueError(f"Bits/dim is defined for discrete chains, not diffusion.type="
                     f"{self.name!r}: set config.eval.bpd=False.")

  def meta(self) -> dict:
    return {}

  def _no_truncation(self, truncate_level: int, surrogate_t_mid: Optional[int]) -> None:
    if truncate_level:
      raise ValueError(f"Truncated sampling stops a discrete chain; this stage is "
                       f"diffusion.type={self.name!r}.")
    if surrogate_t_mid is not None:
      raise ValueError(f"Surrogate Diffusion starts a discrete chain midway; this stage is "
                       f"diffusion.type={self.name!r}.")
