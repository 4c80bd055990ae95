"""Helpers the config files share (`configs/*.py`): parsing the ':arg' of `--config=NAME:arg`
into presets and `key=value` shorthands, and the presets several configs apply.

Contract: `parse_arg("paper,num_steps=100") -> (["paper"], {"num_steps": "100"})`;
`check_presets(presets, known, __file__)` raises `ConfigError` naming the valid ones;
`apply_shorthands(c, kv, __file__)` sets `num_steps=`, `batch=`, `resolution=`, `dataset=`;
`apply_tiny(c)` / `apply_tiny_cascade(c)` the `:tiny` smoke preset; `apply_ddpm_cifar10(c)` DDPM's
CIFAR-10 setup. They edit a `config.base_config()` in place; the config file then returns
`config.finalize(c)`.
"""
from __future__ import annotations

import os

import ml_collections

from difflax.config import ConfigError


def parse_arg(arg: str | None) -> tuple[list[str], dict[str, str]]:
  """'paper,steps=100' -> (['paper'], {'steps': '100'})."""
  presets, kv = [], {}
  for token in filter(None, (arg or "").split(",")):
    k, eq, v = token.partition("=")
    if eq:
      kv[k.strip()] = v.strip()
    else:
      presets.append(token.strip())
  return presets, kv


# `:key=value` shorthands every config file accepts (any field: --config.x.y=value).
SHORTHANDS = {"num_steps": ("train", "num_steps", int), "batch": ("data", "batch_size", int),
              "resolution": ("data", "resolution", int), "dataset": ("data", "name", str)}


def apply_shorthands(c: ml_collections.ConfigDict, kv: dict, config_name: str) -> None:
  for k, v in kv.items():
    if k not in SHORTHANDS:
      raise ConfigError(f"Unknown ':{k}=...' for {config_name}; valid: {sorted(SHORTHANDS)} "
                        "(or override any field with --config.<path>=value).")
    block, field, typ = SHORTHANDS[k]
    c[block][field] = typ(v)


def apply_ddpm_cifar10(c: ml_collections.ConfigDict) -> None:
  """DDPM's CIFAR-10 setup (Ho et al. 2020, Sec. 4 and App. B), shared by the configs that start
  from it (ddpm_cifar10:paper, dgm_cifar10:paper)."""
  c.diffusion.update(schedule="linear", num_timesteps=1000, var_type="fixed_large")
  c.loss.type = "simple"
  c.data.update(name="cifar10", resolution=32, num_classes=10, batch_size=128)
  c.model.update(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                 num_heads=1, dropout=0.1, num_groups=32)
  c.optim.update(lr=2e-4, warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999, ema_warmup=False)
  c.train.update(num_steps=800_000, log_every=100, checkpoint_every=10_000,
                 preview_every=10_000, preview_num=64, preview_steps="ddim100")
  c.sample.update(num=50_000, batch_size=256, sampler="ddpm", steps="")
  c.eval.update(num_batches=10, batch_size=128)


def apply_tiny(c: ml_collections.ConfigDict) -> None:
  """The `:tiny` smoke preset every config offers: 8x8 images, a ~45k-param UNet, 4 steps."""
  c.data.update(resolution=8, batch_size=8, num_examples=64)
  c.model.update(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4,
                 patch_size=1)
  c.diffusion.num_timesteps = 100
  c.train.update(num_steps=4, log_every=2, checkpoint_every=2, preview_every=4, preview_num=8,
                 preview_steps="5")
  c.sample.update(num=8, batch_size=8, steps="5")
  c.eval.update(num_batches=1, batch_size=8, num_samples=16, reference_examples=64,
                feature_steps=100,  # A weak quick network: smoke tests check plumbing.
                quality_line=False, quality_samples=16)


def apply_tiny_cascade(c: ml_collections.ConfigDict) -> None:
  """`:tiny` for a cascade: the first stage at 8x8, each SR stage doubling it, ~10k-param UNets,
  4 steps each, 8 pipeline samples."""
  res = 8
  for i, name in enumerate(c.cascade.order):
    st = c.stages[name]
    apply_tiny(st)
    st.model.class_conditional = False
    st.sample.guidance = 0.0  # Guidance needs class conditioning.
    if i:
      st.data.update(low_res=res, resolution=2 * res)
      st.model.attn_resolutions = ()
      st.cond.update(schedule="", num_timesteps=0, max_level=0, sample_level=10,
                     train_level=-1)
      res *= 2
  c.cascade.update(num=8, batch_size=8, sweep_levels=(0, 10, 50), sweep_num=8)


def check_presets(presets, known, config_name: str):
  unknown = [p for p in presets if p not in known]
  if unknown:
    raise ConfigError(f"Unknown preset(s) {unknown} for {os.path.basename(config_name)}; "
                      f"valid presets: {sorted(known)}.")
