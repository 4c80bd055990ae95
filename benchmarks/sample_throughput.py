"""Sampling throughput (DDIM, eta 0) of difflax's UNet, default the reference architecture.
Prints one JSON object on the last line.

  .venv/bin/python benchmarks/sample_throughput.py [--sample-steps 50 --batch-size 32 ...]

Times whole `samplers.sample` calls (one jitted `lax.scan` over the respaced chain) and reports
images/s, milliseconds per network forward, FLOPs per forward from XLA's cost analysis, MFU
against a measured fp32 matmul peak, compile seconds (cold / persistent cache) and peak RSS.
"""
import json
import os

import _common


def main():
  p = _common.parser(__doc__)
  p.add_argument("--sample-steps", type=int, default=50)
  p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
  args = p.parse_args()
  args.steps = min(args.steps, 3)  # Each timed call is a whole chain.
  args.warmup = 1
  import jax
  import numpy as np
  from difflax import experiment, sampling
  c = _common.reference_config(args)
  s = experiment.setup(c, "/tmp/difflax_bench_unused")
  state = experiment.init_state(s)
  fn = sampling.make_sample_fn(s, args.sampler, f"ddim{args.sample_steps}")
  labels = jax.device_put(np.zeros((c.data.batch_size,), np.int32), s.batch_sharding)
  key = jax.random.key(0)
  compiled, compile_times = _common.compile_cold_and_cached(
      lambda: fn.lower(state.params, key, labels, None, None), args.cache_dir)
  times = _common.time_calls(
      lambda: compiled(state.params, key, labels, None, None).block_until_ready(), args.warmup,
      args.steps)
  chain_s = _common.median(times)
  flops = _common.cost_flops(compiled)  # XLA counts the scan body once: FLOPs of one forward.
  forward_s = chain_s / args.sample_steps
  peak = _common.matmul_peak_flops()
  print(json.dumps({
      "benchmark": "sample_throughput", "sampler": args.sampler,
      "sample_steps": args.sample_steps, "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "devices": jax.device_count(), "params": experiment.num_params(state.params),
      "batch_size": c.data.batch_size, "dtype": args.dtype,
      "chain_seconds_median": chain_s, "images_per_sec": c.data.batch_size / chain_s,
      "ms_per_forward": 1e3 * forward_s, "flops_per_forward": flops,
      "achieved_gflops": flops / forward_s / 1e9, "matmul_peak_gflops": peak / 1e9,
      "mfu": flops / forward_s / peak, **compile_times, "peak_rss_gib": _common.peak_rss_gib()}))


if __name__ == "__main__":
  main()
