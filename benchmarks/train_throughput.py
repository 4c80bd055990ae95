"""Train-step throughput of difflax's UNet (default: the reference architecture of
../shared/bench/README.md). Prints one JSON object on the last line.

  .venv/bin/python benchmarks/train_throughput.py [--resolution 32 --batch-size 32 ...]

Reports images/s (median of --steps steps after warm-up), model FLOPs per step from XLA's cost
analysis, MFU against a measured fp32 matmul peak, compile seconds (cold / persistent cache),
peak RSS and parameter count.
"""
import json
import time

import _common


def main():
  args = _common.parser(__doc__).parse_args()
  import jax
  import numpy as np
  from difflax import train
  c = _common.reference_config(args)
  s = train.setup(c, "/tmp/difflax_bench_unused")
  state = jax.jit(s.init_fn, out_shardings=s.shardings)(s.keys["init"])
  from difflax import step as step_lib, parallel
  fn = step_lib.make_train_step(s.model, s.diffusion, s.optimizer, s.lr_schedule, c,
                                s.keys["step"])
  rng = np.random.default_rng(0)
  batch = parallel.host_to_global({
      "image": rng.uniform(-1, 1, (c.data.batch_size, c.data.resolution, c.data.resolution, 3)
                           ).astype(np.float32),
      "label": np.zeros((c.data.batch_size,), np.int32)}, s.mesh)
  bsh = {"image": s.batch_sharding, "label": s.batch_sharding}
  jitted = jax.jit(fn, in_shardings=(s.shardings, bsh),
                   out_shardings=(s.shardings, parallel.replicated(s.mesh)), donate_argnums=0)
  compiled, compile_times = _common.compile_cold_and_cached(
      lambda: jitted.lower(state, batch), args.cache_dir)
  box = {"state": state}

  def one():
    box["state"], m = compiled(box["state"], batch)
    jax.block_until_ready(m["loss"])
  times = _common.time_calls(one, args.warmup, args.steps)
  step_s = _common.median(times)
  flops = _common.cost_flops(compiled)
  peak = _common.matmul_peak_flops()
  print(json.dumps({
      "benchmark": "train_throughput", "backend": jax.default_backend(),
      "devices": jax.device_count(), "params": train.num_params(state.params),
      "resolution": c.data.resolution, "batch_size": c.data.batch_size, "dtype": args.dtype,
      "step_seconds_median": step_s, "images_per_sec": c.data.batch_size / step_s,
      "flops_per_step": flops, "achieved_gflops": flops / step_s / 1e9,
      "matmul_peak_gflops": peak / 1e9, "mfu": flops / step_s / peak,
      **compile_times,
      "peak_rss_gib": _common.peak_rss_gib(), "steps_timed": len(times)}))


if __name__ == "__main__":
  main()
