"""Where a 3x3 convolution's training time goes on this backend: forward, input gradient and
weight gradient timed apart, each as GFLOP/s, beside the best fp32 matmul and the weight
gradient's own contraction done as one plain matmul ([C, B*H*W] @ [B*H*W, O]).

  .venv/bin/python benchmarks/conv_breakdown.py [--resolution 32 --batch-size 32 --channels 128]

The UNet's train step is ~90 % 3x3 convolutions, a third of their FLOPs in each of the three
parts, so a part that runs far below the others sets the step's MFU. Prints one JSON object;
`--xla-flags` tries XLA:CPU options (e.g. the oneDNN / XNNPACK / YNNPACK routes) in this run.
"""
import json
import os
import sys

import _common


def main():
  p = _common.parser(__doc__)
  p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before JAX starts")
  args = p.parse_args()
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  import difflax  # noqa: F401  (difflax's XLA:CPU defaults, as every difflax run gets them)
  import jax
  import jax.numpy as jnp
  b, r = args.batch_size, args.resolution
  c = int(args.channels.split(",")[0])
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x = jax.random.normal(jax.random.key(0), (b, r, r, c))
  w = jax.random.normal(jax.random.key(1), (3, 3, c, c)) / (3 * c ** 0.5)
  dy = jax.random.normal(jax.random.key(2), (b, r, r, c))
  parts = {
      "forward": (jax.jit(conv), (x, w)),
      "input_grad": (jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[0]), (x, w, dy)),
      "weight_grad": (jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[1]), (x, w, dy)),
  }
  conv_flops = 2 * b * r * r * c * c * 9
  out = {}
  for name, (fn, fn_args) in parts.items():
    s = _common.median(_common.time_calls(lambda: jax.block_until_ready(fn(*fn_args)),
                                          args.warmup, args.steps))
    out[name] = {"ms": s * 1e3, "gflops": conv_flops / s / 1e9}
  # The weight gradient's contraction (K = B*H*W, per kernel tap) as one matmul of that shape.
  a2, d2 = x.reshape(-1, c), dy.reshape(-1, c)
  mm = jax.jit(lambda a, d: a.T @ d)
  s = _common.median(_common.time_calls(lambda: jax.block_until_ready(mm(a2, d2)),
                                        args.warmup, args.steps))
  peak = _common.matmul_peak_flops()
  print(json.dumps({
      "benchmark": "conv_breakdown", "backend": jax.default_backend(),
      "shape": [b, r, r, c], "xla_flags": os.environ.get("XLA_FLAGS", ""), "gflop_per_conv": conv_flops / 1e9,
      **out, "weight_grad_as_matmul_gflops": 2 * a2.shape[0] * c * c / s / 1e9,
      "matmul_peak_gflops": peak / 1e9}))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
