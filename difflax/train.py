"""The one training loop, and `run`, which dispatches a mode to its module.

Contract: `train(config, workdir) -> dict` trains to `config.train.num_steps`, resuming from the
latest checkpoint in `workdir`: experiment setup (mesh, model, abstract state, shardings) ->
restore or init -> data from the restored step -> per architecture: compile the step once, then
steps with periodic work (metrics through `writers`, checkpoints, preview grids, evals,
progressive growth). A SIGTERM to any process checkpoints the current step on all of them and
returns; a non-finite loss stops the run with a message and without checkpointing the bad
state. Progressive growth is a phase change of this loop (surgery on the state, re-jit); a
cascade's stages are trained one after another by it. Outputs in `workdir`: config.json,
checkpoints/, best/, metrics.jsonl + TensorBoard events, samples/step_XXXXXX.png, eval/. A run
that reaches num_steps ends with the quality line (`eval.quality_line`: its samples' quick FD,
KID and shape score beside real data's).

`run(config, workdir, mode)`: train (every stage of a cascade in order, or `cascade.stage`),
sample (`sampling`; a cascade's `pipeline`, or its `cascade.stage` alone), eval
(`evaluation.evaluator`), sweep (`pipeline`), plan (`plan`: compile every stage ahead of time for
a target and write plan.json, no state allocated); `mode` may name several, comma
separated ("train,sample"), run in that order in one process (one start-up, one
`jax.distributed` job).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from difflax import cascade
from difflax import config as config_lib
from difflax import data as data_lib
from difflax import experiment
from difflax import fileio
from difflax import growth
from difflax import images as images_lib
from difflax import parallel
from difflax import pipeline
from difflax import plan as plan_lib
from difflax import sampling
from difflax import writers
from difflax.evaluation import evaluator as evaluator_lib
from difflax.evaluation import quality

MODES = ("train", "sample", "eval", "sweep", "plan")


def every(n: int, step: int, final: bool = False) -> bool:
  """Periodic work: each `n` steps (n > 0) and at the run's last step; never when n == 0."""
  return n > 0 and (step % n == 0 or final)


class StopOnSignal:
  """SIGTERM (pod preemption, `kill`) -> every process stops at, and checkpoints, the same step.

  One process: a Python handler sets a flag the loop reads after each step. Several processes
  with JAX's preemption service (the default with `jax.distributed`): its own SIGTERM notifier
  and the coordination service pick the stop step (`reached_preemption_sync_point`, no device
  collective, so the host keeps dispatching steps ahead). Otherwise the flag is agreed by an
  all-gather every `check_every` steps (a per-step one stalls asynchronous dispatch)."""

  def __init__(self, check_every: int = 1):
    self.requested, self._previous, self.check_every = False, None, max(int(check_every), 1)
    self.synced = parallel.preemption_service()

  def __enter__(self):
    if self.synced:  # JAX's notifier owns SIGTERM.
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. some notebook kernels): no handler.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.requested = True

  def __call__(self, step: int, after=None) -> bool:
    """Whether every process stops after `step` (`after`: the step's outputs, waited for before
    an all-gather; see `parallel.any_process`)."""
    if jax.process_count() == 1:
      return self.requested
    if self.synced:
      stop = multihost_utils.reached_preemption_sync_point(step)
      if stop:
        logging.warning("Preemption notice: every process stops at step %d.", step)
      return stop
    return step % self.check_every == 0 and parallel.any_process(self.requested, after)

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def check_finite(values: dict, what: str, step: int, workdir: str) -> None:
  bad = {k: float(v) for k, v in values.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"Non-finite {what} {bad} by step {step}. The state was not checkpointed; the last good "
        f"checkpoint in {workdir}/checkpoints is kept and a rerun resumes from it. Try a lower "
        "config.optim.lr, config.optim.grad_clip=1.0, or check the data for NaNs.")


# ------------------------------------------------------------------------------ phase
class Phase:
  """What one architecture needs: its experiment, the compiled step, preview and eval."""

  def __init__(self, exp: experiment.Experiment, batch, step: int):
    c = exp.config
    t0 = time.perf_counter()  # Ahead of time, so its cost is reported.
    self.train_step = experiment.compile_train_step(exp, batch)
    self.compile_secs = time.perf_counter() - t0
    logging.info("Compiled the train step in %.1fs (resolution %d)", self.compile_secs,
                 exp.resolution)
    parallel.barrier(f"difflax_compiled_step_{step}")  # Start the first step together.
    self.exp = exp
    self.preview_fn = (sampling.make_sample_fn(exp, c.train.preview_sampler,
                                               c.train.preview_steps)
                       if c.train.preview_every else None)
    plateau_fd = growth.enabled(c) and c.growth.trigger == "plateau" and (
        c.growth.plateau_metric == "quick_fd")
    self.evaluator = (evaluator_lib.Evaluator(exp) if c.train.eval_every or plateau_fd
                      else None)

  def preview(self, state, step: int, writer) -> None:
    c, exp = self.exp.config, self.exp
    inputs = sampling.model_conditions(exp, c.train.preview_num, exp.keys["preview"], step)
    imgs, _ = sampling.generate(exp, self.preview_fn, state.ema_params, exp.keys["preview"],
                                c.train.preview_num, c.train.preview_num, inputs=inputs)
    write_grid(exp, imgs, inputs, step, writer)

  def evaluate(self, state, step: int, writer, meta: dict) -> dict:
    result = self.evaluator(state.ema_params, step)
    writer.write_scalars(step, evaluator_lib.scalars(result))
    if result["is_best"]:
      self.exp.best_checkpointer.save(step, state, meta)
    return result


def write_grid(exp: experiment.Experiment, imgs, inputs, step: int, writer) -> None:
  """samples/step_<N>.png (an SR stage's: conditioning beside output) and the writer's image."""
  low = inputs.low_res[:len(imgs)] if inputs is not None and inputs.low_res is not None else None
  grid = images_lib.make_grid(imgs) if low is None else images_lib.make_pair_grid(low, imgs)
  if jax.process_index() == 0:
    fileio.save_png(os.path.join(exp.workdir, "samples", f"step_{step:06d}.png"), grid)
  writer.write_images(step, {"samples": grid[None]})


def final_quality(exp: experiment.Experiment, preview_fn, state, step: int, writer) -> dict:
  """The quality line of a finished run: `eval.quality_samples` EMA samples drawn with the
  preview sampler, scored against the data (`evaluation.quality`); numbers to the writer as
  `quality_*` and to workdir/eval/quality_step<N>.json; the first `train.preview_num` are the
  final preview grid (one sampling pass for both). `preview_fn`: the loop's, for `exp`'s
  architecture, or None to build it."""
  c = exp.config
  fn = preview_fn or sampling.make_sample_fn(exp, c.train.preview_sampler, c.train.preview_steps)
  n, key = c.eval.quality_samples, exp.keys["eval"]
  inputs = sampling.model_conditions(exp, n, key, step)
  imgs, _ = sampling.generate(exp, fn, state.ema_params, key, n, c.sample.batch_size,
                              inputs=inputs)
  if c.train.preview_every:  # The final preview (the loop leaves it to these samples).
    write_grid(exp, imgs[:min(n, c.train.preview_num)], inputs, step, writer)
  result = quality.report(c, imgs, exp.mesh, f"samples at step {step}")
  writer.write_scalars(step, {f"quality_{k}": v for k, v in result.items()
                              if isinstance(v, float)})
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(exp.workdir, "eval", f"quality_step{step:06d}.json"), result)
  return result


def grow(exp: experiment.Experiment, state, new_gs: growth.GrowthState):
  """The next architecture's experiment and the state carried over by `growth.grow_state`.

  The surgery runs under `jit` from the old shardings to the new ones: leaves move shard to
  shard, also when FSDP shards span processes (no host copy of the state)."""
  logging.info("Growth at step %d: %s -> %s", int(jax.device_get(state.step)),
               exp.growth_state, new_gs)
  new = experiment.setup(exp.config, exp.workdir, new_gs, checkpointer=exp.checkpointer)
  surgery = lambda old: growth.grow_state(old, new.init_fn(new.keys["init"]))[0]
  return new, jax.jit(surgery, out_shardings=new.shardings)(state)


# ------------------------------------------------------------------------------ loop
def train(config, workdir: str) -> dict:
  """Trains until `config.train.num_steps`, resuming from the latest checkpoint in `workdir`."""
  c, t = config, config.train
  # ---- Experiment: mesh, model, abstract state, shardings; restore or init.
  exp = experiment.setup(c, workdir)
  state, restored = experiment.restore_or_init(exp)
  step = start = int(jax.device_get(state.step))
  logging.info("Model %s: %d parameters; %s at step %d; mesh %s", c.model.name,
               experiment.num_params(exp.abstract_state.params),
               "resumed" if restored else "initialised", start, dict(exp.mesh.shape))
  if start >= t.num_steps:
    logging.info("Already trained to step %d >= num_steps=%d.", start, t.num_steps)
    exp.close()
    return {"step": start}
  # ---- Input: the stream is a function of (seed, step), so a resumed run sees the same data.
  it = data_lib.make_iterator(c.data, exp.mesh, seed=c.seed, start_step=start)
  batch = next(it)
  # ---- Reporting and the growth trigger's memory (checkpointed with the state).
  writer = writers.create(workdir)
  report = writers.ReportProgress(num_train_steps=t.num_steps, writer=writer,
                                   every_steps=t.log_every)
  saved = ((exp.checkpointer.read_meta() or {}).get("plateau") if restored else None) or {}
  plateau = growth.PlateauTracker(c.growth.plateau_patience, saved.get("best", float("inf")),
                                  saved.get("bad", 0))
  meta = lambda: exp.meta(state, {"plateau": {"best": plateau.best, "bad": plateau.bad}}
                          if growth.enabled(c) else None)
  pending, plateau_losses, last, stopping = [], [], {}, False
  # ---- Loop: one phase per architecture (one, unless progressive growth changes it).
  try:
    with StopOnSignal(t.stop_check_every) as stop:
      while step < t.num_steps and not stopping:
        phase = Phase(exp, batch, step)
        writer.write_scalars(step + 1, {"compile_secs": phase.compile_secs})
        for step in range(step + 1, t.num_steps + 1):
          if step > start + 1:
            batch = next(it)
          state, metrics = phase.train_step(state, batch)
          pending.append(metrics)
          report(step)
          stopping = stop(step, metrics)  # All processes stop at one step.
          final = step == t.num_steps or stopping
          if every(t.log_every, step, final) or every(t.checkpoint_every, step):
            last = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
            check_finite(last, "training metrics", step, workdir)
            writer.write_scalars(step, last)
            pending = []
          # ---- Progressive growth: plateau trigger, then a new architecture by surgery.
          if growth.enabled(c):
            plateau_losses.append(metrics["loss"])
            plateaued = False
            if c.growth.trigger == "plateau" and every(c.growth.plateau_every, step):
              value = (phase.evaluate(state, step, writer, meta())["quick_fd"]
                       if c.growth.plateau_metric == "quick_fd"
                       else float(np.mean(jax.device_get(plateau_losses))))
              plateaued, plateau_losses = plateau.update(value), []
            new_gs = growth.next_state(c, exp.growth_state, step, plateaued)
            if new_gs != exp.growth_state:
              exp, state = grow(exp, state, new_gs)
              plateau.reset()
              exp.checkpointer.save(step, state, meta())
              pending = []  # Metrics of the old architecture were logged or are dropped here.
              break  # Re-jit for the new architecture.
          # ---- Checkpoint, preview, eval.
          with report.timed("periodic"):
            if final or every(t.checkpoint_every, step):
              exp.checkpointer.save(step, state, meta())
            # The quality line samples the final step anyway: its first samples are that grid.
            quality_next = final and not stopping and c.eval.quality_line
            if (phase.preview_fn is not None and every(t.preview_every, step, final)
                and not quality_next):
              phase.preview(state, step, writer)
            if phase.evaluator is not None and every(t.eval_every, step, final):
              phase.evaluate(state, step, writer, meta())
          if stopping:
            logging.warning("Stopped at step %d after SIGTERM; rerun the same command to resume.",
                            step)
            break
  except BaseException:
    exp.close()  # A save in flight finishes: the newest checkpoint on disk stays whole.
    raise
  out = {"step": int(jax.device_get(state.step)), "compile_secs": phase.compile_secs, **last}
  if c.eval.quality_line and not stopping:
    # A growth at the last step leaves `phase` on the old architecture: sample the grown one.
    out["quality"] = final_quality(exp, phase.preview_fn if phase.exp is exp else None, state,
                                   step, writer)
  writer.close()
  if jax.process_index() == 0:
    evaluator_lib.plot_history(workdir)
  exp.close()
  return out


# ------------------------------------------------------------------------------ run
def parse_modes(mode: str) -> list[str]:
  """'train,sample' -> ['train', 'sample']; an unknown or empty name is a `ConfigError`."""
  modes = [m.strip() for m in mode.split(",")]
  bad = [m for m in modes if m not in MODES]
  if bad or not modes:
    raise config_lib.ConfigError(f"Unknown --mode={mode!r}; valid: {', '.join(MODES)}, or "
                                 "several in order, comma separated (e.g. train,sample).")
  return modes


def run(config, workdir: str, mode: str = "train", plan_options: dict | None = None) -> dict:
  """Validates `config` and runs `mode` (or each of 'train,sample,...' in order: the result of
  several is {mode: result}). `plan_options`: `plan.plan`'s topology / mfu / hbm_gib."""
  modes = parse_modes(mode)
  config_lib.validate(config)
  if len(modes) > 1:
    return {m: _run_one(config, workdir, m, plan_options) for m in modes}
  return _run_one(config, workdir, modes[0], plan_options)


def stage_configs(config) -> dict:
  """{stage name: config} of a cascade, or {"model": config}."""
  if cascade.is_cascade(config):
    return {n: cascade.stage_config(config, n) for n in cascade.stage_names(config)}
  return {"model": config}


def check(config, workdir: str, mode: str = "train") -> str:
  """`--dry_run`: the modes, the config and every stage's data source checked (what the first
  batch would find wrong raises here), the workdir creatable; nothing built or written.
  Returns a summary."""
  modes = parse_modes(mode)
  config_lib.validate(config)
  lines = [f"OK: --mode={','.join(modes)} --workdir={workdir}"]
  if "plan" not in modes or len(modes) > 1:
    for name, c in stage_configs(config).items():
      lines.append(f"  {name}: {c.data.resolution}x{c.data.resolution}, "
                   f"{data_lib.check_source(c.data)}")
  path = fileio.path(workdir)
  if not fileio.is_url(workdir):
    parent = next(p for p in [path, *path.parents] if p.exists())
    if not os.access(parent, os.W_OK):
      raise FileNotFoundError(f"--workdir={workdir}: {parent} is not writable.")
    state = "exists (a run resumes from its checkpoints)" if path.exists() else "new"
    lines.append(f"  workdir: {state}")
  return "\n".join(lines)


def _run_one(config, workdir: str, mode: str, plan_options: dict | None = None) -> dict:
  """Records the config as workdir/config.json (train) and runs one mode; a data source that
  cannot serve the config fails before anything is written."""
  if mode in ("train", "sample", "eval"):
    for c in stage_configs(config).values():
      data_lib.check_source(c.data)
  fileio.path(workdir).mkdir(parents=True, exist_ok=True)
  if mode == "plan":  # Every stage of a cascade / growth level: plan.py walks them itself.
    result = plan_lib.plan(config, workdir, **(plan_options or {}))
    if jax.process_index() == 0:
      print(plan_lib.format_table(result), plan_lib.describe(result), sep="\n", flush=True)
    return result
  if mode == "train" and jax.process_index() == 0:
    fileio.write_json(os.path.join(workdir, "config.json"),
                      json.loads(config.to_json_best_effort()))
  if cascade.is_cascade(config):
    names = cascade.stage_names(config)
    if mode == "train":  # Every stage (or cascade.stage) in order, each resuming on its own.
      results = {}
      for name in [config.cascade.stage] if config.cascade.stage else names:
        logging.info("Cascade stage %s (%d/%d)", name, names.index(name) + 1, len(names))
        results[name] = train(cascade.stage_config(config, name), os.path.join(workdir, name))
      return results
    if mode == "eval":
      name = config.cascade.stage or names[-1]
      return evaluator_lib.evaluate(cascade.stage_config(config, name),
                                    os.path.join(workdir, name))
    if mode == "sample" and config.cascade.stage:
      # One stage alone, as its previews and quality line sample it (an SR stage conditioned on
      # eval-split images at its low resolution); without cascade.stage: the pipeline.
      name = config.cascade.stage
      return sampling.sample(cascade.stage_config(config, name), os.path.join(workdir, name))
    return {"sample": pipeline.sample, "sweep": pipeline.sweep}[mode](config, workdir)
  if mode == "sweep":
    raise config_lib.ConfigError("--mode=sweep sweeps a cascade's augmentation level; this "
                                 "config has no stages (use a configs/cascade_*.py config).")
  return {"train": train, "sample": sampling.sample,
          "eval": evaluator_lib.evaluate}[mode](config, workdir)
