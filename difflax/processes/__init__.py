"""Generative processes: one object per process, built once by `experiment.setup`.

Contract: `from_config(config, sample_data=None) -> Process` builds the process named by
`config.diffusion.type` (`sample_data(n) -> [n, H, W, C]` training images, read only by a
process that derives constants from the data: NCSN's Technique 1); `validate(config)` runs that
process's config checks (ValueError saying what to set); `get(name)` is its class, whose
capabilities (`has_bpd`, `truncatable`, `growable`, ...) other modules read instead of comparing
process names (see `base.Process`). Only this package looks at `config.diffusion.type`; a new
process is one module here and one line in `PROCESSES`.
"""
from __future__ import annotations

from difflax.processes.base import Process
from difflax.processes.continuous import ContinuousProcess
from difflax.processes.discrete import DiscreteProcess
from difflax.processes.flow import FlowProcess
from difflax.processes.ncsn import NCSNProcess

PROCESSES = {
    "discrete": DiscreteProcess,      # DDPM / improved DDPM (papers: Ho 2020, Nichol 2021)
    "continuous": ContinuousProcess,  # Chen's gamma(t) chain (paper 003)
    "ncsn": NCSNProcess,              # NCSNv2 score model (paper 004)
    "flow": FlowProcess,              # rectified-flow matching (Esser et al. 2024)
}


# config.OPTIONAL's rows for the processes: (keys, when they are used, is that the case).
OPTIONAL = tuple((cls.config_keys, f"diffusion.type={name!r}",
                  lambda c, cls=cls: PROCESSES.get(c.diffusion.type) is cls)
                 for name, cls in PROCESSES.items() if cls.config_keys)


def get(name: str) -> type[Process]:
  if name not in PROCESSES:
    raise ValueError(f"config.diffusion.type={name!r}; valid: {', '.join(PROCESSES)}.")
  return PROCESSES[name]


def validate(config) -> None:
  get(config.diffusion.type).validate(config)


def from_config(config, sample_data=None) -> Process:
  return get(config.diffusion.type)(config, sample_data)
