"""Checkpoints: an orbax CheckpointManager holding the train state plus JSON metadata.

Contract: `Checkpointer(directory, keep)` saves `(state, meta)` pairs atomically (orbax writes to a
temporary directory and renames), keeps the newest `keep`, and restores the latest one into a
given abstract state (shapes + shardings), so restored arrays land directly in their shards.
`meta` is JSON: the step, the parameter shapes (`param_shapes`) and any stage metadata a caller
adds (growth stage, cascade stage). Before restoring, the checkpoint's parameter shapes are
compared with the expected ones and `CheckpointMismatchError` names the differing paths, instead
of a shape error deep inside orbax.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from difflax import trees


class CheckpointMismatchError(ValueError):
  """The checkpoint on disk was written by a different architecture."""


def param_shapes(params: Any) -> dict[str, list[int]]:
  """{'down_32/res_0/conv_0/kernel': [3, 3, 32, 32], ...} for a (possibly abstract) param tree."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {trees.path_str(p): list(getattr(x, "shape", ())) for p, x in flat}


def compare_shapes(saved: dict, expected: dict) -> list[str]:
  """Human-readable differences between two `param_shapes` dicts (empty if they agree)."""
  diffs = []
  for k in sorted(set(saved) | set(expected)):
    if k not in expected:
      diffs.append(f"{k}: in checkpoint {saved[k]}, not in the model")
    elif k not in saved:
      diffs.append(f"{k}: in the model {expected[k]}, not in the checkpoint")
    elif list(saved[k]) != list(expected[k]):
      diffs.append(f"{k}: checkpoint {saved[k]} vs model {expected[k]}")
  return diffs


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with items 'state' and 'meta'."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()
    logging.info("Saved checkpoint at step %d to %s", step, self.directory)

  def read_meta(self, step: Optional[int] = None) -> Optional[dict]:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """(state, meta) of the latest (or given) step, placed per `abstract_state`'s shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    meta = self.read_meta(step)
    diffs = compare_shapes(meta.get("param_shapes", {}), param_shapes(abstract_state.params))
    if diffs:
      shown = "\n  ".join(diffs[:10]) + ("\n  ..." if len(diffs) > 10 else "")
      raise CheckpointMismatchError(
          f"The checkpoint at {self.directory} (step {step}) was written by a different "
          f"architecture; {len(diffs)} parameter(s) differ:\n  {shown}\nUse the config it was "
          "trained with (saved as config.json in its workdir) or start a new --workdir.")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"], meta

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
