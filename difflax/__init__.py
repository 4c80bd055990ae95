"""difflax: diffusion models in JAX/Flax on device meshes.

The pure core (`schedules`, `diffusion`, `losses`, `samplers`) imports only jax/numpy/flax; the
training stack (`train`, `data`, `checkpoint`, `parallel`) is imported on demand.
"""
__version__ = "0.1.0"
