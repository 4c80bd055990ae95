"""Model registry: networks are chosen by name from `config.model.name`.

Contract: `build_model(config)` returns an unbound Flax module whose `__call__(x, t, y=None,
low_res=None, aug_level=None, train=False)` follows `difflax.models.unet.UNet`. The number of output
channels and learned-variance head are derived from `config.data` and `config.diffusion` so a config
cannot disagree with itself.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from difflax import growth
from difflax.models import layers
from difflax.models.unet import UNet

MODELS = {"unet": UNet}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def validate(config) -> None:
  """Raises ValueError on a `config.model` that cannot be built: an unknown name / dtype /
  remat (naming the valid values), or a geometry that does not fit `config.data`."""
  m = config.model
  if m.name not in MODELS:
    raise ValueError(f"Unknown model {m.name!r}; valid names: {sorted(MODELS)}.")
  if m.dtype not in DTYPES:
    raise ValueError(f"Unknown model.dtype {m.dtype!r}; valid: {sorted(DTYPES)}.")
  if m.remat not in layers.REMAT_POLICIES:
    raise ValueError(f"Unknown model.remat {m.remat!r}; valid: {sorted(layers.REMAT_POLICIES)} "
                     "(none: keep every activation; dots: keep conv / matmul outputs, recompute "
                     "the rest; full: recompute each block in the backward pass).")
  levels, p, res = len(m.ch_mult), int(m.patch_size), config.data.resolution
  if p < 1 or (p > 1 and growth.enabled(config)):
    raise ValueError(f"config.model.patch_size={p}: it must be >= 1 and 1 with progressive "
                     "growth (growth adds levels at the full resolution).")
  if res % (p * 2 ** (levels - 1)):
    raise ValueError(f"config.data.resolution={res} does not fit {levels} UNet levels "
                     f"(ch_mult={tuple(m.ch_mult)}) on {p}x{p} patches: it must be divisible "
                     f"by {p * 2 ** (levels - 1)}.")
  level_res = {res // p // 2 ** i for i in range(levels)}
  bad = [r for r in m.attn_resolutions if r not in level_res]
  if bad:
    raise ValueError(f"config.model.attn_resolutions={tuple(m.attn_resolutions)} names "
                     f"resolutions {bad} that no level has at data.resolution={res}; levels "
                     f"are at {sorted(level_res, reverse=True)}.")
  if m.class_conditional and config.data.num_classes <= 0:
    raise ValueError("model.class_conditional=True needs labels (data.num_classes > 0).")
  guidance = config.sample.guidance
  if guidance and not (m.class_conditional and m.label_dropout > 0):
    # The unconditional half of guidance is the null label's prediction: without null labels in
    # training it is an untrained input (or, unconditional, the guidance would be silently off).
    raise ValueError(f"config.sample.guidance={guidance:g} needs a class-conditional model "
                     "trained with null labels (model.class_conditional=True and "
                     f"model.label_dropout > 0; here {bool(m.class_conditional)} and "
                     f"{m.label_dropout:g}). Set sample.guidance=0 or train such a model.")


# `config.model` keys the training step reads (classifier-free guidance), not the network.
TRAINING_KEYS = ("name", "class_conditional", "label_dropout")
# Module fields set from the rest of the config (data, diffusion, cascade, growth) or by Flax.
DERIVED_FIELDS = ("learn_sigma", "out_channels", "num_classes", "aug_level_cond", "skip_levels",
                  "fade", "parent", "name")


def config_block(name: str = "unet", **defaults) -> dict:
  """`config.model`'s keys and defaults: the module's own fields at their defaults (the dtype by
  name) except `DERIVED_FIELDS`, then `TRAINING_KEYS`; `defaults` replace some (base_config's
  CPU sizes). So a new hyper-parameter is a field of the module and nothing else."""
  dtype_names = {v: k for k, v in DTYPES.items()}
  block = {"name": name, "class_conditional": False,
           "label_dropout": 0.1}  # Probability of the null label (classifier-free guidance).
  for f in dataclasses.fields(MODELS[name]):
    if f.name not in DERIVED_FIELDS:
      block[f.name] = dtype_names[f.default] if f.name == "dtype" else f.default
  unknown = sorted(set(defaults) - set(block))
  if unknown:
    raise ValueError(f"{unknown[0]!r} is not a config.model key of {name!r}: {sorted(block)}.")
  return {**block, **defaults}


def build_model(config, growth_state=None):
  """Module for `config.model` given the data / diffusion blocks; with progressive growth, the
  architecture of `growth_state` (default: the first stage). Every `config.model` key but
  `TRAINING_KEYS` is a field of the registered module, passed as is (tuples as tuples, `dtype`
  by name); `config_block` made those keys from the module's fields, so a new hyper-parameter
  is a module field and nothing else."""
  m = config.model
  validate(config)
  cls = MODELS[m.name]
  fields = {f.name for f in dataclasses.fields(cls)}
  own = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in m.items()
         if k not in TRAINING_KEYS}
  unknown = sorted(set(own) - fields)
  if unknown:
    raise ValueError(f"config.model.{unknown[0]} is not a field of {cls.__name__} "
                     f"(its fields: {sorted(fields - {'parent', 'name'})}).")
  own["dtype"] = DTYPES[m.dtype]
  return cls(**own, learn_sigma=config.diffusion.var_type == "learned_range",
             out_channels=config.data.channels,
             num_classes=config.data.num_classes if m.class_conditional else 0,
             aug_level_cond="cond" in config and config.cond.aug == "gaussian",
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
