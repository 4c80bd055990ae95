"""Meshes, sharding rules and multi-host helpers.

Contract: `make_mesh(config.mesh)` builds a 2-D `Mesh` with axes ("data", "fsdp"). Batches are
sharded over both axes (`batch_sharding`); parameters, EMA parameters and optimizer state are
replicated, or with `fsdp > 1` sharded along their largest dimension divisible by the fsdp size
when they are at least `fsdp_min_size` elements and their path does not match `FSDP_EXCLUDE`
(norms, biases, label embeddings, the importance sampler's history: small and read whole by every
device) (`state_shardings`).
Host-local numpy batches become global arrays with `host_to_global`; `map_batches` runs a
function (feature networks) over a host array in mesh-sharded batches and gathers the result on
every process. Multi-process helpers: `resolve_distributed` / `maybe_initialize_distributed` (whether and how
to call `jax.distributed.initialize`: explicit settings or a cluster environment JAX detects),
`preemption_service`, `any_process` (a stop flag agreed across processes),
`from_process_0` (host-side decisions broadcast), `tree_from_process_0` / `json_from_process_0`
(arrays / metadata only process 0 computed or read), `barrier` (coordination-service barrier).
Nothing here depends on the model: the same rules serve 1 CPU, 8 fake devices, a GPU host or a
TPU pod.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import types
from typing import Any, Optional

import jax
import numpy as np
from jax._src import clusters as jax_clusters  # JAX's cluster environments (no public name).
from jax._src import distributed as jax_distributed
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from orbax.checkpoint import multihost as ocp_multihost

from difflax import trees

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)
FSDP_EXCLUDE = r"norm|bias|label_emb|resampler"


def cluster_environment() -> Optional[tuple[str, int]]:
  """(name, process count) of the first of JAX's own cluster environments present here (the
  ones `jax.distributed.initialize()` detects: GCE TPU VM slices through the metadata server,
  GKE TPU, SLURM, Open MPI, Kubernetes; opt-in ones such as mpi4py left out), or None."""
  for env in jax_clusters.ClusterEnv._cluster_types:
    if env.opt_in_only_method:
      continue
    try:
      if env.is_env_present():
        return env.__name__, int(env.get_process_count())
    except Exception as e:  # A half-configured environment: not this one.
      logging.debug("Cluster environment %s: %s", env.__name__, e)
  return None


def resolve_distributed(mode: str = "auto", coordinator_address: str = "",
                        num_processes: int = 0, process_id: int = -1,
                        environ=os.environ) -> Optional[dict]:
  """The keyword arguments for `jax.distributed.initialize`, or None when it must not be called.

  "off": None. Explicit settings (`coordinator_address` "host:port" of process 0,
  `num_processes`, `process_id`, as `launch/local.sh` and `launch/slurm.sbatch` pass them) or
  JAX_COORDINATOR_ADDRESS: those. "auto" otherwise: a cluster environment JAX knows
  (`cluster_environment`) with more than one process, never a single machine; "on": always
  (JAX detects the rest). The result names the environment under "cluster" (not an argument).
  """
  if mode == "off":
    return None
  explicit = {k: v for k, v, given in (
      ("coordinator_address", coordinator_address, bool(coordinator_address)),
      ("num_processes", num_processes, num_processes > 0),
      ("process_id", process_id, process_id >= 0)) if given}
  if explicit or environ.get("JAX_COORDINATOR_ADDRESS"):
    return {**explicit, "cluster": "explicit settings"}
  found = cluster_environment()
  if found and found[1] > 1:
    return {"cluster": f"{found[0]} ({found[1]} processes)"}
  return {"cluster": "forced (--distributed=on)"} if mode == "on" else None


def maybe_initialize_distributed(mode: str = "auto", coordinator_address: str = "",
                                  num_processes: int = 0, process_id: int = -1) -> None:
  """Calls `jax.distributed.initialize` when `resolve_distributed` says so, before devices are
  touched; CPU processes talk through gloo collectives (what the 127.0.0.1 test bed uses)."""
  args = resolve_distributed(mode, coordinator_address, num_processes, process_id)
  if args is None:
    return
  cluster = args.pop("cluster")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**args)
  logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", cluster,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def preemption_service() -> bool:
  """True when JAX's preemption service runs (a multi-process job): its SIGTERM notifier and
  the coordination service agree on a stop step without a device collective."""
  return (jax.process_count() > 1 and
          getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Mesh of shape (data, fsdp); data=-1 takes every device not used by fsdp."""
  devices = list(jax.devices() if devices is None else devices)
  n, fsdp = len(devices), int(mesh_config.fsdp)
  data = n // fsdp if int(mesh_config.data) == -1 else int(mesh_config.data)
  if fsdp < 1 or data * fsdp != n:
    raise ValueError(f"config.mesh data={mesh_config.data} x fsdp={mesh_config.fsdp} does not "
                     f"cover the {n} available devices; use data=-1 to take the rest.")
  try:
    grid = mesh_utils.create_device_mesh((data, fsdp), devices)
  except Exception:  # Non-TPU topologies without a physical layout.
    grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def partition_spec(path: str, shape, fsdp_size: int, min_size: int,
                   exclude: str = FSDP_EXCLUDE) -> P:
  """FSDP rule for one leaf: shard its largest dim divisible by the fsdp axis, else replicate."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size or re.search(exclude, path):
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, mesh_config) -> Any:
  """NamedShardings for every leaf of a (abstract) state pytree, by the path rule above."""
  fsdp = mesh.shape["fsdp"]

  def rule(path, leaf):
    shape = getattr(leaf, "shape", ())
    min_size = int(mesh_config.fsdp_min_size) if fsdp > 1 else 0  # (only kept with fsdp > 1)
    return NamedSharding(mesh, partition_spec(trees.path_str(path), shape, fsdp, min_size))
  return jax.tree_util.tree_map_with_path(rule, abstract_state)


def host_to_global(batch: dict, mesh: Mesh) -> dict:
  """Assembles this process's numpy batch slices into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def to_host(x: Any) -> Any:
  """Fully replicated numpy copy of a (possibly multi-host sharded) pytree."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(x, tiled=True)
  return jax.device_get(x)


def local_mesh() -> Mesh:
  """This process's devices as a ("data", "fsdp") mesh of data parallelism only."""
  return make_mesh(types.SimpleNamespace(data=-1, fsdp=1), jax.local_devices())


def place(tree: Any, sharding: NamedSharding) -> Any:
  """Host arrays (the same on every process) -> global arrays with `sharding`, which may span
  processes (each process supplies its own devices' slices)."""
  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
  return jax.tree_util.tree_map(put, tree)


@functools.lru_cache(maxsize=None)
def _sharded(fn, mesh: Mesh):
  return jax.jit(fn, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                 out_shardings=batch_sharding(mesh))


def map_batches(fn, params: Any, x: np.ndarray, mesh: Mesh | None = None,
                batch_size: int = 256) -> np.ndarray:
  """`fn(params, x_batch) -> y_batch` over x: [N, ...] in global batches sharded over the mesh's
  batch axes (every device, every process, computes its slice); returns y: [N, ...] as numpy on
  every process. `x` must be the same on every process; `fn` a stable (e.g. module-level or
  cached) pure function, so its jit is reused. The default mesh is this process's devices."""
  mesh = mesh if mesh is not None else local_mesh()
  if not len(x):
    raise ValueError("map_batches needs at least one example.")
  n = mesh.devices.size
  b = max(n, batch_size // n * n)
  jitted = _sharded(fn, mesh)
  params = place(params, replicated(mesh))
  out = []
  for lo in range(0, len(x), b):
    chunk = np.asarray(x[lo:lo + b])
    real = len(chunk)
    padded = -(-real // n) * n  # The last batch: padded to the device count only (one more
    if padded > real:           # compile at most), the padding dropped below.
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], padded - real, axis=0)])
    y = jitted(params, place(chunk, batch_sharding(mesh)))
    out.append(np.asarray(to_host(y))[:real])
  return np.concatenate(out)


def any_process(flag: bool, after: Any = None) -> bool:
  """True on every process when `flag` is true on any (a SIGTERM that reached one host): all of
  them then stop at, and checkpoint, the same step instead of one entering a collective alone.

  `after` (e.g. the step's outputs) is waited for first: XLA:CPU runs computations on a thread
  pool, and two processes starting the step's gloo collective and this one in different orders
  would wait on each other forever.
  """
  if jax.process_count() == 1:
    return bool(flag)
  jax.block_until_ready(after)
  return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))


def from_process_0(value: bool) -> bool:
  """Process 0's value of a host-side decision, on every process (for decisions read from
  files or clocks that processes could see differently)."""
  if jax.process_count() == 1:
    return bool(value)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(value))))


def tree_from_process_0(tree: Any) -> Any:
  """Process 0's host arrays (`tree`: numpy leaves; other processes pass any tree of the same
  shapes and dtypes), on every process: one copy of something only process 0 computed or
  read (a network trained once per job, not once per host)."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def json_from_process_0(obj: Any) -> Any:
  """Process 0's JSON-able `obj` (e.g. a metadata dict), on every process."""
  if jax.process_count() == 1:
    return obj
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if jax.process_index() == 0 else None
  n = int(multihost_utils.broadcast_one_to_all(np.int32(0 if data is None else data.size)))
  data = tree_from_process_0(data if data is not None else np.zeros(n, np.uint8))
  return json.loads(bytes(data).decode())


def barrier(name: str, timeout_secs: int = 3600) -> None:
  """Every process waits here, through the coordination service rather than a device
  collective: a host still compiling (minutes for a large model) cannot make another host's
  first gloo / NCCL collective time out. `name` must be unique per call site and step."""
  if jax.process_count() > 1:
    ocp_multihost.sync_global_processes(name, timeout=timeout_secs,
                                        processes=set(range(jax.process_count())))
