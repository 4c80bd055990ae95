"""Plots of continuous-time noise schedules: gamma(t) and log-SNR (Chen, paper 003, Figs. 3 and 5).

Contract: `schedule_curves(spec, input_scale=1.0, num=201)` returns (t, gamma, logsnr) as numpy
arrays, where the log-SNR includes input scaling: log(b^2 gamma / (1 - gamma)) (Sec. 2.2 shows
scaling by b shifts the log-SNR by 2 log b). `plot_schedules(curves, path)` writes a two-panel PNG
(needs matplotlib: `pip install difflax[plots]`).

  python -m difflax.plots --config=chen_schedules:scale=0.5 \
      --gamma=cosine --gamma=sigmoid:start=0,end=3,tau=0.7 --out=gammas.png
"""
from __future__ import annotations

import numpy as np

from difflax import config as config_lib
from difflax import fileio
from difflax import images
from difflax import schedules


def schedule_curves(spec: str, input_scale: float = 1.0, num: int = 201):
  """(t: [num], gamma: [num], logsnr: [num]) of a gamma spec with input scale b."""
  t = np.linspace(0.0, 1.0, num)
  gamma = np.asarray(schedules.parse_gamma(spec)(t), np.float64)
  logsnr = np.log(input_scale ** 2 * gamma) - np.log1p(-np.minimum(gamma, 1 - 1e-12))
  return t, gamma, logsnr


def plot_schedules(curves: dict, path: str) -> str:
  """curves: {label: (t, gamma, logsnr)} -> PNG with gamma(t) and log-SNR(t) side by side."""
  fig = images.figure(figsize=(10, 4))
  if fig is None:
    raise ImportError("Plotting needs matplotlib: pip install 'difflax[plots]'.")
  ax_g, ax_s = fig.subplots(1, 2)
  for label, (t, gamma, logsnr) in curves.items():
    ax_g.plot(t, gamma, label=label)
    ax_s.plot(t, np.clip(logsnr, -20, 20), label=label)
  ax_g.set(xlabel="t", ylabel="gamma(t)", title="signal fraction gamma(t)")
  ax_s.set(xlabel="t", ylabel="log SNR", title="log SNR = log(b^2 gamma / (1 - gamma))")
  ax_g.legend(fontsize=7)
  fig.tight_layout()
  return fileio.save_figure(path, fig, dpi=100)


def main(argv):
  from absl import flags
  del argv
  f = flags.FLAGS
  curves = {}
  for spec in f.gamma:
    curves[spec] = schedule_curves(spec)
  for spec in f.config:
    d = config_lib.load(spec).diffusion
    curves[f"{d.gamma} b={d.input_scale:g}"] = schedule_curves(d.gamma, d.input_scale)
  if not curves:
    raise SystemExit("Give at least one --gamma=SPEC or --config=NAME_OR_FILE[:arg].")
  print(plot_schedules(curves, f.out))


if __name__ == "__main__":
  from absl import app
  from absl import flags
  flags.DEFINE_multi_string("gamma", [], "gamma spec, e.g. sigmoid:start=0,end=3,tau=0.7")
  flags.DEFINE_multi_string("config", [], "continuous-time config (name or file)[:arg]")
  flags.DEFINE_string("out", "gamma_schedules.png", "output PNG")
  app.run(main)
