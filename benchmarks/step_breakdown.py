"""Where the train step's time goes: ablates non-convolution parts of the UNet and times the step.

  .venv/bin/python benchmarks/step_breakdown.py [--resolution 32 --batch-size 32 ...]

Each variant replaces one component by the identity (GroupNorm; self-attention; both) and times
the same jitted train step; the time a component costs is full minus ablated. Prints one JSON
object. This is a measurement aid, not a model: ablated variants are not trainable networks.
"""
import json

import _common


def step_seconds(args):
  _, state, step, batch = _common.train_step_setup(args)
  return _common.median(_common.time_train_step(step, state, batch, args.warmup, args.steps))


def main():
  args = _common.parser(__doc__).parse_args()
  import flax.linen as nn
  from difflax.models import layers

  class Identity(nn.Module):
    @nn.compact
    def __call__(self, x, *a, **k):
      return x

  real_norm, real_attn = layers.group_norm, layers.AttentionBlock.__call__
  results = {"full": step_seconds(args)}
  layers.group_norm = lambda *a, **k: Identity()
  results["no_groupnorm"] = step_seconds(args)
  layers.group_norm = real_norm
  layers.AttentionBlock.__call__ = lambda self, x: x
  results["no_attention"] = step_seconds(args)
  layers.group_norm = lambda *a, **k: Identity()
  results["no_groupnorm_no_attention"] = step_seconds(args)
  layers.group_norm, layers.AttentionBlock.__call__ = real_norm, real_attn
  full = results["full"]
  print(json.dumps({"benchmark": "step_breakdown", "step_seconds": results,
                    "groupnorm_fraction": 1 - results["no_groupnorm"] / full,
                    "attention_fraction": 1 - results["no_attention"] / full,
                    "non_conv_fraction_upper": 1 - results["no_groupnorm_no_attention"] / full}))


if __name__ == "__main__":
  main()
