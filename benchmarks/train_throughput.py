"""Train-step throughput of difflax's UNet (default: the reference architecture of
the team's diffusers peer benchmark, kept outside this repository). Prints one JSON object on
the last line.

  .venv/bin/python benchmarks/train_throughput.py [--resolution 32 --batch-size 32 ...]

Reports images/s (median of --steps steps after warm-up), model FLOPs per step from XLA's cost
analysis, MFU against a measured fp32 matmul peak, compile seconds (cold / persistent cache),
peak RSS and parameter count.
"""
import json
import os

import _common


def main():
  args = _common.parser(__doc__).parse_args()
  import jax
  from difflax import experiment
  s, state, jitted, batch = _common.train_step_setup(args)
  c = s.config
  compiled, compile_times = _common.compile_cold_and_cached(
      lambda: jitted.lower(state, batch), args.cache_dir)
  times = _common.time_train_step(compiled, state, batch, args.warmup, args.steps)
  step_s = _common.median(times)
  flops = _common.cost_flops(compiled)
  peak = _common.matmul_peak_flops()
  print(json.dumps({
      "benchmark": "train_throughput", "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "devices": jax.device_count(), "params": experiment.num_params(state.params),
      "resolution": c.data.resolution, "batch_size": c.data.batch_size, "dtype": args.dtype,
      "step_seconds_median": step_s, "images_per_sec": c.data.batch_size / step_s,
      "flops_per_step": flops, "achieved_gflops": flops / step_s / 1e9,
      "matmul_peak_gflops": peak / 1e9, "mfu": flops / step_s / peak,
      **compile_times,
      "peak_rss_gib": _common.peak_rss_gib(), "steps_timed": len(times)}))


if __name__ == "__main__":
  main()
