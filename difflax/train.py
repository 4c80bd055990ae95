"""The one training loop, plus the sample and eval modes that share its setup.

Contract: `run(config, workdir, mode)` with mode "train" | "sample" | "eval". Train: mesh -> data
-> abstract state (`eval_shape`) -> shardings -> restore latest checkpoint or init -> loop (jitted
step, metrics, checkpoints, previews, evals) -> final checkpoint. A SIGTERM saves a checkpoint and
returns; a NaN loss stops the run with a message and no checkpoint of the bad state. Outputs in
`workdir`: config.json, checkpoints/, samples/step_XXXXXX.png, eval/*.json and TensorBoard events.
Sample: latest checkpoint's EMA params -> `config.sample.num` images, sharded over the mesh, as a
PNG grid and an .npz of uint8. Eval: bits/dim on the eval split (the full VLB over all t).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from difflax import cascade
from difflax import checkpoint as ckpt_lib
from difflax import config as config_lib
from difflax import data as data_lib
from difflax import diffusion as diff_lib
from difflax import growth
from difflax import images as images_lib
from difflax import losses
from difflax import models
from difflax import noise_scales
from difflax import parallel
from difflax import samplers
from difflax import schedules
from difflax import state as state_lib
from difflax import step as step_lib

MODES = ("train", "sample", "eval", "sweep")


# ------------------------------------------------------------------------------------- Setup
@dataclasses.dataclass
class Setup:
  config: Any
  workdir: str
  mesh: Any
  model: Any
  diffusion: Optional[diff_lib.Diffusion]  # None for score models.
  ncsn: Optional[dict]  # noise_scales.from_config for score models, else None.
  objective: Any
  optimizer: Any
  lr_schedule: Any
  init_fn: Any
  abstract_state: Any
  shardings: Any
  checkpointer: ckpt_lib.Checkpointer
  keys: dict
  growth_state: growth.GrowthState = growth.GrowthState()

  @property
  def resolution(self) -> int:
    """The model's input resolution (a progressive growth stage's, else data.resolution)."""
    return growth.resolution(self.config, self.growth_state)

  @functools.cached_property
  def best_checkpointer(self) -> ckpt_lib.Checkpointer:
    """workdir/best: the state of the best eval so far (eval/best.json says which step)."""
    return ckpt_lib.Checkpointer(os.path.join(self.workdir, "best"), keep=1)

  @property
  def batch_sharding(self) -> NamedSharding:
    return parallel.batch_sharding(self.mesh)

  def meta(self, state, extra: Optional[dict] = None) -> dict:
    meta = {"step": int(jax.device_get(state.step)),
            "param_shapes": ckpt_lib.param_shapes(self.abstract_state.params),
            "model": self.config.model.to_dict(), "data_resolution": self.config.data.resolution,
            "diffusion": self.config.diffusion.to_dict(), **(extra or {})}
    if growth.enabled(self.config):
      meta.update(growth=self.growth_state.to_meta(), resolution=self.resolution)
    if self.ncsn is not None:
      meta["ncsn"] = {k: np.asarray(v).tolist() for k, v in self.ncsn.items()}
    return meta


def setup(config, workdir: str, growth_state: Optional[growth.GrowthState] = None,
          checkpointer: Optional[ckpt_lib.Checkpointer] = None) -> Setup:
  """Everything but data and allocated state; cheap (shapes only). With progressive growth and no
  `growth_state`, the latest checkpoint's growth stage decides the architecture (so a resumed run
  rebuilds the network it saved)."""
  checkpointer = checkpointer or ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                                       keep=config.train.keep_checkpoints)
  if growth_state is None:
    meta = checkpointer.read_meta() if growth.enabled(config) else None
    growth_state = growth.GrowthState.from_meta((meta or {}).get("growth"))
  mesh = parallel.make_mesh(config.mesh)
  model = models.build_model(config, growth_state)
  ncsn = diffusion = None
  if config.diffusion.type == "ncsn":
    ncsn = noise_scales.from_config(config)
    logging.info("NCSN noise scales: sigma %.4g -> %.4g, L=%d, ratio %.5f (coverage %.3f), "
                 "step size %.3g", ncsn["sigmas"][0], ncsn["sigmas"][-1], len(ncsn["sigmas"]),
                 ncsn["ratio"], ncsn["coverage"], ncsn["step_size"])
  else:
    diffusion = diff_lib.from_config(config.diffusion)
  objective = losses.make_objective(config, diffusion,
                                    None if ncsn is None else jnp.asarray(ncsn["sigmas"]))
  optimizer, lr_schedule = state_lib.make_optimizer(config.optim)
  base = jax.random.key(config.seed)
  keys = dict(zip(("init", "step", "preview", "eval"), jax.random.split(base, 4)))
  init_fn = functools.partial(state_lib.init_state, model, optimizer, config,
                              resolution=growth.resolution(config, growth_state))
  abstract = jax.eval_shape(init_fn, keys["init"])
  shardings = parallel.state_shardings(abstract, mesh, config.mesh)
  return Setup(config, workdir, mesh, model, diffusion, ncsn, objective, optimizer, lr_schedule,
               init_fn, abstract, shardings, checkpointer, keys, growth_state)


def restore_or_init(s: Setup):
  """(state, restored?) — the latest checkpoint if any, else a fresh sharded init."""
  if s.checkpointer.latest_step() is not None:
    target = jax.tree_util.tree_map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        s.abstract_state, s.shardings)
    state, meta = s.checkpointer.restore(target)
    logging.info("Restored step %d from %s", meta["step"], s.checkpointer.directory)
    return state, True
  return jax.jit(s.init_fn, out_shardings=s.shardings)(s.keys["init"]), False


def num_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


# ------------------------------------------------------------------------------------ Sample
def class_labels(config, n: int, offset: int = 0) -> np.ndarray:
  k = config.data.num_classes if config.model.class_conditional else 0
  if not k:
    return np.zeros((n,), np.int32)
  if config.sample.label >= 0:
    return np.full((n,), config.sample.label, np.int32)
  return ((np.arange(n) + offset) % k).astype(np.int32)


def make_sample_fn(s: Setup, method: str, respacing: Any, eta: float = 0.0,
                   guidance: float = 0.0, clip_denoised: bool = True, truncate_level: int = 0):
  """Jitted `(params, key, labels: [B], cond: dict) -> images [B, H, W, C]`, sharded over the
  batch axes. `cond` is {} or a cascade SR stage's {"low_res": [B, h, w, C], "aug_level": [B]}.

  The samplers are mesh-free; the sharding constraint on x inside the denoiser is what spreads the
  batch over devices. Score models (diffusion.type="ncsn") sample with annealed Langevin dynamics
  and ignore method / respacing; continuous-time models return x0 = (b x0) / b. With
  `truncate_level` s > 0 (discrete models) the chain stops at CDM's z_s, the noise level of
  original step s - 1, which is added to the respaced chain so the stop is exact (paper 001
  Sec. 3.2).
  """
  c = s.config
  stop_at = -1
  if s.ncsn:
    d = None
  elif truncate_level > 0:
    if c.diffusion.type != "discrete":
      raise ValueError("Truncated sampling stops a discrete chain; this stage is "
                       f"diffusion.type={c.diffusion.type!r}.")
    t_max = int(c.diffusion.num_timesteps)
    if truncate_level > t_max:
      raise ValueError(f"Truncation level {truncate_level} exceeds the chain's T={t_max}.")
    kept = (set(range(t_max)) if respacing in (None, "", 0)
            else set(schedules.space_timesteps(t_max, respacing)))
    kept = sorted(kept | {truncate_level - 1})
    d = diff_lib.from_config(c.diffusion, respacing=kept)
    stop_at = kept.index(truncate_level - 1)
  else:
    d = diff_lib.from_config(c.diffusion, respacing=respacing)
  model_apply = models.make_apply(s.model, c)
  num_classes = c.data.num_classes if c.model.class_conditional else 0
  shape_hw = (s.resolution, s.resolution, c.data.channels)
  sharding = s.batch_sharding

  def sample_fn(params, key, labels, cond):
    def apply(x, t, y):
      x = jax.lax.with_sharding_constraint(x, sharding)
      # Guidance doubles the batch; the conditioning image goes with both halves.
      reps = x.shape[0] // labels.shape[0]
      kw = {k: jnp.concatenate([v] * reps) if reps > 1 else v for k, v in cond.items()}
      return model_apply(params, x, t, y=y if num_classes else None, **kw)
    shape = (labels.shape[0],) + shape_hw
    if s.ncsn is not None:
      return samplers.annealed_langevin(
          lambda x, sigma: apply(x, sigma, labels), s.ncsn["sigmas"], shape, key,
          step_size=s.ncsn["step_size"], steps_per_scale=c.ncsn.steps_per_scale,
          final_denoise=c.ncsn.final_denoise)
    if num_classes and guidance:
      denoise = samplers.classifier_free_guidance(apply, labels, num_classes, guidance,
                                                  c.data.channels)
    else:
      denoise = lambda x, t: apply(x, t, labels)
    x = samplers.sample(denoise, d, shape, key, method=method, eta=eta,
                        clip_denoised=clip_denoised, stop_at=stop_at)
    return x / c.diffusion.input_scale

  return jax.jit(sample_fn, in_shardings=(s.shardings.params, None, sharding, sharding),
                 out_shardings=sharding)


def model_conditions(s: Setup, num: int, key, step: Optional[int] = None) -> Optional[dict]:
  """Per-sample model inputs for sampling outside a cascade pipeline (previews, evals), or None:
  an SR stage's conditioning built from `num` eval-split examples (box-downsampled, augmented as
  at sampling), and a fading growth stage's fade weight at `step`."""
  c = s.config
  cond = {}
  if c.data.low_res:
    images = data_lib.sample_array(c.data, num, c.seed, c.data.eval_split)
    low = data_lib.box_downsample(images, c.data.low_res)
    cond.update(jax.device_get(cascade.sampling_condition(key, jnp.asarray(low), c.cond)))
  if s.growth_state.fading:
    lam = growth.current_fade(c, s.growth_state, s.growth_state.stage_start if step is None
                              else step)
    cond["fade_weight"] = np.full((num,), float(lam), np.float32)
  return cond or None


def generate(s: Setup, sample_fn, params, key, num: int, batch_size: int,
             shard_dir: Optional[str] = None, cond: Optional[dict] = None,
             as_uint8: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """`num` uint8 images [num, H, W, C] (float32 as sampled with `as_uint8=False`) and their
  labels, in mesh-sharded batches of `batch_size`. `cond`: per-sample conditioning arrays
  [num, ...] (a cascade SR stage's inputs), batched alongside.

  Batch i uses `fold_in(key, i)`, so it does not depend on what ran before. With `shard_dir`,
  each batch is written there as `shard_XXXXX.npz` (atomically) and batches already on disk are
  loaded instead of sampled: an interrupted 50k-sample run resumes where it stopped without
  duplicating or losing shards.
  """
  devices = s.mesh.devices.size
  batch_size = max(devices, (batch_size // devices) * devices)
  num_batches = -(-num // batch_size)
  out, labs, t0, done = [], [], time.perf_counter(), 0
  for i in range(num_batches):
    path = shard_dir and os.path.join(shard_dir, f"shard_{i:05d}.npz")
    if path and os.path.exists(path):
      with np.load(path, allow_pickle=False) as f:
        out.append(f["images"])
        labs.append(f["labels"])
      continue
    labels = class_labels(s.config, batch_size, i * batch_size)
    rows = np.arange(i * batch_size, (i + 1) * batch_size) % num  # The last batch wraps.
    batch_cond = {k: jax.device_put(np.asarray(v)[rows], s.batch_sharding)
                  for k, v in (cond or {}).items()}
    x = sample_fn(params, jax.random.fold_in(key, i), jax.device_put(labels, s.batch_sharding),
                  batch_cond)
    x = parallel.to_host(x)
    if as_uint8 and x.shape[1] < s.config.data.resolution:
      # A progressive growth stage samples at its resolution; images are shown (and evaluated)
      # at the final size, nearest-upsampled.
      f = s.config.data.resolution // x.shape[1]
      x = np.repeat(np.repeat(x, f, 1), f, 2)
    out.append(images_lib.to_uint8(x) if as_uint8 else np.asarray(x, np.float32))
    labs.append(labels)
    done += 1
    if path and jax.process_index() == 0:
      os.makedirs(shard_dir, exist_ok=True)
      np.savez(path + ".tmp.npz", images=out[-1], labels=labels)
      os.replace(path + ".tmp.npz", path)
    if shard_dir:
      rate = done / (time.perf_counter() - t0)
      logging.info("Sample batch %d/%d (%.2f batches/s, ETA %.0fs)", i + 1, num_batches, rate,
                   (num_batches - i - 1) / rate)
  return np.concatenate(out)[:num], np.concatenate(labs)[:num]


def sample(config, workdir: str) -> dict:
  """--mode=sample: `config.sample.num` images from the latest checkpoint as per-batch shards
  (resumable), one .npz of uint8 images and labels, and a PNG grid of the first 256."""
  s = setup(config, workdir)
  if s.checkpointer.latest_step() is None:
    raise FileNotFoundError(f"No checkpoint in {s.checkpointer.directory}: train first with "
                            f"--mode=train --workdir={workdir}.")
  state, _ = restore_or_init(s)
  c = config.sample
  fn = make_sample_fn(s, c.sampler, c.steps, c.eta, c.guidance, c.clip_denoised)
  params = state.ema_params if c.use_ema else state.params
  step = int(jax.device_get(state.step))
  method = "langevin" if s.ncsn else f"{c.sampler}{c.steps or 'all'}_eta{c.eta:g}"
  # Everything that changes the images is in the tag, so resumed shards always match.
  tag = (f"sample_step{step:06d}_{method}_w{c.guidance:g}_label{c.label}_"
         f"{'ema' if c.use_ema else 'raw'}_seed{c.seed}_bs{c.batch_size}")
  out_dir = os.path.join(workdir, "samples")
  t0 = time.perf_counter()
  imgs, labels = generate(s, fn, params, jax.random.key(c.seed), c.num, c.batch_size,
                          shard_dir=os.path.join(out_dir, tag),
                          cond=model_conditions(s, c.num, jax.random.key(c.seed), step))
  secs = time.perf_counter() - t0
  result = {"num": int(len(imgs)), "seconds": secs, "step": step}
  if jax.process_index() == 0:
    result["png"] = images_lib.save_png(os.path.join(out_dir, tag + ".png"),
                                        images_lib.make_grid(imgs[:256]))
    result["npz"] = os.path.join(out_dir, tag + ".npz")
    np.savez(result["npz"], images=imgs, labels=labels)
  logging.info("Sampled %d images in %.1fs: %s", len(imgs), secs, result)
  return result


# -------------------------------------------------------------------------------------- Eval
def make_bpd_fn(s: Setup):
  """Jitted `(params, x0: [B, H, W, C], labels: [B], key) -> {name: [B]}` bits/dim over all T."""
  if s.config.diffusion.type != "discrete":
    raise ValueError("Bits/dim evaluation needs config.diffusion.type='discrete'; set "
                     "config.train.eval_every=0 for continuous-time and score models.")
  conditional = s.config.model.class_conditional
  model_apply = models.make_apply(s.model, s.config)

  view = growth.stage_view(s.config, s.growth_state)

  def bpd_fn(params, x0, labels, key, low_res):
    x0 = growth.apply_view(view, x0)  # A growth stage's likelihood is at its resolution.
    cond = {}
    if s.growth_state.fading:  # Mid-fade evals measure the network at its fade-in start.
      cond["fade_weight"] = growth.current_fade(s.config, s.growth_state,
                                                s.growth_state.stage_start)
    if low_res is not None:  # SR stage: conditioned as at sampling (cond.sample_level).
      cond.update(cascade.sampling_condition(jax.random.fold_in(key, 1), low_res, s.config.cond))

    def denoise(x, t):
      x = jax.lax.with_sharding_constraint(x, s.batch_sharding)
      return model_apply(params, x, t, y=labels if conditional else None, **cond)
    out = losses.bits_per_dim(s.diffusion, denoise, x0, key)
    return {"total_bpd": out["total_bpd"], "prior_bpd": out["prior_bpd"],
            "decoder_bpd": out["vb"][:, 0]}

  return jax.jit(bpd_fn, in_shardings=(s.shardings.params, s.batch_sharding, s.batch_sharding,
                                       None, s.batch_sharding))


def eval_bpd(s: Setup, params, bpd_fn, step: int) -> dict:
  c = s.config
  it = data_lib.make_iterator(c.data, s.mesh, seed=c.seed, split=c.data.eval_split,
                              batch_size=c.eval.batch_size)
  totals = []
  for i in range(c.eval.num_batches):
    batch = next(it)
    out = parallel.to_host(bpd_fn(params, batch["image"], batch["label"],
                                  jax.random.fold_in(s.keys["eval"], i), batch.get("low_res")))
    totals.append(out["total_bpd"])
  bpd = np.concatenate(totals)
  return {"eval_bpd": float(bpd.mean()), "eval_bpd_sem": float(bpd.std() / np.sqrt(len(bpd))),
          "eval_examples": int(len(bpd)), "step": step}


@dataclasses.dataclass
class FeatureSpace:
  """A feature network with its reference set: `prefix` names its metrics ("quick_fd", "fid")."""
  prefix: str
  net: Any
  ref: np.ndarray   # [N, D] features of the reference examples (KID, precision / recall).
  mu: np.ndarray
  cov: np.ndarray
  reference: str    # What the reference statistics are, for the record.

  def metrics(self, images: np.ndarray, k: int) -> dict:
    from difflax.evaluation import metrics
    f = self.net.features(images)
    p = self.prefix
    kid_mean, kid_std = metrics.kid(f, self.ref, num_subsets=20,
                                    subset_size=min(len(f), len(self.ref), 1000))
    precision, recall = metrics.precision_recall(self.ref, f, k=k)
    return {f"{p}fd" if p else "fid": metrics.frechet_distance(
                f.mean(0), np.cov(f, rowvar=False), self.mu, self.cov),
            f"{p}kid": kid_mean, f"{p}kid_std": kid_std, f"{p}precision": precision,
            f"{p}recall": recall, f"{p}features": self.net.label, f"{p}reference": self.reference}


def feature_spaces(config) -> list[FeatureSpace]:
  """The feature spaces `config.eval` asks for (quick, inception), references computed once."""
  from difflax.evaluation import stats
  e, d = config.eval, config.data
  spaces = []
  for kind, prefix, on in (("quick", "quick_", e.quick_fd), ("inception", "", e.inception)):
    if not on:
      continue
    net = stats.extractor(config, kind)
    ref = stats.reference_features(config, net, e.reference_examples)
    mu, cov = ref.mean(0), np.cov(ref, rowvar=False)
    reference = f"{d.name}:{d.eval_split}:{len(ref)}"
    if e.reference_stats:
      saved = stats.load_stats(e.reference_stats)
      if saved["features"].split(":")[0] == kind:
        if saved["features"] != net.label:
          raise ValueError(
              f"{e.reference_stats} holds statistics in {saved['features']} but this eval uses "
              f"{net.label}; recompute them with `python -m difflax.evaluation.stats "
              f"--features={kind}` or use the matching network.")
        mu, cov = saved["mu"], saved["sigma"]
        reference = f"{saved['dataset']}:{saved['num']} ({e.reference_stats})"
    spaces.append(FeatureSpace(prefix, net, ref, mu, cov, reference))
  return spaces


BEST_KEYS = ("fid", "quick_fd", "eval_bpd")  # Lower is better; the first present decides.


class Evaluator:
  """The configured evals of EMA params at a step: bits/dim (discrete models, `eval.bpd`) and, in
  each configured feature space (quick network `eval.quick_fd`, FID Inception `eval.inception`),
  FD / KID / precision / recall of `eval.num_samples` samples drawn with the preview sampler
  against the eval split (or `eval.reference_stats`), labelled with the network's weights hash.
  Built once per run so its functions compile once; appends every result to
  workdir/eval/history.jsonl and tracks the best step in workdir/eval/best.json."""

  def __init__(self, s: Setup):
    c = s.config
    self.s = s
    self.bpd_fn = make_bpd_fn(s) if c.eval.bpd and c.diffusion.type == "discrete" else None
    self.spaces = feature_spaces(c)
    if self.spaces:
      self.sample_fn = make_sample_fn(s, c.train.preview_sampler, c.train.preview_steps)
      self.cond_key = s.keys["eval"]

  def __call__(self, params, step: int) -> dict:
    c, result = self.s.config, {"step": step}
    if self.bpd_fn is not None:
      result.update(eval_bpd(self.s, params, self.bpd_fn, step))
    if self.spaces:
      cond = model_conditions(self.s, c.eval.num_samples, self.cond_key, step)
      imgs, _ = generate(self.s, self.sample_fn, params, self.s.keys["eval"], c.eval.num_samples,
                         c.sample.batch_size, cond=cond)
      for space in self.spaces:
        result.update(space.metrics(imgs, c.eval.precision_recall_k))
      result.update(num_samples=int(len(imgs)),
                    sampler=f"{c.train.preview_sampler}{c.train.preview_steps}")
    self._record(result)
    return result

  def _record(self, result: dict) -> None:
    """Sets result["is_best"] (improves on workdir/eval/best.json) and appends to the history."""
    out = os.path.join(self.s.workdir, "eval")
    best_path = os.path.join(out, "best.json")
    best = json.load(open(best_path)) if os.path.exists(best_path) else None
    key = next((k for k in BEST_KEYS if k in result), None)
    is_best = key is not None and (best is None or result[key] < best.get(key, np.inf))
    result["is_best"] = bool(is_best)
    if jax.process_index() == 0:
      os.makedirs(out, exist_ok=True)
      with open(os.path.join(out, "history.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
      if is_best:
        _write_json(best_path, result)
      plot_history(self.s.workdir)


def plot_history(workdir: str) -> Optional[str]:
  """workdir/eval/metrics.png: training loss and every eval metric against the step."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  series = {}
  for name in ("loss_history.jsonl", os.path.join("eval", "history.jsonl")):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      for line in open(path):
        row = json.loads(line)
        for k, v in row.items():
          if k != "step" and isinstance(v, (int, float)) and not k.endswith(("_std", "_sem")):
            series.setdefault(k, {})[row["step"]] = v
  keys = [k for k in ("loss", "eval_bpd", "fid", "quick_fd", "quick_kid", "precision", "recall")
          if k in series]
  if not keys:
    return None
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
  for ax, k in zip(axes[0], keys):
    steps = sorted(series[k])
    ax.plot(steps, [series[k][t] for t in steps], marker="." if k != "loss" else None)
    ax.set(xlabel="step", title=k)
  fig.tight_layout()
  path = os.path.join(workdir, "eval", "metrics.png")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def evaluate(config, workdir: str) -> dict:
  """--mode=eval: the configured evals of the latest checkpoint's EMA params."""
  s = setup(config, workdir)
  if s.checkpointer.latest_step() is None:
    raise FileNotFoundError(f"No checkpoint in {s.checkpointer.directory}: train first.")
  if config.diffusion.type != "discrete" and not (config.eval.quick_fd or config.eval.inception):
    raise ValueError("Bits/dim evaluation needs config.diffusion.type='discrete'; enable "
                     "config.eval.quick_fd or config.eval.inception for continuous-time and "
                     "score models.")
  state, _ = restore_or_init(s)
  step = int(jax.device_get(state.step))
  result = Evaluator(s)(state.ema_params, step)
  _write_json(os.path.join(workdir, "eval", f"eval_step{step:06d}.json"), result)
  logging.info("Eval: %s", result)
  return result


def _write_json(path: str, obj: Any) -> None:
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------- Train
class _StopOnSignal:
  """Turns SIGTERM (pod preemption, `kill`) into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. some notebook kernels): no handler.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(metrics: dict, step: int, workdir: str) -> None:
  bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"Non-finite training metrics {bad} by step {step}. The state was not checkpointed; the "
        f"last good checkpoint in {workdir}/checkpoints is kept and a rerun resumes from it. Try a "
        "lower config.optim.lr, config.optim.grad_clip=1.0, or check the data for NaNs.")


def train(config, workdir: str) -> dict:
  """Trains until `config.train.num_steps`, resuming from the latest checkpoint in `workdir`."""
  from clu import metric_writers, periodic_actions
  c = config
  s = setup(config, workdir)
  # ---- Model / state
  state, restored = restore_or_init(s)
  start = int(jax.device_get(state.step))
  logging.info("Model %s: %d parameters; %s at step %d; mesh %s", c.model.name,
               num_params(s.abstract_state.params), "resumed" if restored else "initialised",
               start, dict(s.mesh.shape))
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start >= c.train.num_steps:
    logging.info("Already trained to step %d >= num_steps=%d.", start, c.train.num_steps)
    return {"step": start}
  # ---- Input
  it = data_lib.make_iterator(c.data, s.mesh, seed=c.seed, start_step=start)
  batch = next(it)
  batch_shardings = jax.tree_util.tree_map(lambda _: s.batch_sharding, batch)
  report = periodic_actions.ReportProgress(num_train_steps=c.train.num_steps, writer=writer,
                                           every_secs=30.0)
  meta = s.checkpointer.read_meta() if restored else None
  saved = (meta or {}).get("plateau") or {}
  plateau = growth.PlateauTracker(c.growth.plateau_patience, saved.get("best", float("inf")),
                                  saved.get("bad", 0))
  plateau_losses = []
  extra_meta = lambda: ({"plateau": {"best": plateau.best, "bad": plateau.bad}}
                        if growth.enabled(c) else {})
  # ---- Loop: one phase per architecture (one, unless progressive growth changes it).
  pending, last, step, compile_secs = [], {}, start, 0.0
  with _StopOnSignal() as stop:
    while step < c.train.num_steps and not stop.requested:
      # The update step, compiled once per architecture ahead of time so its cost is reported.
      step_fn = step_lib.make_train_step(s.model, s.objective, s.optimizer, s.lr_schedule, c,
                                         s.keys["step"], s.growth_state)
      t0 = time.perf_counter()
      train_step = jax.jit(step_fn, in_shardings=(s.shardings, batch_shardings),
                           out_shardings=(s.shardings, parallel.replicated(s.mesh)),
                           donate_argnums=(0,)).lower(state, batch).compile()
      compile_secs = time.perf_counter() - t0
      logging.info("Compiled the train step in %.1fs (resolution %d)", compile_secs,
                   s.resolution)
      preview_fn = (make_sample_fn(s, c.train.preview_sampler, c.train.preview_steps)
                    if c.train.preview_every else None)
      evaluator = Evaluator(s) if c.train.eval_every or (
          growth.enabled(c) and c.growth.plateau_metric == "quick_fd") else None
      window_start, phase_start = time.perf_counter(), step
      for step in range(phase_start + 1, c.train.num_steps + 1):
        if step > start + 1:
          batch = next(it)
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        report(step)
        final = step == c.train.num_steps or stop.requested
        if step % c.train.log_every == 0 or final or step % c.train.checkpoint_every == 0:
          means = {k: float(np.mean([m[k] for m in jax.device_get(pending)]))
                   for k in pending[0]}
          _check_finite(means, step, workdir)
          secs = time.perf_counter() - window_start
          means.update(steps_per_sec=len(pending) / secs,
                       images_per_sec=len(pending) * c.data.batch_size / secs)
          if step == phase_start + len(pending):
            means["compile_secs"] = compile_secs
          if growth.enabled(c):
            means["resolution"] = float(s.resolution)
          writer.write_scalars(step, means)
          if jax.process_index() == 0:
            with open(os.path.join(workdir, "loss_history.jsonl"), "a") as f:
              f.write(json.dumps({"step": step, "loss": means["loss"]}) + "\n")
          last, pending, window_start = means, [], time.perf_counter()
        # ---- Progressive growth: plateau trigger, then a new architecture by surgery.
        plateaued = False
        if growth.enabled(c) and c.growth.trigger == "plateau":
          plateau_losses.append(metrics["loss"])
          if step % c.growth.plateau_every == 0:
            value = (float(np.mean(jax.device_get(plateau_losses)))
                     if c.growth.plateau_metric == "train_loss"
                     else evaluator(state.ema_params, step)["quick_fd"])
            plateaued, plateau_losses = plateau.update(value), []
        new_gs = growth.next_state(c, s.growth_state, step, plateaued) if growth.enabled(c) \
            else s.growth_state
        if new_gs != s.growth_state:
          s, state = _grow(s, state, new_gs)
          plateau.reset()
          s.checkpointer.save(step, state, s.meta(state, extra_meta()))
          if pending:
            pending = []  # Metrics of the old architecture were logged or are dropped here.
          break  # Re-jit for the new architecture.
        if step % c.train.checkpoint_every == 0 or final:
          s.checkpointer.save(step, state, s.meta(state, extra_meta()))
        if preview_fn is not None and (step % c.train.preview_every == 0 or final):
          cond = model_conditions(s, c.train.preview_num, s.keys["preview"], step)
          imgs, _ = generate(s, preview_fn, state.ema_params, s.keys["preview"],
                             c.train.preview_num, c.train.preview_num, cond=cond)
          grid = (images_lib.make_pair_grid(cond["low_res"], imgs)
                  if cond and "low_res" in cond else images_lib.make_grid(imgs))
          if jax.process_index() == 0:
            images_lib.save_png(os.path.join(workdir, "samples", f"step_{step:06d}.png"), grid)
          writer.write_images(step, {"samples": grid[None]})
        if evaluator is not None and c.train.eval_every and (step % c.train.eval_every == 0
                                                             or final):
          result = evaluator(state.ema_params, step)
          writer.write_scalars(step, {k: v for k, v in result.items()
                                      if isinstance(v, float) and k != "step"})
          if result["is_best"]:  # Its own directory, so keep-N deletion of old steps spares it.
            s.best_checkpointer.save(step, state, s.meta(state, extra_meta()))
        if not pending:  # Checkpoints, previews and evals do not count as training time.
          window_start = time.perf_counter()
        if stop.requested:
          logging.warning("Stopped at step %d after SIGTERM; rerun the same command to resume.",
                          step)
          break
  writer.flush()
  s.checkpointer.close()
  if "best_checkpointer" in s.__dict__:
    s.best_checkpointer.close()
  return {"step": int(jax.device_get(state.step)), "compile_secs": compile_secs, **last}


def _grow(s: Setup, state, new_gs: growth.GrowthState):
  """The next architecture's Setup and the state carried over by surgery (growth.grow_state)."""
  logging.info("Growth at step %d: %s -> %s", int(jax.device_get(state.step)), s.growth_state,
               new_gs)
  new = setup(s.config, s.workdir, new_gs, checkpointer=s.checkpointer)
  fresh = jax.jit(new.init_fn, out_shardings=new.shardings)(new.keys["init"])
  grown, _ = growth.grow_state(jax.device_get(state), jax.device_get(fresh))
  return new, jax.device_put(grown, new.shardings)


# --------------------------------------------------------------------------------------- Run
def run(config, workdir: str, mode: str = "train") -> dict:
  """Validates `config`, records it as workdir/config.json and runs `mode`."""
  if mode not in MODES:
    raise ValueError(f"Unknown --mode={mode!r}; valid: {MODES}.")
  if cascade.is_cascade(config):
    return cascade.run(config, workdir, mode)
  if mode == "sweep":
    raise ValueError("--mode=sweep sweeps a cascade's augmentation level; this config has no "
                     "stages (use a configs/cascade_*.py config).")
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  if mode == "train":
    _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  return {"train": train, "sample": sample, "eval": evaluate}[mode](config, workdir)
