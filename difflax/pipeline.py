"""A cascade's multi-stage sampling and its augmentation-level sweep (CDM, paper 001).

Contract: built on `sampling` (per-stage sample functions and sharded batches) and `evaluation`
(quick features, FD / KID); the conditioning math is `cascade`'s. `load_stages(config, workdir)`
restores every trained stage (`workdir/<stage>/`); `run_pipeline(stages, key, num, batch)` samples
the base stage and conditions each SR stage on its predecessor's output, non-truncated
(re-noised to z_s, Sec. 3.3) or truncated (the previous chain stopped at s, Sec. 3.2).
`sample(config, workdir)` is a cascade's `--mode=sample`: workdir/pipeline/<tag>/final.png,
final.npz and one grid per stage (SR stages: conditioning next to output). `sweep(config,
workdir)` is `--mode=sweep`: quick FD / KID of the final samples against the eval split for each
s of `cascade.sweep_levels`, from base samples drawn once and stored (CDM Table 3):
workdir/sweep/sweep.json and sweep.png.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from difflax import cascade
from difflax import conditioning
from difflax import experiment
from difflax import fileio
from difflax import images as images_lib
from difflax import parallel
from difflax import sampling
from difflax.evaluation import metrics
from difflax.evaluation import quality
from difflax.evaluation import stats


class Stage:
  """A trained stage ready to sample: experiment, EMA params, the sample fns it needs."""

  def __init__(self, config, workdir: str, name: str):
    self.name, self.config = name, cascade.stage_config(config, name)
    self.exp = experiment.setup(self.config, os.path.join(workdir, name))
    if self.exp.checkpointer.latest_step() is None:
      raise FileNotFoundError(
          f"Cascade stage {name!r} has no checkpoint in {self.exp.checkpointer.directory}: "
          f"train it first (--mode=train, or --config.cascade.stage={name}).")
    state, _ = experiment.restore_or_init(self.exp)
    self.step = int(jax.device_get(state.step))
    self.params = state.ema_params if self.config.sample.use_ema else state.params
    self._fns: dict = {}

  @property
  def tag(self) -> str:
    """Its step, the sampler (the process's sample tag) and the guidance weight."""
    c = self.config.sample
    method = self.exp.process.sample_tag(c.sampler, c.steps, c.eta)
    return f"{self.name}{self.step}_{method}_w{c.guidance:g}"

  def sample_fn(self, truncate_level: int = 0):
    if truncate_level not in self._fns:
      c = self.config.sample
      self._fns[truncate_level] = sampling.make_sample_fn(
          self.exp, c.sampler, c.steps, c.eta, c.guidance, c.clip_denoised,
          truncate_level=truncate_level)
    return self._fns[truncate_level]

  def generate(self, key, num: int, batch_size: int,
               inputs: Optional[conditioning.ModelInputs] = None,
               truncate_level: int = 0) -> np.ndarray:
    """[num, R, R, C] float samples in [-1, 1]."""
    return sampling.generate(self.exp, self.sample_fn(truncate_level), self.params, key, num,
                             batch_size, inputs=inputs, as_uint8=False)[0]


def load_stages(config, workdir: str) -> list[Stage]:
  return [Stage(config, workdir, n) for n in cascade.stage_names(config)]


def run_pipeline(stages: list[Stage], key, num: int, batch_size: int,
                 levels: Optional[dict] = None, modes: Optional[dict] = None,
                 base_samples: Optional[np.ndarray] = None):
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
      outs.append(st.generate(k, num, batch_size) if base_samples is None else base_samples)
      continue
    cfg = ml_collections.ConfigDict(st.config.cond.to_dict())
    cfg.sample_level = int((levels or {}).get(st.name, cfg.sample_level))
    cfg.sample_mode = (modes or {}).get(st.name, cfg.sample_mode)
    truncated = cfg.aug == "gaussian" and cfg.sample_mode == "truncated" and cfg.sample_level > 0
    if truncated:
      low = stages[i - 1].generate(jax.random.fold_in(key, i - 1), num, batch_size,
                                   inputs=conds[i - 1], truncate_level=cfg.sample_level)
    else:
      low = np.clip(outs[-1], -1.0, 1.0)
    inputs = jax.device_get(conditioning.for_sampling(
        st.config, st.exp.growth_state, jax.random.fold_in(k, 7), num, jnp.asarray(low),
        already_at_level=truncated, cond=cfg))
    outs.append(st.generate(k, num, batch_size, inputs=inputs))
    conds.append(inputs)
  return outs, conds


def sample(config, workdir: str) -> dict:
  """--mode=sample of a cascade: `cascade.num` pipeline samples (see the module docstring)."""
  c = config.cascade
  stages = load_stages(config, workdir)
  outs, conds = run_pipeline(stages, jax.random.key(c.seed), c.num, c.batch_size)
  tag = "_".join(st.tag for st in stages) + f"_seed{c.seed}_n{c.num}"
  for st in stages[1:]:
    if st.config.cond.aug == "gaussian":
      tag += f"_{st.name}-{st.config.cond.sample_mode}-s{st.config.cond.sample_level}"
  out_dir = os.path.join(workdir, "pipeline", tag)
  result = {"num": int(c.num), "dir": out_dir,
            "stages": {st.name: {"step": st.step, "resolution": st.config.data.resolution}
                       for st in stages}}
  last = stages[-1]
  if last.config.eval.quality_line:  # The final stage's data are what the cascade models.
    result["quality"] = quality.report(last.config, outs[-1], last.exp.mesh, "pipeline samples")
  if jax.process_index() == 0:
    final = images_lib.to_uint8(outs[-1])
    result["png"] = fileio.save_png(os.path.join(out_dir, "final.png"),
                                        images_lib.make_grid(final))
    fileio.save_npz(os.path.join(out_dir, "final.npz"), images=final)
    fileio.save_png(os.path.join(out_dir, f"{stages[0].name}.png"),
                        images_lib.make_grid(images_lib.to_uint8(outs[0])))
    for st, out, cond in zip(stages[1:], outs[1:], conds[1:]):
      fileio.save_png(os.path.join(out_dir, f"{st.name}.png"),
                          images_lib.make_pair_grid(np.asarray(cond.low_res), out))
  for st in stages:
    st.exp.close()
  logging.info("Cascade samples: %s", result)
  return result


def _sweep_stage(config, stages: list[Stage]) -> str:
  target = config.cascade.sweep_stage or (stages[1].name if len(stages) > 1 else "")
  if not target or target == stages[0].name:
    raise ValueError("The s-sweep needs an SR stage (cascade.sweep_stage).")
  aug = cascade.stage_config(config, target).cond.aug
  if aug != "gaussian":
    raise ValueError(f"Stage {target!r} uses cond.aug={aug!r}; the s-sweep applies to Gaussian "
                     "conditioning augmentation.")
  return target


def sweep(config, workdir: str) -> dict:
  """--mode=sweep: the pipeline's quick FD / KID for each s (see the module docstring); with
  `cascade.sweep_truncated`, truncated base chains too (reruns the base per s)."""
  c = config.cascade
  stages = load_stages(config, workdir)
  target = _sweep_stage(config, stages)
  out_dir = os.path.join(workdir, "sweep")
  key = jax.random.key(c.seed)
  # Named like the pipeline's tag, so base samples drawn with another sampler or guidance are
  # not reused.
  base_path = os.path.join(out_dir, f"base_{stages[0].tag}_seed{c.seed}_n{c.sweep_num}.npz")
  if parallel.from_process_0(fileio.exists(base_path)):
    base = fileio.load_npz(base_path)["samples"]
  else:
    base = stages[0].generate(jax.random.fold_in(key, 0), c.sweep_num, c.batch_size)
    if jax.process_index() == 0:
      fileio.save_npz(base_path, samples=base)
  final_cfg = stages[-1].config
  net = stats.extractor(final_cfg, "quick")
  mesh = stages[-1].exp.mesh
  ref = stats.reference_features(final_cfg, net, final_cfg.eval.reference_examples, mesh=mesh)
  ref_mu, ref_cov = ref.mean(0), np.cov(ref, rowvar=False)
  rows = []
  for mode in ["non_truncated"] + (["truncated"] if c.sweep_truncated else []):
    for level in c.sweep_levels:
      outs, _ = run_pipeline(stages, key, c.sweep_num, c.batch_size, levels={target: level},
                             modes={target: mode},
                             base_samples=base if mode == "non_truncated" else None)
      f = net.features(images_lib.to_uint8(outs[-1]), mesh=mesh)
      kid, kid_std = metrics.kid(f, ref, num_subsets=20, subset_size=min(len(f), len(ref)))
      rows.append({"mode": mode, "s": int(level), "quick_fd": metrics.frechet_distance(
          f.mean(0), np.cov(f, rowvar=False), ref_mu, ref_cov), "quick_kid": kid,
          "quick_kid_std": kid_std})
      logging.info("s-sweep %s", rows[-1])
  result = {"stage": target, "num": int(c.sweep_num), "features": net.label,
            "reference": f"{final_cfg.data.name}:{final_cfg.data.eval_split}:{len(ref)}",
            "rows": rows, "base_samples": base_path}
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(out_dir, "sweep.json"), result)
    result["png"] = _plot_sweep(rows, os.path.join(out_dir, "sweep.png"), target, net.label)
  for st in stages:
    st.exp.close()
  return result


def _plot_sweep(rows, path, stage, label):
  fig = images_lib.figure(figsize=(5, 3.5))
  if fig is None:
    return None
  ax = fig.subplots()
  for mode in sorted({r["mode"] for r in rows}):
    pts = [(r["s"], r["quick_fd"]) for r in rows if r["mode"] == mode]
    ax.plot(*zip(*pts), marker="o", label=mode)
  ax.set(xlabel=f"conditioning augmentation level s ({stage})", ylabel=f"FD ({label})",
         title="Cascade quality vs s")
  ax.legend()
  fig.tight_layout()
  return fileio.save_figure(path, fig)
