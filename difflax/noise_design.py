"""`python -m difflax.noise_design --config=configs/X.py[:preset] [--config.ncsn.F=V]`: the NCSNv2
noise design of a config (the pure math is `difflax.noise_scales`; this tool reads the data).

Contract: prints one JSON object: sigma_1, sigma_L, L, the ratio and its coverage, the Langevin
step size and Eq. 4's ratio, and what Techniques 2 and 4 recommend for that range.
"""
from __future__ import annotations

import json

from difflax import cli
from difflax import data as data_lib
from difflax import noise_scales


def main(argv):
  """`python -m difflax.noise_design --config=configs/X.py[:preset] [--config.ncsn.F=V]`: prints the
  noise design of the config: its `ncsn` fields where given, else computed from its training data
  (images in [-1, 1] as in training), plus what Techniques 2 and 4 recommend for that range."""
  del argv
  cfg = cli.load_config()
  design = noise_scales.from_config(cfg, lambda n: data_lib.sample_array(cfg.data, n, cfg.seed))
  sigmas = design["sigmas"]
  n, ns = cfg.ncsn, noise_scales
  out = {"dim": design["dim"], "sigma_first": float(sigmas[0]), "sigma_last": float(sigmas[-1]),
         "num_scales": len(sigmas), "ratio": design["ratio"], "coverage": design["coverage"],
         "steps_per_scale": n.steps_per_scale, "step_size": design["step_size"],
         "eq4_ratio": ns.langevin_ratio(design["step_size"], design["ratio"], sigmas[-1],
                                        n.steps_per_scale),
         "technique2_num_scales": ns.num_noise_scales(design["dim"], sigmas[0], sigmas[-1],
                                                      n.coverage),
         "technique4_step_size": ns.langevin_step_size(design["ratio"], sigmas[-1],
                                                       n.steps_per_scale),
         "sigma_first_from": "config" if n.sigma_first > 0 else "data (Technique 1)"}
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  cli.define_config_flag()
  cli.run(main)
