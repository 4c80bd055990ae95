"""Model registry: networks are chosen by name from `config.model.name`.

Contract: `build_model(config)` returns an unbound Flax module whose `__call__(x, t, y=None,
low_res=None, aug_level=None, train=False)` follows `difflax.models.unet.UNet`. The number of output
channels and learned-variance head are derived from `config.data` and `config.diffusion` so a config
cannot disagree with itself.
"""
from __future__ import annotations

import jax.numpy as jnp

from difflax import growth
from difflax.models import layers
from difflax.models.unet import UNet

MODELS = {"unet": UNet}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def validate(model_config) -> None:
  """Raises ValueError naming the valid values of `config.model.name / dtype / remat`."""
  m = model_config
  if m.name not in MODELS:
    raise ValueError(f"Unknown model {m.name!r}; valid names: {sorted(MODELS)}.")
  if m.dtype not in DTYPES:
    raise ValueError(f"Unknown model.dtype {m.dtype!r}; valid: {sorted(DTYPES)}.")
  if m.remat not in layers.REMAT_POLICIES:
    raise ValueError(f"Unknown model.remat {m.remat!r}; valid: {sorted(layers.REMAT_POLICIES)} "
                     "(none: keep every activation; dots: keep conv / matmul outputs, recompute "
                     "the rest; full: recompute each block in the backward pass).")


def build_model(config, growth_state=None):
  """Module for `config.model` (name + hyperparameters) given the data / diffusion blocks; with
  progressive growth, the architecture of `growth_state` (default: the first stage)."""
  m = config.model
  validate(m)
  return MODELS[m.name](
      ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions), num_heads=m.num_heads,
      head_channels=m.head_channels, dropout=m.dropout,
      use_scale_shift_norm=m.use_scale_shift_norm, num_groups=m.num_groups, block=m.block,
      mbconv_expansion=m.mbconv_expansion, se_ratio=m.se_ratio,
      learn_sigma=config.diffusion.var_type == "learned_range",
      out_channels=config.data.channels,
      num_classes=config.data.num_classes if m.class_conditional else 0,
      aug_level_cond=config.cond.aug == "gaussian", project_downsample=m.project_downsample,
      patch_size=m.patch_size, dtype=DTYPES[m.dtype], remat=m.remat,
      **growth.model_kwargs(config, growth_state or growth.GrowthState()))


def make_apply(model, process=None):
  """`apply(params, x, t, y=None, train=False, rngs=None, low_res=None, aug_level=None,
  fade_weight=None) -> output`; `process.model_input(x, t)` (a `difflax.processes.Process`:
  Chen's input normalisation, NCSN's time-free network) is applied first, at training and
  sampling alike. low_res / aug_level: a cascade SR stage's conditioning."""

  def apply(params, x, t, y=None, train=False, rngs=None, low_res=None, aug_level=None,
            fade_weight=None):
    if process is not None:
      x, t = process.model_input(x, t)
    kw = {} if fade_weight is None else {"fade_weight": fade_weight}
    return model.apply({"params": params}, x, t, y=y, low_res=low_res, aug_level=aug_level,
                       train=train, rngs=rngs, **kw)
  return apply
