"""Checkpoints: an orbax CheckpointManager holding the train state plus JSON metadata, verified.

Contract: `Checkpointer(directory, keep)` saves `(state, meta)` pairs atomically (orbax writes to a
temporary directory and renames), asynchronously (`save` returns once the arrays are copied to
host memory and writes them in a background thread, so the loop trains on while a large state
goes to a bucket; a killed write leaves only a temporary directory, which is ignored; `wait`,
`restore`, `read_meta` and `close` wait for it), keeps the newest `keep`, and restores into a
given abstract state (shapes + shardings), so restored arrays land directly in their shards
whatever topology wrote them. `directory` may be a local path or a URL (`gs://...`); it is passed to orbax as an
`epath.Path`, never turned into a local folder.

`meta` is JSON: the step, the parameter shapes (`param_shapes`), `checksums` (one 32-bit
checksum per state leaf, `state_checksums`) and any stage metadata a caller adds. Integrity:
  * a state with non-finite values is never committed (it would poison every resumed run). The
    checksums and finiteness flags are dispatched by `save` and fetched in orbax's background
    thread, where the meta JSON is written (`_MetaHandler`), so the loop does not wait for them:
    a non-finite state fails that write, the step never becomes a checkpoint, and the
    `FloatingPointError` is raised by the next `save`, `wait` or `close` (at once when
    `async_save=False`);
  * restore compares the checkpoint's parameter shapes with the expected ones first
    (`CheckpointMismatchError` names the differing paths: another architecture is a user error,
    not damage), then verifies every restored leaf against its recorded checksum and for
    finiteness. A damaged checkpoint (unreadable, checksum mismatch, NaN / inf) is logged with
    its step and the damaged arrays, moved aside to `<directory>_damaged/<step>` (kept for
    inspection, never deleted) and the next older one is tried; `CheckpointCorruptError` if none
    is good.
  * keep-N rotation never deletes the checkpoint this run restored and verified, so a chain of
    newer, unverified writes cannot rotate the last known-good state away.
Checksums are integer sums computed under `jit` on the sharded arrays (no host copy, exact in any
reduction order), so a checkpoint written on 2 processes x 4 devices verifies on 1 device.

Replicated arrays are written whole by one replica unless they are at least
`REPLICA_PARALLEL_MIN_BYTES` (orbax's replica-parallel writes split every replicated array over
its replicas: good for large arrays on many hosts, but for the hundreds of small leaves of a
diffusion UNet's state it made each save ~2.5x slower here); this is set on orbax's global
`jax.Array` handler when the first `Checkpointer` is built.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from difflax import fileio
from difflax import parallel
from difflax import trees

# Odd multipliers: a change of any single element changes the weighted sum (odd numbers are
# invertible mod 2^32), and the index weights make swapped elements show.
_MUL_A, _MUL_B = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77)
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


class CheckpointMismatchError(ValueError):
  """The checkpoint on disk was written by a different architecture."""


class CheckpointCorruptError(RuntimeError):
  """No checkpoint in the directory passed verification."""


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


def _leaf_summary(x):
  """(checksum: uint32, finite: bool) of one array; x may be sharded across processes."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  v = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).reshape(-1)
  i = jnp.arange(v.shape[0], dtype=jnp.uint32)
  return jnp.sum((v ^ (i * _MUL_B)) * (i * jnp.uint32(2) + jnp.uint32(1)) * _MUL_A), finite


def _group_summary(xs: list) -> jax.Array:
  """[n, 2] uint32: (checksum, finite) of each of n arrays of one signature."""
  rows = [jnp.stack([c, ok.astype(jnp.uint32)]) for c, ok in map(_leaf_summary, xs)]
  return jnp.stack(rows)


# One program per leaf signature (shape, dtype, sharding) over all the leaves that share it,
# not one over the whole tree and not one per leaf: params, EMA params and both Adam moments
# share signatures, and so do a UNet's repeated blocks, so the reference state's 979 leaves are
# 27 programs (each dispatch costs the host ~0.1 ms: 979 of them were most of the checksums'
# cost), and a growth compiles only the groups it changes (one program over all leaves
# recompiled for every new tree: 7-13 s of each growth's first checkpoint on a cold cache).
_group_summary_jit = jax.jit(_group_summary)


@jax.jit
def _concatenate(groups: list) -> jax.Array:
  return jnp.concatenate(groups)


def _signature(x) -> tuple:
  return (getattr(x, "shape", ()), str(getattr(x, "dtype", type(x))),
          getattr(x, "sharding", None))


def _needs_own_turn(x) -> bool:
  """Whether the checksums of leaves like `x` must finish before the next are dispatched.

  A leaf split over devices sums with a collective across them (and processes), and XLA:CPU
  runs dispatched programs concurrently on its thread pool, where two programs' collectives
  entered in different orders by different devices wait on each other forever (seen in-process
  with 8 devices; see also `parallel.any_process`). Ordering them by data dependencies instead
  (each program taking the previous checksum through an optimization barrier) still deadlocks
  there: a device starts program i + 1 while others finish i. So on the CPU such groups take
  one blocking round trip each; a leaf whole on every device needs no collective, and
  accelerators run a device's programs in dispatch order, so those are dispatched together."""
  sharding = getattr(x, "sharding", None)
  return (jax.default_backend() == "cpu" and sharding is not None
          and not sharding.is_fully_replicated)


@dataclasses.dataclass(frozen=True, repr=False)
class PendingChecksums:
  """The checksums of a state, dispatched and maybe still computing; `result()` fetches them.

  One array, fetched once: orbax's commit thread fetches it while the train loop's thread runs
  orbax's (Python-heavy) blocking phase, and a fetch per group handed the GIL back and forth
  once per array (27 fetches made `save` block ~0.1-0.2 s longer here than fetching first)."""
  step: int
  names: tuple[str, ...]
  order: tuple[int, ...]  # Leaf index of each row of `rows`.
  rows: jax.Array  # [leaves, 2] uint32: (checksum, finite), one array so one fetch.

  def __repr__(self) -> str:
    return f"PendingChecksums(step={self.step}, {len(self.names)} leaves)"

  def result(self) -> tuple[dict[str, int], list[str]]:
    """({leaf path: checksum}, [paths of leaves with NaN / inf])."""
    rows = jax.device_get(self.rows)  # Replicated on every process.
    sums, finite = [0] * len(self.names), [True] * len(self.names)
    for i, (c, ok) in zip(self.order, rows):
      sums[i], finite[i] = int(c), bool(ok)
    return (dict(zip(self.names, sums)),
            [k for k, ok in zip(self.names, finite) if not ok])


def dispatch_checksums(state: Any, step: int = -1) -> PendingChecksums:
  """Starts the checksums of a state pytree without waiting for them (see `_needs_own_turn`)."""
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0])
  by_signature = {}
  for i, x in enumerate(leaves):
    by_signature.setdefault(_signature(x), []).append(i)
  groups = []
  for indices in by_signature.values():
    groups.append(_group_summary_jit([leaves[i] for i in indices]))
    if _needs_own_turn(leaves[indices[0]]):
      jax.block_until_ready(groups[-1])
  return PendingChecksums(step, tuple(trees.path_str(p) for p in paths),
                          tuple(i for indices in by_signature.values() for i in indices),
                          _concatenate(groups))


def state_checksums(state: Any) -> tuple[dict[str, int], list[str]]:
  """({leaf path: checksum}, [paths of leaves with NaN / inf]) of a state pytree."""
  return dispatch_checksums(state).result()


def _non_finite_error(step: int, bad: list, directory) -> FloatingPointError:
  return FloatingPointError(
      f"Refusing to checkpoint step {step}: non-finite values in {', '.join(bad[:5])}"
      f"{' ...' if len(bad) > 5 else ''}. The last good checkpoint in {directory} is "
      "kept; try a lower config.optim.lr or config.optim.grad_clip=1.0.")


class _MetaHandler(ocp.handlers.JsonCheckpointHandler):
  """orbax's JSON item, whose `checksums` may be a `PendingChecksums`: fetched here, in the
  background commit (after the arrays' device-to-host copy), so the train loop never waits
  for them; a non-finite state raises here, before orbax commits the step, on every process
  (the flags are replicated), so no process commits it."""

  def __init__(self, directory):
    super().__init__()
    self._directory = directory

  async def _save_fn(self, x, directory):
    pending = x.get("checksums")
    if isinstance(pending, PendingChecksums):
      sums, bad = pending.result()
      if bad:
        raise _non_finite_error(pending.step, bad, self._directory)
      x = {**x, "checksums": sums}
    await super()._save_fn(x, directory)


@functools.cache
def _register_array_handler() -> None:
  """Once per process: orbax's `jax.Array` handler with the replica-parallel threshold above.
  Replacing the default is the point, so orbax's "overriding jax.Array" warning (printed by
  every run) is filtered out."""
  quiet = lambda record: "overriding" not in record.getMessage()
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(quiet)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES), override=True)
  finally:
    absl_logger.removeFilter(quiet)


@dataclasses.dataclass
class _KeepSteps:
  """orbax preservation policy: keep the given steps (the verified restore) whatever N says."""
  steps: set

  def should_preserve(self, checkpoints, *, context):
    del context
    return [c.step in self.steps for c in checkpoints]


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with items 'state' and 'meta'."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    _register_array_handler()
    self.directory = fileio.path(directory)
    self.verified, self.async_save = _KeepSteps(set()), async_save
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [ocp.checkpoint_managers.LatestN(keep), self.verified])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                           enable_async_checkpointing=async_save)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    meta_handler = _MetaHandler(self.directory)  # Reads and writes the usual JSON args.
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
      registry.add("state", args)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
      registry.add("meta", args, meta_handler)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         handler_registry=registry)

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint (a save in flight is not one until `wait`)."""
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts writing `state` as `step` (returns once it is copied to host memory). Raises the
    `FloatingPointError` of an earlier save in flight whose state was not finite."""
    pending = dispatch_checksums(state, int(step))
    with self._errors():
      self.manager.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave({**meta, "checksums": pending})), force=True)
    logging.info("Saving checkpoint at step %d to %s%s", step, self.directory,
                 " (in the background)" if self.async_save else "")

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is complete on disk."""
    with self._errors():
      self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _errors(self):
    """orbax re-raises a background commit's error wrapped or as is, depending on where it
    surfaces: give the caller the non-finite state's own `FloatingPointError`."""
    try:
      yield
    except FloatingPointError:
      raise
    except Exception as e:
      cause = e
      while cause is not None and not isinstance(cause, FloatingPointError):
        cause = cause.__cause__ or cause.__context__
      if cause is None:
        raise
      raise cause from None

  def read_meta(self, step: Optional[int] = None) -> Optional[dict]:
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """(state, meta) of the latest good (or the given) step, placed per `abstract_state`'s
    shardings; damaged checkpoints are reported, set aside and skipped (see module doc)."""
    self.wait()
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    damaged = []
    for s in steps:
      meta = self.read_meta(s)
      self._check_architecture(meta, abstract_state, s)
      problem, state = self._restore_verified(abstract_state, s, meta)
      if problem is None:
        self.verified.steps = {s}
        return state, meta
      damaged.append(f"step {s}: {problem}")
      logging.error("Checkpoint %s/%d is damaged (%s); %s", self.directory, s, problem,
                    "trying the previous one." if s != steps[-1] else "no older one left.")
      if step is None:
        self._set_aside(s)
    raise CheckpointCorruptError(
        f"No intact checkpoint in {self.directory}:\n  " + "\n  ".join(damaged) +
        f"\nDamaged checkpoints were moved to {self.directory}_damaged; start a new --workdir "
        "or restore a backup.")

  def _check_architecture(self, meta: dict, abstract_state: Any, step: int) -> None:
    diffs = compare_shapes(meta.get("param_shapes", {}), param_shapes(abstract_state.params))
    if diffs:
      shown = "\n  ".join(diffs[:10]) + ("\n  ..." if len(diffs) > 10 else "")
      raise CheckpointMismatchError(
          f"The checkpoint at {self.directory} (step {step}) was written by a different "
          f"architecture; {len(diffs)} parameter(s) differ:\n  {shown}\nUse the config it was "
          "trained with (saved as config.json in its workdir) or start a new --workdir.")

  def _restore_verified(self, abstract_state, step: int, meta: dict):
    """(None, state) if step restores, matches its checksums and is finite; else (why, None)."""
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))["state"]
    except Exception as e:  # Unreadable / undecodable array data.
      return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})", None
    sums, nonfinite = state_checksums(state)
    recorded = meta.get("checksums")  # Absent in checkpoints of older difflax versions.
    wrong = [k for k, v in sums.items() if recorded is not None and recorded.get(k) != v]
    if wrong:
      return (f"{len(wrong)} array(s) differ from their checksums: {', '.join(wrong[:5])}"
              f"{' ...' if len(wrong) > 5 else ''}"), None
    if nonfinite:
      return f"non-finite values in {', '.join(nonfinite[:5])}", None
    return None, state

  def _set_aside(self, step: int) -> None:
    aside = epath.Path(f"{self.directory}_damaged")
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(aside / str(step))
    parallel.barrier(f"difflax_checkpoint_aside_{step}")
    self.manager.reload()

  def close(self) -> None:
    """Waits for the save in flight, then releases orbax's threads (also when that save failed:
    its error is raised after)."""
    try:
      self.wait()
    finally:
      self.manager.close()
