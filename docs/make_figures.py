"""Regenerates the figures in docs/images/ that need no training (seconds on a CPU):

  python docs/make_figures.py [--out docs/images]

  noise_schedules.png   Chen's gamma(t) families and the log-SNR with input scaling b
                        (paper 003 Figs. 3 and 5; `difflax.plots`)
  embedded_plain.png    the embedded dataset's two styles, 32x32, one row per class
  embedded_textured.png

Figures that need a trained model come from the runs themselves (copied here as they are):
  main_job_pipeline.png  the main command's `runs/cascade/pipeline/*/final.png`
  s_sweep.png            `--mode=sweep` on that workdir: `runs/cascade/sweep/sweep.png`
  growth_vs_static.png   `python benchmarks/growth_convergence.py --out=growth_vs_static.png`
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from difflax import embedded  # noqa: E402
from difflax import fileio  # noqa: E402
from difflax import images  # noqa: E402
from difflax import plots  # noqa: E402

SCHEDULES = ("linear", "cosine", "cosine:start=0.2,end=1,tau=1", "sigmoid:start=-3,end=3,tau=1",
             "sigmoid:start=0,end=3,tau=0.7")


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "images"))
  args = p.parse_args()
  curves = {spec: plots.schedule_curves(spec) for spec in SCHEDULES}
  curves["cosine, b=0.5"] = plots.schedule_curves("cosine", input_scale=0.5)
  written = [plots.plot_schedules(curves, os.path.join(args.out, "noise_schedules.png"))]
  for style in embedded.STYLES:
    x, labels = embedded.embedded_dataset(80, 32, style=style)
    grid = images.make_grid(x[labels.argsort(kind="stable")], ncol=8)
    written.append(fileio.save_png(os.path.join(args.out, f"embedded_{style}.png"), grid))
  print("\n".join(written))


if __name__ == "__main__":
  main()
