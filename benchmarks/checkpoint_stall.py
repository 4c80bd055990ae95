"""How long a checkpoint stops the train loop: synchronous vs asynchronous orbax saves of the same
state, side by side (default: the reference UNet's train state, params + EMA + Adam).

  .venv/bin/python benchmarks/checkpoint_stall.py [--saves 3 --steps-after 4 --dir /tmp/x]

For each mode, --saves times: one train step, `Checkpointer.save` (timed: how long the loop is
blocked by the call), then --steps-after more steps (timed: the background write competes with
them for the host), then the wait for the write to finish. Prints the medians and the ratio
async / sync of the blocked time and of save + following steps, and the integrity checksums'
cost: `checksums_secs` (`checkpoint.state_checksums` of the state alone, computed and fetched)
and `checksums_dispatch_secs` (`checkpoint.dispatch_checksums`: what `save` waits for; the
fetch happens in orbax's background commit). `--dir` should be the file system (or bucket) a
run would write to.
"""
import json
import os
import shutil
import tempfile
import time

import _common


def main():
  p = _common.parser(__doc__)
  p.add_argument("--saves", type=int, default=3)
  p.add_argument("--steps-after", type=int, default=4)
  p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
  args = p.parse_args()
  import jax
  from difflax import checkpoint as ckpt_lib
  from difflax import experiment
  s, state, jitted, batch = _common.train_step_setup(args)
  step = jitted.lower(state, batch).compile()
  box = {"state": state}

  def train_steps(n):
    for _ in range(n):
      box["state"], m = step(box["state"], batch)
    jax.block_until_ready(m["loss"])

  train_steps(args.warmup)
  base = _common.median(_common.time_calls(lambda: train_steps(1), 0, args.steps))
  meta = {"param_shapes": ckpt_lib.param_shapes(state.params)}
  ckpt_lib.state_checksums(box["state"])  # (Compiles the checksum programs.)
  checksum_secs = _common.median(_common.time_calls(
      lambda: ckpt_lib.state_checksums(box["state"]), 0, max(args.saves, 3)))
  dispatch = []
  for _ in range(max(args.saves, 3)):
    t0 = time.perf_counter()
    pending = ckpt_lib.dispatch_checksums(box["state"])
    dispatch.append(time.perf_counter() - t0)
    pending.result()
  root = args.dir or tempfile.mkdtemp(prefix="difflax_ckpt_stall_")
  out = {}
  for mode in ("sync", "async"):
    directory = os.path.join(root, mode)
    ckpt = ckpt_lib.Checkpointer(directory, keep=2, async_save=mode == "async")
    blocked, with_steps, waits = [], [], []
    for i in range(args.saves + 1):  # The first save of each mode warms orbax up (untimed).
      train_steps(1)
      t0 = time.perf_counter()
      ckpt.save(i + 1, box["state"], {**meta, "step": i + 1})
      t1 = time.perf_counter()
      train_steps(args.steps_after)
      t2 = time.perf_counter()
      ckpt.wait()
      if i:
        blocked.append(t1 - t0)
        with_steps.append(t2 - t0)
        waits.append(time.perf_counter() - t2)
    ckpt.close()
    out[mode] = {"save_blocks_secs": _common.median(blocked),
                 "save_and_steps_secs": _common.median(with_steps),
                 "wait_after_steps_secs": _common.median(waits)}
    shutil.rmtree(directory, ignore_errors=True)
  if not args.dir:
    shutil.rmtree(root, ignore_errors=True)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(box["state"]))
  print(json.dumps({
      "benchmark": "checkpoint_stall", "backend": jax.default_backend(),
      "devices": jax.device_count(), "params": experiment.num_params(state.params),
      "state_mib": state_bytes / 2 ** 20, "step_seconds_median": base,
      "steps_after_save": args.steps_after, "state_leaves": len(jax.tree_util.tree_leaves(
          box["state"])), "checksums_secs": checksum_secs,
      "checksums_dispatch_secs": _common.median(dispatch), **out,
      "blocked_ratio_async_over_sync":
          out["async"]["save_blocks_secs"] / out["sync"]["save_blocks_secs"],
      "save_and_steps_ratio_async_over_sync":
          out["async"]["save_and_steps_secs"] / out["sync"]["save_and_steps_secs"]}))


if __name__ == "__main__":
  main()
