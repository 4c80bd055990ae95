"""Experiment setup: from a config to everything the loop, the sampler and the evaluator need.

Contract: `setup(config, workdir, growth_state=None, devices=None)` builds, without allocating any
state, an `Experiment`: the mesh (over `devices`, default all of this job's; compile-only TPU
devices for `plan`), the model of the (growth stage's) architecture, the generative process
(`processes.from_config`: DDPM chain, Chen's chain, NCSN noise scales or flow) and its objective,
the optimiser, the per-purpose base keys, the abstract state (`jax.eval_shape`) and its shardings,
and the checkpointer of `workdir/checkpoints` (made on first use, so an experiment that is only
compiled leaves nothing on disk). With progressive growth and no `growth_state`, the latest
checkpoint's growth stage decides the architecture, so a resumed run rebuilds the network it saved.
`compile_train_step(exp, batch)` is the one place the train step is jitted (shardings, donated
state) and compiled ahead of time; `batch` may hold arrays or `jax.ShapeDtypeStruct`s
(`data.batch_spec`). `restore_or_init(exp)` returns (state, restored?): the latest checkpoint
restored straight into its shards, else a jitted, sharded init. `exp.meta(state)` is the JSON saved
beside every checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding

from difflax import checkpoint as ckpt_lib
from difflax import data as data_lib
from difflax import growth
from difflax import models
from difflax import parallel
from difflax import processes
from difflax import state as state_lib
from difflax import step as step_lib

KEY_NAMES = ("init", "step", "preview", "eval")


@dataclasses.dataclass
class Experiment:
  config: Any
  workdir: str
  mesh: Any
  model: Any
  process: processes.Process
  objective: Any
  optimizer: Any
  lr_schedule: Any
  init_fn: Any
  abstract_state: Any
  shardings: Any
  keys: dict
  growth_state: growth.GrowthState = growth.GrowthState()
  given_checkpointer: Optional[ckpt_lib.Checkpointer] = None

  @functools.cached_property
  def checkpointer(self) -> ckpt_lib.Checkpointer:
    """workdir/checkpoints (the one passed to `setup`, else made on first use)."""
    return self.given_checkpointer or ckpt_lib.Checkpointer(
        os.path.join(self.workdir, "checkpoints"), keep=self.config.train.keep_checkpoints)

  @property
  def resolution(self) -> int:
    """The model's input resolution (a progressive growth stage's, else data.resolution)."""
    return growth.resolution(self.config, self.growth_state)

  @functools.cached_property
  def best_checkpointer(self) -> ckpt_lib.Checkpointer:
    """workdir/best: the state of the best eval so far (eval/best.json says which step); its
    own directory, so keep-N deletion in checkpoints/ never removes it."""
    return ckpt_lib.Checkpointer(os.path.join(self.workdir, "best"), keep=1)

  @property
  def batch_sharding(self) -> NamedSharding:
    return parallel.batch_sharding(self.mesh)

  def meta(self, state, extra: Optional[dict] = None) -> dict:
    meta = {"step": int(jax.device_get(state.step)),
            "param_shapes": ckpt_lib.param_shapes(self.abstract_state.params),
            "model": self.config.model.to_dict(), "data_resolution": self.config.data.resolution,
            "diffusion": self.config.diffusion.to_dict(), **self.process.meta(),
            **(extra or {})}
    if growth.enabled(self.config):
      meta.update(growth=self.growth_state.to_meta(), resolution=self.resolution)
    return meta

  def close(self) -> None:
    for name in ("checkpointer", "best_checkpointer"):
      if name in self.__dict__:
        self.__dict__[name].close()


def setup(config, workdir: str, growth_state: Optional[growth.GrowthState] = None,
          checkpointer: Optional[ckpt_lib.Checkpointer] = None, devices=None) -> Experiment:
  """Everything but data and allocated state; cheap (shapes only)."""
  if growth_state is None and growth.enabled(config):
    checkpointer = checkpointer or ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
    growth_state = growth.GrowthState.from_meta((checkpointer.read_meta() or {}).get("growth"))
  growth_state = growth_state or growth.GrowthState()
  mesh = parallel.make_mesh(config.mesh, devices)
  model = models.build_model(config, growth_state)
  process = processes.from_config(
      config, lambda n: data_lib.sample_array(config.data, n, config.seed))
  optimizer, lr_schedule = state_lib.make_optimizer(config.optim)
  keys = dict(zip(KEY_NAMES, jax.random.split(jax.random.key(config.seed), len(KEY_NAMES))))
  init_fn = functools.partial(state_lib.init_state, model, optimizer, config,
                              resolution=growth.resolution(config, growth_state))
  abstract = jax.eval_shape(init_fn, keys["init"])
  shardings = parallel.state_shardings(abstract, mesh, config.mesh)
  return Experiment(config, workdir, mesh, model, process, process.objective(), optimizer,
                    lr_schedule, init_fn, abstract, shardings, keys, growth_state, checkpointer)


def jit_train_step(exp: Experiment):
  """`step.make_train_step` of `exp`'s architecture under `jax.jit` with the state's shardings
  (donated), every batch leaf sharded over the mesh's batch axes and replicated metrics: the one
  train step the loop, the plan, the tests and the benchmarks run."""
  fn = step_lib.make_train_step(exp)
  return jax.jit(fn, in_shardings=(exp.shardings, exp.batch_sharding),
                 out_shardings=(exp.shardings, parallel.replicated(exp.mesh)),
                 donate_argnums=(0,))


def compile_train_step(exp: Experiment, batch: dict):
  """`jit_train_step(exp)` compiled ahead of time for `batch` (arrays or
  `jax.ShapeDtypeStruct`s: the compile needs shapes only)."""
  return jit_train_step(exp).lower(exp.abstract_state, batch).compile()


def init_state(exp: Experiment):
  """A fresh state, allocated directly in its shards."""
  return jax.jit(exp.init_fn, out_shardings=exp.shardings)(exp.keys["init"])


def restore_or_init(exp: Experiment):
  """(state, restored?): the latest checkpoint if any, else a fresh sharded init."""
  if exp.checkpointer.latest_step() is not None:
    target = jax.tree_util.tree_map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        exp.abstract_state, exp.shardings)
    state, meta = exp.checkpointer.restore(target)
    logging.info("Restored step %d from %s", meta["step"], exp.checkpointer.directory)
    return state, True
  return init_state(exp), False


def restore_trained(config, workdir: str) -> tuple[Experiment, Any]:
  """(experiment, state) of a trained run for sample / eval modes; says to train first if the
  workdir has no checkpoint."""
  exp = setup(config, workdir)
  if exp.checkpointer.latest_step() is None:
    raise FileNotFoundError(f"No checkpoint in {exp.checkpointer.directory}: train first with "
                            f"--mode=train --workdir={workdir}.")
  return exp, restore_or_init(exp)[0]


def num_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
