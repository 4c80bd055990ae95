"""The one training loop.

Contract: `train(config, workdir) -> dict` trains to `config.train.num_steps`, resuming from the
latest checkpoint in `workdir`: experiment setup (mesh, model, abstract state, shardings) ->
restore or init -> data from the restored step -> per architecture: compile the step once, then
steps with periodic work (metrics through `writers`, checkpoints, preview grids, evals,
progressive growth). A SIGTERM to any process checkpoints the current step on all of them and
returns; a non-finite loss stops the run with a message and without checkpointing the bad
state. Progressive growth is a phase change of this loop (surgery on the state, re-jit); a
cascade's stages are trained one after another by it (`modes`). Outputs in `workdir`:
checkpoints/, best/, metrics.jsonl + TensorBoard events, samples/step_XXXXXX.png, eval/. A run
that reaches num_steps ends with the quality line (`eval.quality_line`: its samples' quick FD,
KID and shape score beside real data's).

`run(config, workdir, mode)` is the entry point (`main.py`, notebooks): `modes.run` with this
loop as its train mode; mode routing and cascades' stage order live in `modes`.
"""
from __future__ import annotations

import logging
import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from difflax import data as data_lib
from difflax import experiment
from difflax import fileio
from difflax import growth
from difflax import images as images_lib
from difflax import modes
from difflax import parallel
from difflax import sampling
from difflax import writers
from difflax.evaluation import evaluator as evaluator_lib
from difflax.evaluation import quality

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


def checkpoint_meta(exp: experiment.Experiment, state, plateau) -> dict:
  """A checkpoint's metadata: the experiment's (architecture, growth stage) and the plateau
  trigger's memory (`plateau`: a `growth.PlateauTracker`, or None without growth)."""
  return exp.meta(state, None if plateau is None else
                  {"plateau": {"best": plateau.best, "bad": plateau.bad}})


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
  plateau = (growth.PlateauTracker(c.growth.plateau_patience, saved.get("best", float("inf")),
                                   saved.get("bad", 0)) if growth.enabled(c) else None)
  pending, plateau_losses, last, stopping, evaluated = [], [], {}, False, -1
  # ---- Loop: one phase per architecture (one, unless progressive growth changes it).
  try:
    with StopOnSignal(t.stop_check_every) as stop:
      while step < t.num_steps and not stopping:
        phase = Phase(exp, batch, step)
        writer.write_scalars(step + 1, {"compile_secs": phase.compile_secs})
        if step > start:  # A growth step: its preview / eval, of the grown model, were left out.
          if phase.preview_fn is not None and every(t.preview_every, step):
            phase.preview(state, step, writer)
          if phase.evaluator is not None and every(t.eval_every, step) and evaluated != step:
            phase.evaluate(state, step, writer, checkpoint_meta(exp, state, plateau))
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
              if c.growth.plateau_metric == "quick_fd":
                value = phase.evaluate(state, step, writer,
                                       checkpoint_meta(exp, state, plateau))["quick_fd"]
                evaluated = step
              else:
                value = float(np.mean(jax.device_get(plateau_losses)))
              plateaued, plateau_losses = plateau.update(value), []
            new_gs = growth.next_state(c, exp.growth_state, step, plateaued)
            if new_gs != exp.growth_state:
              exp, state = grow(exp, state, new_gs)
              plateau.reset()
              exp.checkpointer.save(step, state, checkpoint_meta(exp, state, plateau))
              pending = []  # Metrics of the old architecture were logged or are dropped here.
              break  # Re-jit for the new architecture.
          # ---- Checkpoint, preview, eval.
          with report.timed("periodic"):
            if final or every(t.checkpoint_every, step):
              exp.checkpointer.save(step, state, checkpoint_meta(exp, state, plateau))
            # The quality line samples the final step anyway: its first samples are that grid.
            quality_next = final and not stopping and c.eval.quality_line
            if (phase.preview_fn is not None and every(t.preview_every, step, final)
                and not quality_next):
              phase.preview(state, step, writer)
            if (phase.evaluator is not None and every(t.eval_every, step, final)
                and evaluated != step):  # (The plateau trigger's eval may have run already.)
              phase.evaluate(state, step, writer, checkpoint_meta(exp, state, plateau))
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


def run(config, workdir: str, mode: str = "train", plan_options: dict | None = None):
  """`modes.run` with this loop as its train mode: what `main.py` and notebooks call
  ("train", "sample", ..., or several comma separated, in order)."""
  return modes.run(config, workdir, mode, train_fn=train, plan_options=plan_options)
