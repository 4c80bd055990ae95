"""XLA flags difflax sets for the CPU before JAX's backend starts (imported by the package).

Contract: `cpu_defaults(environ) -> str | None` is the `XLA_FLAGS` value to use (None: leave the
environment alone); `apply()` sets it in `os.environ`. XLA reads `XLA_FLAGS` once, when the
first backend starts, so this works for anything that imports difflax before touching devices
(the CLI, benchmarks, tests, a notebook that imports difflax first).

The default, for the jaxlib versions it was measured on (`MEASURED_JAXLIB`): XLA:CPU sends
convolutions to YNNPACK fusions, where the kernel gradient of a 3x3 convolution runs at about a
quarter of the input gradient's rate (the compiled graph transposes x and dy into a
whole-image-window convolution). `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`
(the minus removes convolutions from YNNPACK's default list; its dot fusions stay) sends them to
Eigen, whose inner GEMM is oneDNN's: the same train step with the same results, faster
(docs/benchmarks.md). It is left out when the user's `XLA_FLAGS` already sets that flag, when
`JAX_PLATFORMS` names no CPU, or with `DIFFLAX_XLA_DEFAULTS=0`; other jaxlib versions get
nothing (an XLA flag a build does not know aborts the process).
"""
from __future__ import annotations

import os
from importlib import metadata
from typing import Mapping, Optional

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
MEASURED_JAXLIB = ("0.10.",)


def _jaxlib_version() -> str:
  try:
    return metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return ""


def cpu_defaults(environ: Mapping[str, str], jaxlib: Optional[str] = None) -> Optional[str]:
  flags = environ.get("XLA_FLAGS", "")
  platforms = environ.get("JAX_PLATFORMS", "")
  jaxlib = _jaxlib_version() if jaxlib is None else jaxlib
  if (environ.get("DIFFLAX_XLA_DEFAULTS", "1") == "0"
      or "xla_cpu_experimental_ynn_fusion_type" in flags
      or (platforms and "cpu" not in platforms.split(","))
      or not jaxlib.startswith(MEASURED_JAXLIB)):
    return None
  return f"{flags} {FLAG}".strip()


def apply() -> None:
  flags = cpu_defaults(os.environ)
  if flags is not None:
    os.environ["XLA_FLAGS"] = flags
