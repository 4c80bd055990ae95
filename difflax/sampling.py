"""Sampling a trained state: jitted, mesh-sharded sample functions and resumable sample runs.

Contract: `make_sample_fn(exp, method, respacing, ...)` returns a jitted
`(params, key, labels: [B], inputs: ModelInputs | None, x0_surrogate: [B, H, W, C] | None) ->
images [B, H, W, C]` over the process's sampler (no sampler math here);
`generate(exp, sample_fn, params, key, num, batch_size, inputs=None, x0_surrogate=None)` draws
`num` images in mesh-sharded batches, batch i from `fold_in(key, i)`, optionally as atomic
per-batch shards on disk that an interrupted run reloads instead of resampling;
`model_conditions(exp, num, key, step)` builds the per-sample `conditioning.ModelInputs` a model
needs outside a cascade pipeline (an SR stage's conditioning from eval images, a fading growth
stage's weight).
`sample(config, workdir)` is `--mode=sample`: the latest checkpoint's EMA params ->
`config.sample.num` images as a PNG grid and an `.npz` of uint8, under a tag naming everything
that changes the images. With `sample.surrogate` (an `.npz` of images or another workdir) the
chains start at `sample.surrogate_t_mid` from the surrogate's noised samples (paper 002
Algorithm 4; `surrogate_images`; the discrete process's `surrogate_cost`).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from difflax import conditioning
from difflax import config as config_lib
from difflax import data as data_lib
from difflax import experiment
from difflax import fileio
from difflax import images as images_lib
from difflax import models
from difflax import parallel
from difflax import samplers
from difflax.evaluation import quality


def class_labels(config, n: int, offset: int = 0) -> np.ndarray:
  """[n] labels: zeros for unconditional models, `sample.label`, or cycling through classes."""
  k = config.data.num_classes if config.model.class_conditional else 0
  if not k:
    return np.zeros((n,), np.int32)
  if config.sample.label >= 0:
    return np.full((n,), config.sample.label, np.int32)
  return ((np.arange(n) + offset) % k).astype(np.int32)


def make_sample_fn(exp: experiment.Experiment, method: str, respacing: Any, eta: float = 0.0,
                   guidance: float = 0.0, clip_denoised: bool = True, truncate_level: int = 0,
                   surrogate_t_mid: Optional[int] = None):
  """Jitted `(params, key, labels: [B], inputs, x0_surrogate) -> images [B, H, W, C]`, sharded
  over the batch axes. `inputs` is None or per-sample `conditioning.ModelInputs`
  (`model_conditions`, a cascade stage's); `x0_surrogate` the surrogate start's images or None.

  The reverse process is the experiment's process's (`Process.sampler`: method, respacing,
  truncation at a cascade level, a surrogate start from `x0_surrogate`); this function
  adds the conditioning, classifier-free guidance, the params and the mesh. The samplers are
  mesh-free; the sharding constraint on x inside the denoiser is what spreads the batch over
  devices.
  """
  c = exp.config
  run = exp.process.sampler(method, respacing, eta=eta, clip_denoised=clip_denoised,
                            truncate_level=truncate_level, surrogate_t_mid=surrogate_t_mid)
  model_apply = models.make_apply(exp.model, exp.process)
  num_classes = c.data.num_classes if c.model.class_conditional else 0
  shape_hw = (exp.resolution, exp.resolution, c.data.channels)
  sharding = exp.batch_sharding

  def sample_fn(params, key, labels, inputs, x0_surrogate):
    inputs = inputs or conditioning.ModelInputs()

    def apply(x, t, y):
      x = jax.lax.with_sharding_constraint(x, sharding)
      # Guidance doubles the batch; the conditioning image goes with both halves.
      both = inputs.tile(x.shape[0] // labels.shape[0])
      return model_apply(params, x, t, **both.replace(labels=y if num_classes else None).kwargs())
    if num_classes and guidance:
      denoise = samplers.classifier_free_guidance(apply, labels, num_classes, guidance,
                                                  c.data.channels)
    else:
      denoise = lambda x, t: apply(x, t, labels)
    return run(denoise, (labels.shape[0],) + shape_hw, key, x0_surrogate=x0_surrogate)

  return jax.jit(sample_fn, in_shardings=(exp.shardings.params, None, sharding, sharding,
                                          sharding), out_shardings=sharding)


def surrogate_images(source: str, num: int, resolution: int, channels: int,
                     seed: int = 0) -> np.ndarray:
  """[num, resolution, resolution, channels] float32 in [-1, 1]: the surrogate's samples
  x0~ of paper 002 Algorithm 4 line 1, from `source`: an `.npz` with `images` (uint8 or
  [-1, 1] floats; e.g. another run's `--mode=sample` output) or a difflax workdir, whose EMA
  model is sampled here with its own config's sampler. Smaller images are resized bilinearly
  (the paper's DDPM-16 surrogate)."""
  if source.endswith(".npz"):
    arrays = fileio.load_npz(source)
    if "images" not in arrays:
      raise ValueError(f"{source} has no 'images' array (it has {sorted(arrays)}).")
    x = arrays["images"]
    x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
  else:
    meta = os.path.join(source, "config.json")
    if not fileio.exists(meta):
      raise FileNotFoundError(f"Surrogate {source!r} is neither an .npz of images nor a difflax "
                              "workdir (no config.json): train it first or sample it to .npz.")
    sc = config_lib.from_dict(fileio.read_json(meta))
    exp, state = experiment.restore_trained(sc, source)
    s = sc.sample
    fn = make_sample_fn(exp, s.sampler, s.steps, s.eta, s.guidance, s.clip_denoised)
    key = jax.random.key(seed)
    x, _ = generate(exp, fn, state.ema_params if s.use_ema else state.params, key, num,
                    s.batch_size, inputs=model_conditions(exp, num, key), as_uint8=False)
    exp.close()
    logging.info("Surrogate: %d samples of %s (%dx%d).", len(x), source, x.shape[1], x.shape[2])
  if len(x) < num or x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f"Surrogate {source!r} gives images {x.shape}; need at least {num} with "
                     f"{channels} channels.")
  x = x[:num]
  if x.shape[1:3] != (resolution, resolution):
    x = np.asarray(jax.image.resize(x, (num, resolution, resolution, channels), "bilinear"))
  return np.clip(x, -1.0, 1.0)


def model_conditions(exp: experiment.Experiment, num: int, key,
                     step: Optional[int] = None) -> Optional[conditioning.ModelInputs]:
  """Per-sample model inputs for sampling outside a cascade pipeline (previews, evals), or None:
  an SR stage's conditioning built from `num` eval-split examples (box-downsampled, augmented as
  at sampling), and a fading growth stage's fade weight at `step`."""
  c, low = exp.config, None
  if not (c.data.low_res or exp.growth_state.fading):
    return None
  if c.data.low_res:
    images = data_lib.sample_array(c.data, num, c.seed, c.data.eval_split)
    low = jnp.asarray(images_lib.block_average(images, images.shape[1] // c.data.low_res))
  return jax.device_get(conditioning.for_sampling(c, exp.growth_state, key, num, low, step))


def generate(exp: experiment.Experiment, sample_fn, params, key, num: int, batch_size: int,
             shard_dir: Optional[str] = None, inputs: Optional[conditioning.ModelInputs] = None,
             as_uint8: bool = True, x0_surrogate=None) -> tuple[np.ndarray, np.ndarray]:
  """`num` uint8 images [num, H, W, C] (float32 as sampled with `as_uint8=False`) and their
  labels, in mesh-sharded batches of `batch_size`. `inputs` (per-sample `ModelInputs`) and
  `x0_surrogate` ([num, H, W, C]) are batched alongside.

  Batch i uses `fold_in(key, i)`, so it does not depend on what ran before. With `shard_dir`,
  each batch is written there as `shard_XXXXX.npz` and batches already on disk are loaded instead
  of sampled: an interrupted 50k-sample run resumes without duplicating or losing shards.
  Non-finite samples raise `FloatingPointError` (previews and evals stop a run as a NaN loss does).
  """
  devices = exp.mesh.devices.size
  batch_size = max(devices, (batch_size // devices) * devices)
  num_batches = -(-num // batch_size)
  out, labs, t0, done = [], [], time.perf_counter(), 0
  for i in range(num_batches):
    path = shard_dir and os.path.join(shard_dir, f"shard_{i:05d}.npz")
    # Process 0 decides what is on disk, so all processes skip (or sample) the same batches.
    if path and parallel.from_process_0(fileio.exists(path)):
      shard = fileio.load_npz(path)
      out.append(shard["images"])
      labs.append(shard["labels"])
      continue
    labels = class_labels(exp.config, batch_size, i * batch_size)
    rows = np.arange(i * batch_size, (i + 1) * batch_size) % num  # The last batch wraps.
    put = lambda tree: jax.device_put(
        jax.tree_util.tree_map(lambda v: np.asarray(v)[rows], tree), exp.batch_sharding)
    x = sample_fn(params, jax.random.fold_in(key, i),
                  jax.device_put(labels, exp.batch_sharding), put(inputs), put(x0_surrogate))
    x = parallel.to_host(x)
    if not np.all(np.isfinite(x)):  # uint8 would hide NaN as black pixels; stop like a NaN loss.
      raise FloatingPointError(
          f"Non-finite samples (batch {i}) from these parameters: the model or its EMA holds "
          "NaN / inf. Nothing was written for this batch; check the run's loss history and "
          "resume from an earlier checkpoint with a lower config.optim.lr.")
    if as_uint8:
      # A progressive growth stage samples at its resolution; images are shown (and evaluated)
      # at the final size.
      x = images_lib.to_uint8(images_lib.nearest_upsample(
          x, exp.config.data.resolution // x.shape[1]))
    out.append(np.asarray(x) if as_uint8 else np.asarray(x, np.float32))
    labs.append(labels)
    done += 1
    if path and jax.process_index() == 0:
      fileio.save_npz(path, images=out[-1], labels=labels)
    if shard_dir:
      rate = done / (time.perf_counter() - t0)
      logging.info("Sample batch %d/%d (%.2f batches/s, ETA %.0fs)", i + 1, num_batches, rate,
                   (num_batches - i - 1) / rate)
  return np.concatenate(out)[:num], np.concatenate(labs)[:num]


def sample(config, workdir: str) -> dict:
  """--mode=sample: `config.sample.num` images from the latest checkpoint as per-batch shards
  (resumable), one .npz of uint8 images and labels, and a PNG grid of the first 256."""
  exp, state = experiment.restore_trained(config, workdir)
  c = config.sample
  step = int(jax.device_get(state.step))
  inputs = model_conditions(exp, c.num, jax.random.key(c.seed), step)
  t_mid = surrogate = None
  if c.surrogate:
    t_mid = c.surrogate_t_mid
    surrogate = surrogate_images(c.surrogate, c.num, config.data.resolution,
                                 config.data.channels, c.seed + 1)
  fn = make_sample_fn(exp, c.sampler, c.steps, c.eta, c.guidance, c.clip_denoised,
                      surrogate_t_mid=t_mid)
  params = state.ema_params if c.use_ema else state.params
  method = exp.process.sample_tag(c.sampler, c.steps, c.eta)
  if t_mid is not None:
    source = os.path.basename(os.path.normpath(c.surrogate)).removesuffix(".npz")
    method += f"_surrogate-{source}-t{t_mid}"
  # Everything that changes the images is in the tag, so resumed shards always match.
  tag = (f"sample_step{step:06d}_{method}_w{c.guidance:g}_label{c.label}_"
         f"{'ema' if c.use_ema else 'raw'}_seed{c.seed}_bs{c.batch_size}")
  out_dir = os.path.join(workdir, "samples")
  t0 = time.perf_counter()
  imgs, labels = generate(exp, fn, params, jax.random.key(c.seed), c.num, c.batch_size,
                          shard_dir=os.path.join(out_dir, tag), inputs=inputs,
                          x0_surrogate=surrogate)
  secs = time.perf_counter() - t0
  result = {"num": int(len(imgs)), "seconds": secs, "step": step}
  if t_mid is not None:
    evals, full = exp.process.surrogate_cost(c.steps, t_mid)
    # Paper 002 Table 4.5's speed-up: model evaluations saved per sample.
    result.update(model_evaluations=evals, model_evaluations_full=full)
    logging.info("Surrogate Diffusion from %s at t_mid=%d: %d of %d model evaluations per "
                 "sample (%.1fx fewer).", c.surrogate, t_mid, evals, full, full / max(evals, 1))
  if config.eval.quality_line:
    result["quality"] = quality.report(config, imgs, exp.mesh, "samples")
  if jax.process_index() == 0:
    result["png"] = fileio.save_png(os.path.join(out_dir, tag + ".png"),
                                        images_lib.make_grid(imgs[:256]))
    result["npz"] = fileio.save_npz(os.path.join(out_dir, tag + ".npz"), images=imgs,
                                    labels=labels)
  exp.close()
  logging.info("Sampled %d images in %.1fs: %s", len(imgs), secs, result)
  return result
