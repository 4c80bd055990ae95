"""Cascaded diffusion (CDM, paper 001): conditioning augmentation and stage configs (pure).

Contract, pure functions (jit-able; `cond` is a stage config's `cond` block):
  `gaussian_blur(images: [B, H, W, C], sigma: [B], kernel_size=3) -> [B, H, W, C]`, a normalised
    k x k Gaussian per example (separable, reflect padding); sigma -> 0 is the identity.
  `augment_condition(key, low_res: [B, h, w, C], config) -> (low_res', level: [B])`, the stage's
    training-time augmentation: "blur" (Sec. 3.1: sigma ~ U(min, max) on a `blur_prob` fraction,
    level 0), "gaussian" (Sec. 3.2/3.3: z_s ~ q(z_s | z_0) of the previous stage's forward process
    at s ~ U{0..max_level} or a fixed s; level = s on the model's 0..1000 time scale), "none".
  `noise_to_level(key, z0, s: [B], cond)` is that forward process (s = 0: unchanged, s >= 1: the
    marginal of the previous chain's index s - 1, i.e. CDM's z_s), shared by training, the
    non-truncated sampler and the sweep.

Stage configs (pure): a cascade config holds `cascade` (stage order, selection, pipeline / sweep
settings) and `stages.<name>`, each a complete single-model config whose SR stages set
`data.low_res` to the previous stage's resolution. `stage_config` derives what a stage inherits
(the Gaussian augmentation's forward process = the previous stage's diffusion); `validate` checks
the chain. Training stages is the one train loop's job (`train.run`; their order is `modes`');
sampling the pipeline and the s-sweep are `pipeline.py`'s.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from difflax import schedules

AUGS = ("none", "gaussian", "blur")
SAMPLE_MODES = ("non_truncated", "truncated")
MODEL_LEVEL_SCALE = 1000.0  # s is fed like a time in [0, 1000] whatever T the previous stage has.


# ---------------------------------------------------------------------------- augmentation
def _cond_block(config):
  return config.cond if "cond" in config else config


def gaussian_blur(images, sigma, kernel_size: int = 3):
  """images: [B, H, W, C]; sigma: [B] (or scalar) -> [B, H, W, C] blurred per example."""
  if kernel_size % 2 != 1:
    raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
  b = images.shape[0]
  r = kernel_size // 2
  sigma = jnp.maximum(jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,)), 1e-6)
  offsets = jnp.arange(-r, r + 1, dtype=jnp.float32)
  g = jnp.exp(-offsets[None] ** 2 / (2 * sigma[:, None] ** 2))
  g = g / g.sum(1, keepdims=True)  # [B, k]; separable: the 2-D kernel is g g^T, sum 1.
  x = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
  h, w = images.shape[1:3]
  x = sum(g[:, i, None, None, None] * x[:, i:i + h] for i in range(kernel_size))
  return sum(g[:, i, None, None, None] * x[:, :, i:i + w] for i in range(kernel_size))


def aug_alphas_cumprod(cond) -> np.ndarray:
  """[T] alpha-bar of the Gaussian augmentation's forward process (float64)."""
  if not cond.schedule or cond.num_timesteps <= 0:
    raise ValueError("Gaussian conditioning augmentation needs cond.schedule and "
                     "cond.num_timesteps (a cascade config fills them from the previous stage).")
  return np.cumprod(1.0 - schedules.get_betas(cond.schedule, int(cond.num_timesteps)))


def max_level(cond) -> int:
  return int(cond.max_level or cond.num_timesteps)


def level_input(s, cond):
  """s: [B] int levels in {0..T} -> the float the model's augmentation embedding sees."""
  return jnp.asarray(s, jnp.float32) * (MODEL_LEVEL_SCALE / cond.num_timesteps)


def noise_to_level(key, z0, s, cond):
  """z0: [B, h, w, C], s: [B] ints in {0..T} -> z_s: sqrt(a) z0 + sqrt(1 - a) eps with
  a = alpha_bar[s - 1] (CDM's z_s; s = 0 is z0 itself)."""
  acp = jnp.asarray(np.append(1.0, aug_alphas_cumprod(cond)), jnp.float32)
  a = acp[jnp.asarray(s, jnp.int32)].reshape(-1, 1, 1, 1)
  eps = jax.random.normal(key, z0.shape, jnp.float32)
  return jnp.sqrt(a) * z0 + jnp.sqrt(1.0 - a) * eps


def augment_condition(key, low_res, config):
  """Training-time conditioning augmentation of a stage (config or its `cond` block).

  low_res: [B, h, w, C] in [-1, 1] -> (augmented [B, h, w, C], level [B] fed to the model)."""
  cond = _cond_block(config)
  b = low_res.shape[0]
  k_level, k_noise, k_apply = jax.random.split(key, 3)
  if cond.aug == "none":
    return low_res, jnp.zeros((b,), jnp.float32)
  if cond.aug == "blur":
    # Sec. 3.1: blur a fraction of the examples; the rest (and all at sampling) stay sharp.
    sigma = jax.random.uniform(k_level, (b,), jnp.float32, cond.blur_sigma_min,
                               cond.blur_sigma_max)
    apply = jax.random.bernoulli(k_apply, cond.blur_prob, (b,))
    blurred = gaussian_blur(low_res, sigma, cond.blur_kernel)
    return jnp.where(apply[:, None, None, None], blurred, low_res), jnp.zeros((b,), jnp.float32)
  if cond.aug == "gaussian":
    # Sec. 3.2: one SR model amortized over s ~ U{0..T}, s given as an extra embedding.
    if cond.train_level >= 0:
      s = jnp.full((b,), int(cond.train_level), jnp.int32)
    else:
      s = jax.random.randint(k_level, (b,), 0, max_level(cond) + 1)
    return noise_to_level(k_noise, low_res, s, cond), level_input(s, cond)
  raise ValueError(f"Unknown cond.aug {cond.aug!r}; valid: {AUGS}.")


def sampling_condition(key, low_res, cond, already_at_level: bool = False) -> dict:
  """The model inputs for sampling an SR stage from a low-res image [B, h, w, C]: blur and
  "none" condition on it as is; Gaussian at `cond.sample_level` re-noises it (non-truncated,
  Sec. 3.3) unless it is already z_s from a truncated previous chain (Sec. 3.2)."""
  b = low_res.shape[0]
  if cond.aug != "gaussian":
    return {"low_res": low_res, "aug_level": jnp.zeros((b,), jnp.float32)}
  s = jnp.full((b,), int(cond.sample_level), jnp.int32)
  z = low_res if already_at_level else noise_to_level(key, low_res, s, cond)
  return {"low_res": z, "aug_level": level_input(s, cond)}


# ---------------------------------------------------------------------------- stage configs
def cascade_config(stages: dict) -> ml_collections.ConfigDict:
  """A cascade: `stages` maps names to complete stage configs (each from `base_config()`), in
  pipeline order; SR stages set `data.low_res` to the previous stage's resolution."""
  c = ml_collections.ConfigDict()
  c.cascade = ml_collections.ConfigDict(dict(
      order=tuple(stages),
      stage="",             # Train / eval only this stage ("" = all, in order; each resumes).
      num=16,               # --mode=sample: pipeline samples,
      batch_size=16,        # per sharded batch,
      seed=0,
      sweep_stage="",       # --mode=sweep: the SR stage whose s is swept ("" = the first),
      sweep_levels=(0, 50, 100, 200, 400),
      sweep_num=64,         # samples per s (quick FD / KID vs the eval split),
      sweep_truncated=False,  # also sweep truncated chains (reruns the base per s).
  ))
  c.stages = ml_collections.ConfigDict(stages)
  return c


def is_cascade(config) -> bool:
  return "stages" in config and "cascade" in config


def stage_names(config) -> list[str]:
  return list(config.cascade.order)


def selected_stages(config) -> list[str]:
  """The stages a run works on: `cascade.stage` alone when it is set, else every stage in order
  (what `--mode=train` trains and `--mode=plan` compiles)."""
  return [config.cascade.stage] if config.cascade.stage else stage_names(config)


def stage_config(config, name: str) -> ml_collections.ConfigDict:
  """The complete single-model config of stage `name`, with what it inherits filled in: the
  Gaussian augmentation's forward process is the previous stage's discrete diffusion."""
  names = stage_names(config)
  if name not in names:
    raise ValueError(f"Unknown cascade stage {name!r}; this cascade has {names}.")
  c = ml_collections.ConfigDict(config.stages[name].to_dict())
  i = names.index(name)
  if i > 0:
    prev = config.stages[names[i - 1]]
    if not c.cond.schedule:
      c.cond.schedule = prev.diffusion.schedule
    if not c.cond.num_timesteps:
      c.cond.num_timesteps = prev.diffusion.num_timesteps
  c.lock()
  return c


def validate(config) -> None:
  """Stage chain checks, at config load: each SR stage conditions on exactly the previous stage's
  output resolution; augmentation settings are known; stages share one dataset. (Each stage's
  own settings are checked by `config.validate` on `stage_config`.)"""
  names = stage_names(config)
  if not names:
    raise ValueError("config.cascade.order lists no stages.")
  missing = [n for n in names if n not in config.stages]
  if missing:
    raise ValueError(f"config.cascade.order names stages {missing} that config.stages lacks "
                     f"(it has {sorted(config.stages.keys())}).")
  if config.cascade.stage and config.cascade.stage not in names:
    raise ValueError(f"config.cascade.stage={config.cascade.stage!r} is not a stage; "
                     f"valid: {names} (or '' for all, in order).")
  for i, name in enumerate(names):
    st = config.stages[name]
    where = f"config.stages.{name}"
    if i == 0 and st.data.low_res:
      raise ValueError(f"{where}.data.low_res={st.data.low_res}: the first stage ({name}) is "
                       "the base model and has no low-resolution input; set it to 0.")
    if i > 0:
      prev = config.stages[names[i - 1]]
      if st.data.low_res != prev.data.resolution:
        raise ValueError(
            f"{where}.data.low_res={st.data.low_res} does not match the output of the previous "
            f"stage {names[i - 1]!r} (data.resolution={prev.data.resolution}): an SR stage "
            f"conditions on its predecessor's samples. Set {where}.data.low_res="
            f"{prev.data.resolution}.")
      if st.data.resolution <= st.data.low_res or st.data.resolution % st.data.low_res:
        raise ValueError(f"{where}.data.resolution={st.data.resolution} must be a multiple > 1 "
                         f"of its low_res={st.data.low_res}.")
      if st.data.name != prev.data.name:
        raise ValueError(f"{where}.data.name={st.data.name!r} differs from stage "
                         f"{names[i - 1]!r}'s {prev.data.name!r}; a cascade models one dataset.")
      if st.model.class_conditional != prev.model.class_conditional:
        raise ValueError(f"Stages {names[i - 1]!r} and {name!r} disagree on "
                         "model.class_conditional; the pipeline passes one label per sample "
                         "through every stage.")
    if "cond" not in st:  # A resolved config keeps it only where data.low_res > 0.
      continue
    if st.cond.aug not in AUGS:
      raise ValueError(f"{where}.cond.aug={st.cond.aug!r}; valid: {AUGS}.")
    if st.cond.sample_mode not in SAMPLE_MODES:
      raise ValueError(f"{where}.cond.sample_mode={st.cond.sample_mode!r}; valid: "
                       f"{SAMPLE_MODES}.")
    sc = stage_config(config, name)
    if sc.cond.aug == "gaussian":
      if i == 0:
        raise ValueError(f"{where}.cond.aug='gaussian' on the base stage: only SR stages "
                         "take a conditioning image.")
      if not 0 <= sc.cond.sample_level <= max_level(sc.cond):
        raise ValueError(f"{where}.cond.sample_level={sc.cond.sample_level} outside "
                         f"0..{max_level(sc.cond)}.")
