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

`libtpu_defaults(environ, has_tpu, has_libtpu)`: where libtpu is installed (the `[tpu]` extra,
which `--mode=plan` compiles with) but the machine has no TPU, JAX's TPU plugin would ask the
cloud metadata server for a TPU worker list at start-up and print a screen of warnings before
falling back to the CPU; saying there is one local worker (`TPU_WORKER_HOSTNAMES=localhost`)
keeps it quiet. Machines with TPU devices, and a value the user set, are left alone.
"""
from __future__ import annotations

import glob
import importlib.util
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


def libtpu_defaults(environ: Mapping[str, str], has_tpu: bool, has_libtpu: bool) -> dict:
  """Environment variables to set so libtpu stays quiet off a TPU machine (see above)."""
  if has_libtpu and not has_tpu and "TPU_WORKER_HOSTNAMES" not in environ:
    return {"TPU_WORKER_HOSTNAMES": "localhost"}
  return {}


def apply() -> None:
  flags = cpu_defaults(os.environ)
  if flags is not None:
    os.environ["XLA_FLAGS"] = flags
  has_tpu = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
  os.environ.update(libtpu_defaults(os.environ, has_tpu,
                                    importlib.util.find_spec("libtpu") is not None))
