"""difflax: diffusion models in JAX/Flax on device meshes.

The pure core (`schedules`, `diffusion`, `losses`, `samplers`) imports only jax/numpy/flax; the
training stack (`train`, `data`, `checkpoint`, `parallel`) is imported on demand.
"""
from difflax import xla_flags as _xla_flags

__version__ = "0.1.0"

_xla_flags.apply()  # Before any backend starts: see xla_flags.py (XLA:CPU convolutions).
