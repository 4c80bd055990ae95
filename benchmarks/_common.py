"""Shared pieces of the benchmark scripts: the reference UNet config, matmul peak, RSS, timing.

The reference architecture is the one the team's PyTorch diffusers peer benchmark measures:
32x32x3, ch 64, mult (1, 2, 2), 2 res blocks (3 on the way up), one-head attention at
16x16 and in the middle block, GroupNorm 32, batch 32, fp32, T=1000 linear betas, eps-MSE, Adam.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--resolution", type=int, default=32)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--channels", default="64,128,128", help="channels per level (ch * mult)")
  p.add_argument("--num-res-blocks", type=int, default=2)
  p.add_argument("--attn", default="16", help="attention resolutions (the middle always has one)")
  p.add_argument("--patch-size", type=int, default=1, help="model.patch_size (space-to-depth)")
  p.add_argument("--groups", type=int, default=32, help="GroupNorm groups")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--cache-dir", default=os.path.join(REPO, ".bench_jax_cache"))
  return p


def reference_config(args):
  from difflax import config as config_lib
  chans = [int(c) for c in args.channels.split(",")]
  c = config_lib.base_config()
  c.data.update(resolution=args.resolution, batch_size=args.batch_size)
  c.model.update(ch=chans[0], ch_mult=tuple(x // chans[0] for x in chans),
                 num_res_blocks=args.num_res_blocks,
                 attn_resolutions=tuple(int(a) for a in args.attn.split(",") if a),
                 num_heads=1, num_groups=args.groups, patch_size=args.patch_size,
                 dtype=args.dtype)
  c.diffusion.update(schedule="linear", num_timesteps=1000)
  c.optim.update(lr=2e-4, warmup_steps=1, grad_clip=0.0)
  c.mesh.update(data=-1, fsdp=1)
  return c


def train_step_setup(args):
  """(experiment, state, jitted sharded train step with donated state, a random batch) for the
  reference config: the same step `difflax.train` runs."""
  import numpy as np
  from difflax import experiment, parallel
  c = reference_config(args)
  s = experiment.setup(c, "/tmp/difflax_bench_unused")
  state = experiment.init_state(s)
  r, b = c.data.resolution, c.data.batch_size
  rng = np.random.default_rng(0)
  batch = parallel.host_to_global({
      "image": rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32),
      "label": np.zeros((b,), np.int32)}, s.mesh)
  return s, state, experiment.jit_train_step(s), batch


def time_train_step(step, state, batch, warmup: int, steps: int) -> list[float]:
  """Per-step seconds of `step` (compiled or jitted), threading the donated state through."""
  import jax
  box = {"state": state}

  def one():
    box["state"], m = step(box["state"], batch)
    jax.block_until_ready(m["loss"])
  return time_calls(one, warmup, steps)


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  """Best fp32 FLOP/s of a jitted n x n matmul: the machine's attainable peak for MFU."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def cost_flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def time_calls(fn, warmup: int, steps: int) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def median(xs):
  return statistics.median(xs)


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def compile_cold_and_cached(lower_fn, cache_dir: str) -> tuple[object, dict]:
  """(compiled, timings): trace+lower+compile seconds cold and with the persistent compilation
  cache, and the XLA compile part alone of each (tracing the Python model is not cacheable)."""
  import shutil
  import jax
  shutil.rmtree(cache_dir, ignore_errors=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  out = {}
  for name in ("cold", "cached"):
    jax.clear_caches()
    t0 = time.perf_counter()
    lowered = lower_fn()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out[f"compile_seconds_{name}"] = t2 - t0
    out[f"xla_compile_seconds_{name}"] = t2 - t1
  return compiled, out
