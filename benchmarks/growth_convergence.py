"""Progressive growth vs a static network for the same wall-clock budget (Pro-DDPM Figure 2, small).

Trains `configs/progressive_cifar10.py` (grows 8 -> 16 -> 32) and its `:static` preset (the same
final UNet from scratch at 32x32) on the embedded dataset, each in chunks of `--chunk` steps
through the ordinary train loop (every chunk resumes from the last checkpoint, so compile and
restore time count against the budget like any real run), until `--budget` seconds of training
are spent. After each chunk, quick FD (the offline feature network; samples at a stage's
resolution are nearest-upsampled to 32x32) is measured outside the budget. Prints JSON
{preset: [{"seconds", "step", "resolution", "quick_fd"}, ...]} and writes a PNG plot.

  python benchmarks/growth_convergence.py --budget=240 --out=growth_convergence.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def load(arg: str):
  from difflax import config as config_lib
  c = config_lib.load(f"progressive_cifar10:{arg}")
  c.unlock()
  return c


def run_preset(arg: str, budget: float, chunk: int, num_samples: int, workdir: str,
               feature_steps: int = 0) -> list:
  import jax
  from absl import logging
  from difflax import experiment, train
  from difflax.evaluation import evaluator as evaluator_lib
  logging.set_verbosity(logging.WARNING)
  c = load(arg)
  c.train.update(preview_every=0, checkpoint_every=chunk, num_steps=10**6)
  # Quality is measured below, outside the budget; the train run's own line would count in it.
  c.eval.update(bpd=False, quality_line=False, num_samples=num_samples,
                reference_examples=min(1000, c.data.num_examples))
  if feature_steps:
    c.eval.feature_steps = feature_steps
  evaluator, rows, spent, step = None, [], 0.0, 0
  while spent < budget:
    c.train.num_steps = step + chunk
    t0 = time.perf_counter()
    step = train.run(c, workdir)["step"]
    spent += time.perf_counter() - t0
    s = experiment.setup(c, workdir)
    state, _ = experiment.restore_or_init(s)
    if evaluator is None or evaluator.exp.growth_state != s.growth_state:
      evaluator = evaluator_lib.Evaluator(s)
    result = evaluator(jax.device_get(state.ema_params), step)
    s.checkpointer.close()
    rows.append({"seconds": round(spent, 1), "step": step, "resolution": s.resolution,
                 "quick_fd": result["quick_fd"]})
    print(json.dumps({arg or "progressive": rows[-1]}), file=sys.stderr, flush=True)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--budget", type=float, default=240.0, help="training seconds per preset")
  p.add_argument("--chunk", type=int, default=100)
  p.add_argument("--num-samples", type=int, default=128)
  p.add_argument("--out", default="growth_convergence.png")
  p.add_argument("--tiny", action="store_true", help="the :tiny presets (a smoke run)")
  p.add_argument("--feature-steps", type=int, default=0,
                 help="quick feature network recipe steps (0 = the config's; smoke runs: 20)")
  args = p.parse_args()
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, arg in (("progressive", ""), ("static", "static")):
      arg = ",".join(a for a in (arg, "tiny" if args.tiny else "") if a)
      results[name] = run_preset(arg, args.budget, args.chunk, args.num_samples,
                                 os.path.join(tmp, name), args.feature_steps)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, rows in results.items():
      ax.plot([r["seconds"] for r in rows], [r["quick_fd"] for r in rows], marker=".",
              label=name)
    ax.set(xlabel="training wall-clock seconds", ylabel="quick FD (32x32)",
           title="Progressive growth vs static")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    results["png"] = args.out
  except ImportError:
    pass
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
