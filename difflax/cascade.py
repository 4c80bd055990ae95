"""Cascaded diffusion (CDM, paper 001): conditioning augmentation and the multi-stage pipeline.

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

The pipeline (one train loop; stages are configs): a cascade config holds `cascade` (stage order,
selection, pipeline / sweep settings) and `stages.<name>`, each a complete single-model config
whose SR stages set `data.low_res` to the previous stage's resolution. `stage_config` derives
what a stage inherits (the Gaussian augmentation's forward process = the previous stage's
diffusion), `run(config, workdir, mode)` trains stages in order into `workdir/<stage>/` with
`train.train` (each resumes on its own), samples the pipeline (`sample`) and sweeps the
augmentation level s over stored base samples (`sweep`, CDM Table 3).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

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
def is_cascade(config) -> bool:
  return "stages" in config and "cascade" in config


def stage_names(config) -> list[str]:
  return list(config.cascade.order)


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
  output resolution; augmentation settings are known; stages share one dataset."""
  from difflax import config as config_lib
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
      if sc.cond.sample_mode == "truncated" and (
          config.stages[names[i - 1]].diffusion.type != "discrete"):
        raise ValueError(f"{where}.cond.sample_mode='truncated' stops the previous stage's "
                         "discrete chain at s; that stage is not discrete. Use non_truncated.")
    config_lib.validate(sc)


# ---------------------------------------------------------------------------- run
def run(config, workdir: str, mode: str) -> dict:
  """train: every stage (or `cascade.stage`) in order, each resuming on its own; sample: the
  pipeline; sweep: pipeline metric vs the augmentation level s."""
  from difflax import train
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  if mode == "train":
    train._write_json(os.path.join(workdir, "config.json"),
                      json.loads(config.to_json_best_effort()))
    names = [config.cascade.stage] if config.cascade.stage else stage_names(config)
    results = {}
    for name in names:
      logging.info("Cascade stage %s (%d/%d)", name, stage_names(config).index(name) + 1,
                   len(stage_names(config)))
      results[name] = train.train(stage_config(config, name), os.path.join(workdir, name))
    return results
  if mode in ("eval",):
    name = config.cascade.stage or stage_names(config)[-1]
    return train.evaluate(stage_config(config, name), os.path.join(workdir, name))
  if mode == "sample":
    return sample(config, workdir)
  if mode == "sweep":
    return sweep(config, workdir)
  raise ValueError(f"Unknown --mode={mode!r} for a cascade; valid: train, sample, eval, sweep.")


class _Stage:
  """A trained stage ready to sample: setup, EMA params, the sample fns it needs."""

  def __init__(self, config, workdir: str, name: str):
    from difflax import train
    self.name, self.config = name, stage_config(config, name)
    self.setup = train.setup(self.config, os.path.join(workdir, name))
    if self.setup.checkpointer.latest_step() is None:
      raise FileNotFoundError(
          f"Cascade stage {name!r} has no checkpoint in {self.setup.checkpointer.directory}: "
          f"train it first (--mode=train, or --config.cascade.stage={name}).")
    state, _ = train.restore_or_init(self.setup)
    self.step = int(jax.device_get(state.step))
    self.params = state.ema_params if self.config.sample.use_ema else state.params
    self._fns: dict = {}

  def sample_fn(self, truncate_level: int = 0):
    from difflax import train
    if truncate_level not in self._fns:
      c = self.config.sample
      self._fns[truncate_level] = train.make_sample_fn(
          self.setup, c.sampler, c.steps, c.eta, c.guidance, c.clip_denoised,
          truncate_level=truncate_level)
    return self._fns[truncate_level]

  def generate(self, key, num: int, batch_size: int, cond: Optional[dict] = None,
               truncate_level: int = 0):
    from difflax import train
    return train.generate(self.setup, self.sample_fn(truncate_level), self.params, key, num,
                          batch_size, cond=cond, as_uint8=False)


def _pipeline(stages: list, key, num: int, batch_size: int, levels: Optional[dict] = None,
              modes: Optional[dict] = None, base_samples: Optional[np.ndarray] = None):
  """Runs every stage in order -> (float outputs [num, r, r, C] per stage, the conditioning each
  SR stage saw). `levels` / `modes` override an SR stage's cond.sample_level / sample_mode;
  `base_samples` reuses stored base outputs (what makes non-truncated sweeps cheap, Sec. 3.3).
  Stage i samples with key fold_in(key, i), so a truncated rerun of stage i - 1 starts from the
  same x_T as its full sample (and retraces it exactly when s - 1 is already a step of its
  chain) before stopping at z_s."""
  outs, conds = [], [None]
  for i, st in enumerate(stages):
    k = jax.random.fold_in(key, i)
    if i == 0:
      outs.append(st.generate(k, num, batch_size)[0] if base_samples is None else base_samples)
      continue
    cfg = ml_collections.ConfigDict(st.config.cond.to_dict())
    cfg.sample_level = int((levels or {}).get(st.name, cfg.sample_level))
    cfg.sample_mode = (modes or {}).get(st.name, cfg.sample_mode)
    truncated = cfg.aug == "gaussian" and cfg.sample_mode == "truncated" and cfg.sample_level > 0
    if truncated:
      low = stages[i - 1].generate(jax.random.fold_in(key, i - 1), num, batch_size,
                                   cond=conds[i - 1], truncate_level=cfg.sample_level)[0]
    else:
      low = np.clip(outs[-1], -1.0, 1.0)
    cond = jax.device_get(sampling_condition(jax.random.fold_in(k, 7), jnp.asarray(low), cfg,
                                             already_at_level=truncated))
    outs.append(st.generate(k, num, batch_size, cond=cond)[0])
    conds.append(cond)
  return outs, conds


def _load_stages(config, workdir: str) -> list:
  return [_Stage(config, workdir, n) for n in stage_names(config)]


def sample(config, workdir: str) -> dict:
  """--mode=sample: `cascade.num` pipeline samples; writes workdir/pipeline/<tag>/final.png, one
  <stage>.png per stage (SR stages: their conditioning next to their output) and final.npz."""
  from difflax import images as images_lib
  c = config.cascade
  stages = _load_stages(config, workdir)
  outs, conds = _pipeline(stages, jax.random.key(c.seed), c.num, c.batch_size)
  tag = "_".join(f"{st.name}{st.step}" for st in stages) + f"_seed{c.seed}_n{c.num}"
  for st in stages[1:]:
    if st.config.cond.aug == "gaussian":
      tag += f"_{st.name}-{st.config.cond.sample_mode}-s{st.config.cond.sample_level}"
  out_dir = os.path.join(workdir, "pipeline", tag)
  result = {"num": int(c.num), "dir": out_dir,
            "stages": {st.name: {"step": st.step, "resolution": st.config.data.resolution}
                       for st in stages}}
  if jax.process_index() == 0:
    final = images_lib.to_uint8(outs[-1])
    result["png"] = images_lib.save_png(os.path.join(out_dir, "final.png"),
                                        images_lib.make_grid(final))
    np.savez(os.path.join(out_dir, "final.npz"), images=final)
    images_lib.save_png(os.path.join(out_dir, f"{stages[0].name}.png"),
                        images_lib.make_grid(images_lib.to_uint8(outs[0])))
    for st, out, cond in zip(stages[1:], outs[1:], conds[1:]):
      images_lib.save_png(os.path.join(out_dir, f"{st.name}.png"),
                          images_lib.make_pair_grid(np.asarray(cond["low_res"]), out))
  logging.info("Cascade samples: %s", result)
  return result


def sweep(config, workdir: str) -> dict:
  """--mode=sweep: quick FD / KID of the pipeline's final samples against the eval split for each
  s in `cascade.sweep_levels` (the first SR stage's level, or `cascade.sweep_stage`'s), from base
  samples drawn once and stored (non-truncated, Sec. 3.3) and, with `cascade.sweep_truncated`,
  from truncated base chains. Writes workdir/sweep/sweep.json and sweep.png (CDM Table 3)."""
  from difflax import images as images_lib
  from difflax.evaluation import metrics, stats
  c = config.cascade
  stages = _load_stages(config, workdir)
  target = c.sweep_stage or stages[1].name if len(stages) > 1 else ""
  if not target or target == stages[0].name:
    raise ValueError("The s-sweep needs an SR stage (cascade.sweep_stage).")
  if stage_config(config, target).cond.aug != "gaussian":
    raise ValueError(f"Stage {target!r} uses cond.aug={stage_config(config, target).cond.aug!r};"
                     " the s-sweep applies to Gaussian conditioning augmentation.")
  out_dir = os.path.join(workdir, "sweep")
  os.makedirs(out_dir, exist_ok=True)
  key = jax.random.key(c.seed)
  base_path = os.path.join(out_dir, f"base_{stages[0].name}{stages[0].step}_seed{c.seed}_"
                           f"n{c.sweep_num}.npz")
  if os.path.exists(base_path):
    with np.load(base_path, allow_pickle=False) as f:
      base = f["samples"]
  else:
    base = stages[0].generate(jax.random.fold_in(key, 0), c.sweep_num, c.batch_size)[0]
    if jax.process_index() == 0:
      np.savez(base_path + ".tmp.npz", samples=base)
      os.replace(base_path + ".tmp.npz", base_path)
  final_cfg = stages[-1].config
  net = stats.extractor(final_cfg, "quick")
  ref = stats.reference_features(final_cfg, net, final_cfg.eval.reference_examples)
  ref_mu, ref_cov = ref.mean(0), np.cov(ref, rowvar=False)
  modes = ["non_truncated"] + (["truncated"] if c.sweep_truncated else [])
  rows = []
  for mode in modes:
    for level in c.sweep_levels:
      outs, _ = _pipeline(stages, key, c.sweep_num, c.batch_size, levels={target: level},
                          modes={target: mode},
                          base_samples=base if mode == "non_truncated" else None)
      f = net.features(images_lib.to_uint8(outs[-1]))
      kid, kid_std = metrics.kid(f, ref, num_subsets=20, subset_size=min(len(f), len(ref)))
      rows.append({"mode": mode, "s": int(level), "quick_fd": metrics.frechet_distance(
          f.mean(0), np.cov(f, rowvar=False), ref_mu, ref_cov), "quick_kid": kid,
          "quick_kid_std": kid_std})
      logging.info("s-sweep %s", rows[-1])
  result = {"stage": target, "num": int(c.sweep_num), "features": net.label,
            "reference": f"{final_cfg.data.name}:{final_cfg.data.eval_split}:{len(ref)}",
            "rows": rows, "base_samples": base_path}
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "sweep.json"), "w") as fh:
      json.dump(result, fh, indent=2)
    result["png"] = _plot_sweep(rows, os.path.join(out_dir, "sweep.png"), target, net.label)
  return result


def _plot_sweep(rows, path, stage, label):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for mode in sorted({r["mode"] for r in rows}):
    pts = [(r["s"], r["quick_fd"]) for r in rows if r["mode"] == mode]
    ax.plot(*zip(*pts), marker="o", label=mode)
  ax.set(xlabel=f"conditioning augmentation level s ({stage})", ylabel=f"FD ({label})",
         title="Cascade quality vs s")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
