"""Checkpoint integrity: checksums, finiteness, fallback to the newest good checkpoint, keep-N
rotation that spares the verified one, URL directories passed through (tiny pytrees, no model)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import checkpoint as ckpt_lib
from difflax import state as state_lib


def make_state(step, value=1.0):
  params = {"dense": {"kernel": jnp.full((4, 8), value), "bias": jnp.arange(8.0) * value}}
  return state_lib.TrainState(step=jnp.int32(step), params=params,
                              ema_params=jax.tree_util.tree_map(lambda x: x * 0.5, params),
                              opt_state=(jnp.zeros((3,), jnp.bfloat16), jnp.int32(7)))


def abstract(state):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def save(ckpt, step, value=1.0):
  state = make_state(step, value)
  ckpt.save(step, state, {"step": step, "param_shapes": ckpt_lib.param_shapes(state.params)})
  ckpt.wait()  # Saves are asynchronous; these tests read the files.


def edit_meta(directory, step, fn):
  path = os.path.join(directory, str(step), "meta", "metadata")
  meta = json.load(open(path))
  fn(meta)
  json.dump(meta, open(path, "w"))


def test_checksums_see_any_single_change_and_ignore_sharding():
  x = jnp.arange(64.0).reshape(8, 8)
  base = ckpt_lib.state_checksums({"x": x})[0]["x"]
  for i in (0, 17, 63):  # One element changed by one ulp, and two elements swapped.
    y = x.reshape(-1).at[i].set(jnp.nextafter(x.reshape(-1)[i], jnp.inf)).reshape(8, 8)
    assert ckpt_lib.state_checksums({"x": y})[0]["x"] != base
  assert ckpt_lib.state_checksums({"x": x[::-1]})[0]["x"] != base
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), ("a", "b"))
  spec = jax.sharding.PartitionSpec("a", "b")
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  assert ckpt_lib.state_checksums({"x": sharded})[0]["x"] == base
  _, bad = ckpt_lib.state_checksums({"ok": x, "bad": x.at[3, 3].set(jnp.nan)})
  assert bad == ["bad"]
  # Only a leaf split over the CPU devices (its sum a collective) waits for its own turn; a
  # mixed tree (dispatched together, then one at a time) gives every leaf's own checksum.
  replicated = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  assert ckpt_lib._needs_own_turn(sharded) and not ckpt_lib._needs_own_turn(replicated)
  assert not ckpt_lib._needs_own_turn(x)
  sums, _ = ckpt_lib.state_checksums({"a": replicated, "b": sharded, "c": x, "d": x[::-1]})
  assert sums["a"] == sums["b"] == sums["c"] == base != sums["d"]


def test_damaged_checkpoint_is_set_aside_and_the_previous_one_restored(tmp_path):
  d = str(tmp_path / "checkpoints")
  ckpt = ckpt_lib.Checkpointer(d, keep=5)
  for step in (1, 2, 3):
    save(ckpt, step, value=float(step))
  # Step 3: one array's bytes no longer match what was saved (silent corruption).
  edit_meta(d, 3, lambda m: m["checksums"].update({"params/dense/kernel": 12345}))
  # Step 2: NaN parameters that got onto disk behind our back.
  edit_meta(d, 2, lambda m: None)
  bad = make_state(2, value=float("nan"))
  ckpt.manager.delete(2)
  import orbax.checkpoint as ocp
  ckpt.manager.save(2, args=ocp.args.Composite(
      state=ocp.args.StandardSave(bad),
      meta=ocp.args.JsonSave({"step": 2, "param_shapes": ckpt_lib.param_shapes(bad.params)})),
      force=True)
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(d, keep=1)
  state, meta = ckpt.restore(abstract(make_state(0)))
  assert meta["step"] == 1 and float(state.params["dense"]["kernel"][0, 0]) == 1.0
  assert sorted(os.listdir(d + "_damaged")) == ["2", "3"]
  assert ckpt.manager.all_steps() == [1]
  # keep=1 rotation never deletes the verified checkpoint this run restored.
  save(ckpt, 4)
  save(ckpt, 5)
  assert ckpt.manager.all_steps() == [1, 5]
  ckpt.close()


def test_no_intact_checkpoint_says_so_and_deletes_nothing(tmp_path):
  d = str(tmp_path / "checkpoints")
  ckpt = ckpt_lib.Checkpointer(d)
  save(ckpt, 1)
  ckpt.close()
  edit_meta(d, 1, lambda m: m["checksums"].update({"ema_params/dense/bias": 1}))
  with pytest.raises(ckpt_lib.CheckpointCorruptError,
                     match="step 1: 1 array.*ema_params/dense/bias"):
    ckpt_lib.Checkpointer(d).restore(abstract(make_state(0)))
  assert os.listdir(d + "_damaged") == ["1"]


def test_non_finite_state_is_never_saved(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "c"))
  save(ckpt, 1)
  with pytest.raises(FloatingPointError, match="step 2: non-finite values in .*params/dense/kernel"):
    save(ckpt, 2, value=float("inf"))
  assert ckpt.manager.all_steps() == [1]
  save(ckpt, 3)  # The run (or its resume) goes on from the last good state.
  assert ckpt.manager.all_steps() == [1, 3]
  state = make_state(4, value=float("nan"))
  ckpt.save(4, state, {"step": 4, "param_shapes": ckpt_lib.param_shapes(state.params)})
  with pytest.raises(FloatingPointError, match="step 4"):  # A run's last save: close says so.
    ckpt.close()
  assert ckpt_lib.Checkpointer(str(tmp_path / "c")).manager.all_steps() == [1, 3]
  with pytest.raises(FloatingPointError, match="step 1: non-finite"):  # Also without async.
    save(ckpt_lib.Checkpointer(str(tmp_path / "sync"), async_save=False), 1, value=float("nan"))


def test_the_checksums_do_not_hold_up_the_save(tmp_path, monkeypatch):
  """`save` returns before the checksums are fetched: they are fetched in orbax's background
  commit (here held back until the test lets it go), and land in the meta JSON."""
  import threading
  release, fetched_in = threading.Event(), []
  real = ckpt_lib.PendingChecksums.result

  def held_result(self):
    fetched_in.append(threading.current_thread() is threading.main_thread())
    release.wait(timeout=60)
    return real(self)
  monkeypatch.setattr(ckpt_lib.PendingChecksums, "result", held_result)
  d = str(tmp_path / "c")
  ckpt = ckpt_lib.Checkpointer(d)
  state = make_state(1)
  ckpt.save(1, state, {"step": 1, "param_shapes": ckpt_lib.param_shapes(state.params)})
  assert ckpt.manager.is_saving_in_progress()  # save returned with the checksums pending.
  release.set()
  ckpt.wait()
  assert fetched_in == [False]
  meta = json.load(open(os.path.join(d, "1", "meta", "metadata")))
  assert meta["checksums"] == ckpt_lib.state_checksums(state)[0]
  ckpt.close()


KILLED_MID_SAVE = """
import os, signal, sys
import jax.numpy as jnp
from difflax import checkpoint as ckpt_lib, state as state_lib
def make(step):
  params = {"w": jnp.arange(1 << 23, dtype=jnp.float32) * step}
  return state_lib.TrainState(step=jnp.int32(step), params=params, ema_params=params,
                              opt_state=())
ckpt = ckpt_lib.Checkpointer(sys.argv[1])
for step in (1, 2):
  ckpt.save(step, make(step), {"step": step, "param_shapes": {"w": [1 << 23]}})
  if step == 1:
    ckpt.wait()
print("in flight:", ckpt.manager.is_saving_in_progress(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_during_async_save_resumes_from_the_last_complete_checkpoint(tmp_path):
  """SIGKILL while step 2's 64 MB are being written in the background: step 2 never becomes a
  checkpoint, and step 1 restores bit-identically."""
  import subprocess
  import sys
  d = str(tmp_path / "checkpoints")
  proc = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, d], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == -9 and "in flight: True" in proc.stdout, proc.stderr[-2000:]
  ckpt = ckpt_lib.Checkpointer(d)
  assert ckpt.latest_step() == 1
  like = {"w": jax.ShapeDtypeStruct((1 << 23,), jnp.float32)}
  state, meta = ckpt.restore(state_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=like, ema_params=like, opt_state=()))
  assert meta["step"] == 1 and int(state.step) == 1
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.arange(1 << 23, dtype=np.float32))
  ckpt.save(2, state, {"step": 2, "param_shapes": {"w": [1 << 23]}})  # The run goes on.
  ckpt.close()
  assert ckpt_lib.Checkpointer(d).latest_step() == 2
