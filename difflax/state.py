"""Training state and optimiser construction.

Contract: `TrainState` is one pytree (step, params, ema_params, opt_state, and `resampler`, the
importance sampler's loss history when `config.loss.timestep_sampler="importance"`, else None)
with no RNG inside:
randomness comes from `fold_in(base_key, step)`, so a restored state continues bit-identically.
`make_optimizer(config.optim, num_steps)` returns (optax transformation, lr schedule);
`init_state(model, optimizer, config, key)` is a pure function suitable for `jax.eval_shape`
(abstract state) and for a jit with output shardings (the real, sharded allocation).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from difflax import losses

OPTIMIZERS = {"adam": optax.adam, "adamw": optax.adamw}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  resampler: Any = None  # losses.resampler_init(...) or None.


def validate(config) -> None:
  """Raises ValueError on a `config.optim` that cannot run with `config.data`'s batch."""
  o = config.optim
  if o.name not in OPTIMIZERS:
    raise ValueError(f"config.optim.name={o.name!r}; valid: {sorted(OPTIMIZERS)}.")
  if o.grad_accum < 1 or config.data.batch_size % o.grad_accum:
    raise ValueError(f"config.optim.grad_accum={o.grad_accum} must be >= 1 and divide "
                     f"config.data.batch_size={config.data.batch_size}.")


def make_optimizer(optim_config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam / AdamW with linear warmup to a constant lr and optional global-norm clipping (the
  config is checked by `validate`)."""
  c = optim_config
  schedule = optax.linear_schedule(0.0, c.lr, max(int(c.warmup_steps), 1))
  kwargs = {"weight_decay": c.weight_decay} if c.name == "adamw" else {}
  opt = OPTIMIZERS[c.name](schedule, b1=c.b1, b2=c.b2, eps=c.eps, **kwargs)
  if c.grad_clip and c.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(c.grad_clip), opt)
  return opt, schedule


def dummy_inputs(config, batch: int = 1, resolution: int | None = None) -> dict:
  """Inputs with the right shapes to initialise the model for `config` (at `resolution`, a
  progressive growth stage's, when given)."""
  r, ch = resolution or config.data.resolution, config.data.channels
  kwargs = {"x": jnp.zeros((batch, r, r, ch), jnp.float32), "t": jnp.zeros((batch,), jnp.float32)}
  if config.model.class_conditional:
    kwargs["y"] = jnp.zeros((batch,), jnp.int32)
  if config.data.low_res:  # Cascade SR stage: the conditioning image (and its level).
    kwargs["low_res"] = jnp.zeros((batch, config.data.low_res, config.data.low_res, ch))
    kwargs["aug_level"] = jnp.zeros((batch,), jnp.float32)
  return kwargs


def init_state(model, optimizer: optax.GradientTransformation, config, key,
               resolution: int | None = None) -> TrainState:
  params = model.init({"params": key}, **dummy_inputs(config, resolution=resolution))["params"]
  resampler = None
  if config.loss.timestep_sampler == "importance":
    resampler = losses.resampler_init(config.diffusion.num_timesteps,
                                      config.loss.resampler_history)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    opt_state=optimizer.init(params), resampler=resampler)


def ema_decay_at(step, decay: float, warmup: bool):
  """EMA decay; with `warmup`, min(decay, (1 + step) / (10 + step)) so short runs' EMA is usable."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))
