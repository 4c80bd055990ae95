"""Modes: what `--mode=` names, routed to the module that does it; cascades' stage order.

Contract: `run(config, workdir, mode, train_fn=)` validates the config and runs each of the
comma-separated modes in order in this process (one start-up, one `jax.distributed` job):
train (`train_fn`, the loop: every stage of a cascade in order into workdir/<stage>, or
`cascade.stage` alone; workdir/config.json records the config), sample (`sampling`; a cascade's
`pipeline`, or its `cascade.stage` alone), eval (`evaluation.evaluator`), sweep (`pipeline`: a
cascade's augmentation-level sweep), plan (`plan`: every stage compiled ahead of time for a
target, plan.json, no state allocated). A data source that cannot serve the config fails before
anything is written; then process 0 holds workdir/.difflax.lock for the run, so a second run
into the same workdir fails at once (`fileio.BusyError`) instead of interleaving files. `check`
is `--dry_run`: the same checks, nothing built or written.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Callable

import jax

from difflax import cascade
from difflax import config as config_lib
from difflax import data as data_lib
from difflax import fileio
from difflax import pipeline
from difflax import plan as plan_lib
from difflax import sampling
from difflax.evaluation import evaluator as evaluator_lib

MODES = ("train", "sample", "eval", "sweep", "plan")
LOCK_FILE = ".difflax.lock"
TrainFn = Callable[..., dict]  # (config, workdir) -> the loop's result


def parse_modes(mode: str) -> list[str]:
  """'train,sample' -> ['train', 'sample']; an unknown or empty name is a `ConfigError`."""
  modes = [m.strip() for m in mode.split(",")]
  bad = [m for m in modes if m not in MODES]
  if bad or not modes:
    raise config_lib.ConfigError(f"Unknown --mode={mode!r}; valid: {', '.join(MODES)}, or "
                                 "several in order, comma separated (e.g. train,sample).")
  return modes


def run(config, workdir: str, mode: str = "train", *, train_fn: TrainFn,
        plan_options: dict | None = None) -> dict:
  """Validates `config` and runs `mode` (or each of 'train,sample,...' in order: the result of
  several is {mode: result}). `train_fn(config, workdir)`: the loop, passed in by `train.run`
  (the entry point `main.py` and notebooks call; train.py imports this module, not the
  reverse). `plan_options`: `plan.plan`'s topology / mfu / hbm_gib."""
  modes, _ = _checked(config, mode)  # Before anything is written.
  with _one_run_at_a_time(workdir):
    if len(modes) > 1:
      return {m: _run_one(config, workdir, m, train_fn, plan_options) for m in modes}
    return _run_one(config, workdir, modes[0], train_fn, plan_options)


def _one_run_at_a_time(workdir: str):
  """Two runs writing one workdir would interleave checkpoints, metrics and samples silently:
  process 0 of a run holds workdir/.difflax.lock until it ends (a second run on this machine, or
  on a shared file system, fails at once naming the holder). Process 0 only: a multi-process
  run's other processes share the workdir with it."""
  if jax.process_index():
    return contextlib.nullcontext()
  return fileio.exclusive(os.path.join(workdir, LOCK_FILE), f"--workdir={workdir}")


def _checked(config, mode: str) -> tuple[list[str], dict]:
  """(the modes of `mode`, {stage: its data source described}) after validating `config` and
  every stage's data source (which only `plan` alone does not read); `run` and `check` start
  here."""
  modes = parse_modes(mode)
  config_lib.validate(config)
  sources = ({} if modes == ["plan"] else
             {name: data_lib.check_source(c.data) for name, c in stage_configs(config).items()})
  return modes, sources


def stage_configs(config) -> dict:
  """{stage name: config} of a cascade, or {"model": config}."""
  if cascade.is_cascade(config):
    return {n: cascade.stage_config(config, n) for n in cascade.stage_names(config)}
  return {"model": config}


def check(config, workdir: str, mode: str = "train") -> str:
  """`--dry_run`: the modes, the config and every stage's data source checked (what the first
  batch would find wrong raises here), the workdir creatable; nothing built or written.
  Returns a summary."""
  modes, sources = _checked(config, mode)
  lines = [f"OK: --mode={','.join(modes)} --workdir={workdir}"]
  stages = stage_configs(config)
  for name, source in sources.items():
    res = stages[name].data.resolution
    lines.append(f"  {name}: {res}x{res}, {source}")
  path = fileio.path(workdir)
  if not fileio.is_url(workdir):
    parent = next(p for p in [path, *path.parents] if p.exists())
    if not os.access(parent, os.W_OK):
      raise FileNotFoundError(f"--workdir={workdir}: {parent} is not writable.")
    state = "exists (a run resumes from its checkpoints)" if path.exists() else "new"
    lines.append(f"  workdir: {state}")
  return "\n".join(lines)


def _run_one(config, workdir: str, mode: str, train_fn: TrainFn,
             plan_options: dict | None) -> dict:
  """Records the config as workdir/config.json (train) and runs one mode."""
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
      for name in cascade.selected_stages(config):
        logging.info("Cascade stage %s (%d/%d)", name, names.index(name) + 1, len(names))
        results[name] = train_fn(cascade.stage_config(config, name), os.path.join(workdir, name))
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
  return {"train": train_fn, "sample": sampling.sample,
          "eval": evaluator_lib.evaluate}[mode](config, workdir)
