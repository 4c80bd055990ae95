"""The evaluator: the configured quality measurements of a model's EMA params at a step.

Contract: `Evaluator(exp)` is built once per architecture (its functions compile once) from
`config.eval`: bits/dim on the eval split (discrete diffusion, `eval.bpd`: the full VLB over all
t) and, in each enabled feature space (the quick network `eval.quick_fd`, the FID Inception
`eval.inception`), FD / KID / precision / recall of `eval.num_samples` samples drawn with the
preview sampler. `evaluator(params, step) -> dict` returns the metrics, each feature space's
network label (`<prefix>features`) and, per metric, the reference set it was measured against
(`<metric>_reference`: with `eval.reference_stats` the FD uses the file, KID and precision /
recall need features and use the eval split). It writes `workdir/eval/eval_step<N>.json` and
keeps `workdir/eval/best.json` (first of fid, quick_fd, eval_bpd present decides; lower is
better), setting `result["is_best"]`. Numbers go to the run's metric writer through the caller.
`evaluate(config, workdir)` is `--mode=eval`; `plot_history(workdir)` draws the loss and every
eval metric against the step into `workdir/eval/metrics.png`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np

from difflax import conditioning
from difflax import data as data_lib
from difflax import experiment
from difflax import fileio
from difflax import growth
from difflax import images as images_lib
from difflax import models
from difflax import parallel
from difflax import processes
from difflax import sampling
from difflax import writers
from difflax.evaluation import metrics
from difflax.evaluation import stats

BEST_KEYS = ("fid", "quick_fd", "eval_bpd")  # Lower is better; the first present decides.
PLOTTED = ("loss", "eval_bpd", "fid", "quick_fd", "quick_kid", "precision", "recall")


# ------------------------------------------------------------------------------ bits/dim
def make_bpd_fn(exp: experiment.Experiment):
  """Jitted `(params, x0: [B, H, W, C], labels: [B], key, low_res) -> {name: [B]}` bits/dim
  over all T."""
  c = exp.config
  if not exp.process.has_bpd:
    exp.process.bits_per_dim(None, None, None)  # Raises, saying what to set.
  model_apply = models.make_apply(exp.model, exp.process)
  view = growth.stage_view(c, exp.growth_state)
  gs = exp.growth_state

  def bpd_fn(params, x0, labels, key, low_res):
    x0 = view.to_stage(x0)  # A growth stage's likelihood is at its resolution.
    # As at sampling: an SR stage conditioned at cond.sample_level, a mid-fade network at its
    # fade-in start.
    inputs = conditioning.for_sampling(c, gs, jax.random.fold_in(key, 1), x0.shape[0], low_res)
    inputs = inputs.replace(labels=labels if c.model.class_conditional else None)

    def denoise(x, t):
      x = jax.lax.with_sharding_constraint(x, exp.batch_sharding)
      return model_apply(params, x, t, **inputs.kwargs())
    out = exp.process.bits_per_dim(denoise, x0, key)
    return {"total_bpd": out["total_bpd"], "prior_bpd": out["prior_bpd"],
            "decoder_bpd": out["vb"][:, 0]}

  bs = exp.batch_sharding
  return jax.jit(bpd_fn, in_shardings=(exp.shardings.params, bs, bs, None, bs))


def eval_bpd(exp: experiment.Experiment, params, bpd_fn) -> dict:
  c = exp.config
  it = data_lib.make_iterator(c.data, exp.mesh, seed=c.seed, split=c.data.eval_split,
                              batch_size=c.eval.batch_size)
  totals = []
  for i in range(c.eval.num_batches):
    batch = next(it)
    out = parallel.to_host(bpd_fn(params, batch["image"], batch["label"],
                                  jax.random.fold_in(exp.keys["eval"], i), batch.get("low_res")))
    totals.append(out["total_bpd"])
  bpd = np.concatenate(totals)
  return {"eval_bpd": float(bpd.mean()), "eval_bpd_sem": float(bpd.std() / np.sqrt(len(bpd))),
          "eval_examples": int(len(bpd))}


# ------------------------------------------------------------------------------ feature spaces
@dataclasses.dataclass
class FeatureSpace:
  """A feature network with its reference sets; `prefix` names its metrics ("quick_", "")."""
  prefix: str
  net: Any
  ref: np.ndarray    # [N, D] features of eval-split examples (KID, precision / recall).
  ref_name: str      # What `ref` is: "dataset:split:N".
  mu: np.ndarray     # FD reference statistics: of `ref`, or of an `eval.reference_stats` file.
  cov: np.ndarray
  fd_ref_name: str

  def metrics(self, images: np.ndarray, k: int, mesh=None) -> dict:
    """Features of `images` (sharded over `mesh`, gathered on every process, so every process
    computes the same statistics) against the references."""
    f = self.net.features(images, mesh=mesh)
    p = self.prefix
    fd = f"{p}fd" if p else "fid"
    kid_mean, kid_std = metrics.kid(f, self.ref, num_subsets=20,
                                    subset_size=min(len(f), len(self.ref), 1000))
    precision, recall = metrics.precision_recall(self.ref, f, k=k)
    # The instrument's own quality beside its numbers (quick networks: held-out accuracy).
    acc = getattr(self.net, "accuracy", None)
    return {**({f"{p}features_accuracy": acc} if acc is not None else {}),
            fd: metrics.frechet_distance(f.mean(0), np.cov(f, rowvar=False), self.mu, self.cov),
            f"{p}kid": kid_mean, f"{p}kid_std": kid_std, f"{p}precision": precision,
            f"{p}recall": recall, f"{p}features": self.net.label,
            f"{fd}_reference": self.fd_ref_name, f"{p}kid_reference": self.ref_name,
            f"{p}precision_reference": self.ref_name, f"{p}recall_reference": self.ref_name}


def feature_spaces(config, mesh=None) -> list[FeatureSpace]:
  """The feature spaces `config.eval` asks for (quick, inception), references computed once
  (sharded over `mesh`)."""
  e, d = config.eval, config.data
  spaces = []
  for kind, prefix, on in (("quick", "quick_", e.quick_fd), ("inception", "", e.inception)):
    if not on:
      continue
    net = stats.extractor(config, kind)
    ref = stats.reference_features(config, net, e.reference_examples, mesh=mesh)
    mu, cov = ref.mean(0), np.cov(ref, rowvar=False)
    ref_name = f"{d.name}:{d.eval_split}:{len(ref)}"
    fd_ref_name = ref_name
    if e.reference_stats:
      saved = stats.load_stats(e.reference_stats)
      if saved["features"].split(":")[0] == kind:
        if saved["features"] != net.label:
          raise ValueError(
              f"{e.reference_stats} holds statistics in {saved['features']} but this eval uses "
              f"{net.label}; recompute them with `python -m difflax.evaluation.stats "
              f"--features={kind}` or use the matching network.")
        mu, cov = saved["mu"], saved["sigma"]
        fd_ref_name = f"{saved['dataset']}:{saved['num']} ({e.reference_stats})"
    spaces.append(FeatureSpace(prefix, net, ref, ref_name, mu, cov, fd_ref_name))
  return spaces


# ------------------------------------------------------------------------------ evaluator
class Evaluator:
  """See the module docstring."""

  def __init__(self, exp: experiment.Experiment):
    c = exp.config
    self.exp = exp
    self.bpd_fn = make_bpd_fn(exp) if c.eval.bpd and exp.process.has_bpd else None
    self.spaces = feature_spaces(c, exp.mesh)
    if self.spaces:
      self.sample_fn = sampling.make_sample_fn(exp, c.train.preview_sampler,
                                               c.train.preview_steps)

  def __call__(self, params, step: int) -> dict:
    c, result = self.exp.config, {"step": step}
    if self.bpd_fn is not None:
      result.update(eval_bpd(self.exp, params, self.bpd_fn))
    if self.spaces:
      key = self.exp.keys["eval"]
      inputs = sampling.model_conditions(self.exp, c.eval.num_samples, key, step)
      imgs, _ = sampling.generate(self.exp, self.sample_fn, params, key, c.eval.num_samples,
                                  c.sample.batch_size, inputs=inputs)
      for space in self.spaces:
        result.update(space.metrics(imgs, c.eval.precision_recall_k, self.exp.mesh))
      result.update(num_samples=int(len(imgs)),
                    sampler=f"{c.train.preview_sampler}{c.train.preview_steps}")
    self._record(result)
    return result

  def _record(self, result: dict) -> None:
    out = os.path.join(self.exp.workdir, "eval")
    best_path = os.path.join(out, "best.json")
    best = fileio.read_json(best_path) if fileio.exists(best_path) else None
    key = next((k for k in BEST_KEYS if k in result), None)
    # Process 0's reading decides: another process may read best.json after process 0 rewrote
    # it, and processes that disagree would not all enter the best checkpoint's save.
    result["is_best"] = parallel.from_process_0(bool(
        key is not None and (best is None or result[key] < best.get(key, np.inf))))
    if jax.process_index() == 0:
      fileio.write_json(os.path.join(out, f"eval_step{result['step']:06d}.json"), result)
      if result["is_best"]:
        fileio.write_json(best_path, result)


def scalars(result: dict) -> dict:
  """The numbers of an eval result, for a metric writer."""
  return {k: v for k, v in result.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def plot_history(workdir: str) -> str | None:
  """workdir/eval/metrics.png: training loss and every eval metric against the step."""
  series: dict = {}
  for row in writers.history(workdir):
    for k, v in row.items():
      if k in PLOTTED:
        series.setdefault(k, {})[row["step"]] = v
  keys = [k for k in PLOTTED if k in series]
  fig = images_lib.figure(figsize=(4 * len(keys), 3)) if keys else None
  if fig is None:
    return None
  axes = fig.subplots(1, len(keys), squeeze=False)
  for ax, k in zip(axes[0], keys):
    steps = sorted(series[k])
    ax.plot(steps, [series[k][t] for t in steps], marker="." if k != "loss" else None)
    ax.set(xlabel="step", title=k)
  fig.tight_layout()
  return fileio.save_figure(os.path.join(workdir, "eval", "metrics.png"), fig)


def evaluate(config, workdir: str) -> dict:
  """--mode=eval: the configured evals of the latest checkpoint's EMA params."""
  if not (processes.get(config.diffusion.type).has_bpd or config.eval.quick_fd
          or config.eval.inception):
    raise ValueError("Bits/dim evaluation needs a discrete chain (diffusion.type='discrete'); "
                     "enable config.eval.quick_fd or config.eval.inception for continuous-time, "
                     "score and flow models.")
  exp, state = experiment.restore_trained(config, workdir)
  step = int(jax.device_get(state.step))
  result = Evaluator(exp)(state.ema_params, step)
  writer = writers.create(workdir)
  writer.write_scalars(step, scalars(result))
  writer.close()
  if jax.process_index() == 0:
    plot_history(workdir)
  exp.close()
  logging.info("Eval: %s", result)
  return result
