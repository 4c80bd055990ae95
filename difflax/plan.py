"""Ahead-of-time plans: does a config's training fit a TPU slice (or this host), and what does a
step cost there? Answered by compiling, on any machine, without allocating any state.

Contract: `plan(config, workdir, topology="local", mfu=0.4, hbm_gib=0) -> dict` compiles, for
every stage of `config` (each cascade stage; each progressive-growth level, in its fading
architecture where it has one; else the one model), the train step exactly as `train.py` runs it
(`experiment.compile_train_step` on `data.batch_spec`), and the sampler's model call at
`sample.batch_size` (the last architecture), for the devices of `topology`:
  - a TPU topology as JAX names it (`v4:2x2x4`, `v5e:16x16`, `v5p:4x4x4`, `v6e:8x8`), compiled
    by libtpu's compile-only devices (`pip install -e '.[tpu]'`; no TPU needed), or
  - "local": this process's devices (a GPU host compiles for its GPUs, a CPU for its CPUs).
Per device it reports the compiled program's bytes (arguments = params, EMA and optimizer state
as sharded, plus the batch; temporaries; outputs less what aliases the donated state; code),
their total against the device's memory (`CHIPS`, or `hbm_gib` to override), FLOPs per step (of
the compiled program: rematerialisation's recompute included), and a projected step time,
images/s and days to `train.num_steps` at `mfu` of the device's peak. A program that does not fit
gets a search (`_search`): levers compiled one after another until one fits; the verdict names it.
The result goes to `workdir/plan.json`; `format_table(result)` is the table the CLI prints.
Mistakes (an unknown topology, libtpu missing, a batch that does not split over the devices)
raise `PlanError`, one line naming the fix.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp

from difflax import cascade
from difflax import config as config_lib
from difflax import data as data_lib
from difflax import experiment
from difflax import fileio
from difflax import growth
from difflax import models
from difflax import state as state_lib

GiB = 2 ** 30

# Per chip: memory (bytes) and peak dense bf16 FLOP/s, from the vendors' public pages:
# TPU v2 / v3 / v4 / v5e / v5p / v6e: cloud.google.com/tpu/docs/{v2,v3,v4,v5e,v5p,v6e} ("TPU
# chip" tables: HBM per chip, peak compute per chip, bf16); NVIDIA: the A100, H100 and H200
# datasheets (SXM, dense tensor-core BF16, i.e. half the "with sparsity" figure).
# Keyed by `device.device_kind` (a prefix for GPUs).
CHIPS = {
    "TPU v2": (16 * GiB, 45e12),
    "TPU v3": (32 * GiB, 123e12),
    "TPU v4": (32 * GiB, 275e12),
    "TPU v5 lite": (16 * GiB, 197e12),   # v5e
    "TPU v5": (95 * GiB, 459e12),        # v5p
    "TPU v6 lite": (32 * GiB, 918e12),   # v6e (Trillium)
    "NVIDIA A100-SXM4-40GB": (40e9, 312e12),
    "NVIDIA A100-SXM4-80GB": (80e9, 312e12),
    "NVIDIA H100": (80e9, 989e12),
    "NVIDIA H200": (141e9, 989e12),
}
TOPOLOGY_EXAMPLES = "v4:2x2x1, v4:2x2x4, v5e:2x2, v5e:4x4, v5e:16x16, v5p:2x2x1, v6e:4x4"
REMAT_ORDER = ("none", "dots", "full")


class PlanError(config_lib.ConfigError):
  """A plan that cannot be made as asked (topology, libtpu, batch); the message says the fix."""


# ------------------------------------------------------------------------------ target
@dataclasses.dataclass(frozen=True)
class Target:
  """The devices a plan compiles for and what one of them holds and computes."""
  name: str
  devices: tuple
  kind: str
  hbm: float                # Bytes of memory per device.
  peak: Optional[float]     # FLOP/s per device (None: unknown, no time projection).
  per_chip: int = 1         # Devices per chip (the compile-only v2 / v3 / v4 expose cores).
  peak_source: str = "table"


def target(topology: str = "local", hbm_gib: float = 0) -> Target:
  """The devices of `topology` ("local" or a TPU topology name) and their memory and peak."""
  devices = tuple(jax.devices() if topology == "local" else _tpu_devices(topology))
  d, kind = devices[0], devices[0].device_kind
  chips = len({tuple(getattr(x, "coords", (x.id,))) for x in devices})
  per_chip = max(1, len(devices) // chips) if d.platform == "tpu" else 1
  hbm, peak = next((v for k, v in sorted(CHIPS.items(), key=lambda kv: -len(kv[0]))
                    if kind == k or (not k.startswith("TPU") and kind.startswith(k))),
                   (None, None))
  source = "table"
  if hbm is not None:
    hbm, peak = hbm / per_chip, peak / per_chip
  if d.platform == "gpu":
    hbm = (d.memory_stats() or {}).get("bytes_limit", hbm)
  elif d.platform == "cpu":
    # Fake CPU devices share the host: its RAM and its measured matmul rate, split evenly.
    hbm = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / len(devices)
    peak, source = _matmul_peak(d) / len(devices), "measured float32 matmul"
  hbm = hbm_gib * GiB if hbm_gib else hbm
  if hbm is None:
    raise PlanError(f"No memory size known for {kind!r} devices; pass --hbm_gib=GiB_PER_DEVICE.")
  return Target(topology, devices, kind, float(hbm), peak, per_chip, source)


def _tpu_devices(name: str):
  if importlib.util.find_spec("libtpu") is None:
    raise PlanError(f"--topology={name} compiles with libtpu, which is not installed: pip "
                    f"install -e '.[tpu]' (jax[tpu]=={jax.__version__}), or use --topology=local.")
  # Compile-only devices need no TPU and no lock on one: let plans run beside each other (and
  # beside a training process on a TPU VM). Off a TPU VM, `xla_flags` (applied on import) told
  # libtpu there is one local worker, so it does not query the VM metadata.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  try:
    with _native_stderr_silenced():
      return topologies.get_topology_desc(name, "tpu").devices
  except Exception as e:  # jax raises JaxRuntimeError with libtpu's message.
    msg = str(e)
    dims = re.fullmatch(r"[^:]+:(\d+(?:x\d+)*)", name)
    if "chips_per_host_bounds" in msg and dims:  # Smaller than one host (v5e:1x1, v6e:1x1).
      bounds = [int(v) for v in dims.group(1).split("x")]
      try:
        with _native_stderr_silenced():
          return topologies.get_topology_desc(name, "tpu", chips_per_host_bounds=(
              bounds + [1, 1])[:3]).devices
      except Exception as e2:
        msg = str(e2)
    raise PlanError(f"--topology={name} is not a TPU topology libtpu can compile for "
                    f"({msg.splitlines()[0][:160]}); names are GENERATION:SHAPE as JAX spells "
                    f"them, e.g. {TOPOLOGY_EXAMPLES}, or 'local'.") from None


@contextlib.contextmanager
def _native_stderr_silenced():
  """libtpu's C++ start-up writes warnings about the TPU VM it is not on straight to file
  descriptor 2; what matters comes back as the exception's message."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(os.devnull, "w") as null:
    os.dup2(null.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def _matmul_peak(device, n: int = 1024, reps: int = 5) -> float:
  """FLOP/s of a float32 n x n matmul on `device` (best of `reps`)."""
  a, f = jax.device_put(jnp.ones((n, n), jnp.float32), device), jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / min(times)


# ------------------------------------------------------------------------------ programs
def programs(config) -> list[tuple[str, str, Any, Optional[growth.GrowthState]]]:
  """(stage, program, stage config, growth state) of everything `plan` compiles: per cascade
  stage (or the one model) the train step of each growth level (fading where it fades) and the
  sampler's model call of the final architecture. A cascade with `cascade.stage` set plans that
  stage alone, as `--mode=train` trains it alone."""
  if cascade.is_cascade(config):
    stages = [(n, cascade.stage_config(config, n)) for n in cascade.selected_stages(config)]
  else:
    stages = [("model", config)]
  out = []
  for name, c in stages:
    levels = [growth.GrowthState()]
    if growth.enabled(c):
      fades = c.growth.fade_kind != "abrupt"
      levels = [growth.GrowthState(stage=i, fading=fades and i > 0)
                for i in range(len(c.growth.resolutions))]
    for gs in levels:
      out.append((name, "train", c, gs))
    out.append((name, "sample", c, dataclasses.replace(levels[-1], fading=False)))
  return out


def _batch_divides(batch: int, n: int, what: str) -> None:
  if batch % n:
    raise PlanError(f"{what}={batch} does not split over the {n} devices: pick a batch "
                    f"divisible by {n} or a slice whose device count divides {batch}.")


def _compile(c, gs, program: str, tgt: Target, workdir: str):
  """(compiled, global batch, params) of one program of stage config `c`."""
  exp = experiment.setup(c, workdir, gs, devices=tgt.devices)
  n = len(tgt.devices)
  if program == "train":
    _batch_divides(c.data.batch_size, n, "config.data.batch_size")
    micro = c.data.batch_size // c.optim.grad_accum
    _batch_divides(micro, n, f"the micro-batch (data.batch_size / optim.grad_accum="
                   f"{c.optim.grad_accum})")
    compiled = experiment.compile_train_step(exp, data_lib.batch_spec(c.data))
    return compiled, c.data.batch_size, experiment.num_params(exp.abstract_state.params)
  # The sampler's model call (guidance evaluates the conditional and unconditional halves in one
  # call of twice the batch), padded to the device count as `sampling.generate` pads its batches.
  b = c.sample.batch_size * (2 if c.sample.guidance and c.model.class_conditional else 1)
  b = -(-b // n) * n
  inputs = jax.eval_shape(lambda: state_lib.dummy_inputs(c, b, exp.resolution))
  apply = models.make_apply(exp.model, exp.process)
  shard = lambda _: exp.batch_sharding
  fn = jax.jit(lambda params, kw: apply(params, **kw),
               in_shardings=(exp.shardings.params, jax.tree_util.tree_map(shard, inputs)),
               out_shardings=exp.batch_sharding)
  compiled = fn.lower(exp.abstract_state.params, inputs).compile()
  return compiled, b, experiment.num_params(exp.abstract_state.params)


_OOM = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", re.I)
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _not_cached(tgt: Target):
  """Compile-only executables cannot be loaded back from JAX's persistent compilation cache
  (each read fails with a warning): write none (private JAX config; if it moves, entries are
  written and only warn)."""
  if tgt.name == "local":
    return contextlib.nullcontext()
  try:
    from jax._src import config as jax_config
    return jax_config.persistent_cache_min_compile_time_secs(float("inf"))
  except (ImportError, AttributeError):
    return contextlib.nullcontext()


def measure(c, gs, program: str, tgt: Target, workdir: str) -> dict:
  """Compiles one program and returns its per-device bytes, FLOPs and compile seconds; a
  compile the TPU compiler refuses for memory (RESOURCE_EXHAUSTED) returns the bytes its
  message states, marked `compiler_oom`."""
  t0 = time.perf_counter()
  try:
    with _not_cached(tgt):
      compiled, batch, params = _compile(c, gs, program, tgt, workdir)
  except Exception as e:  # XLA reports memory exhaustion as a runtime error from compile().
    m = _OOM.search(str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or not m:
      raise
    used = float(m.group(1)) * _UNITS[m.group(2).upper()]
    return {"compiler_oom": True, "bytes": {"total": used}, "flops": None,
            "compile_secs": time.perf_counter() - t0, "global_batch": None, "params": None}
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  b = {"arguments": mem.argument_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
       "outputs": mem.output_size_in_bytes, "aliased": mem.alias_size_in_bytes,
       "code": mem.generated_code_size_in_bytes}
  b["total"] = b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"] + b["code"]
  return {"bytes": b, "flops": float(cost.get("flops", 0.0)), "global_batch": batch,
          "params": params, "compile_secs": time.perf_counter() - t0,
          "hlo_dtypes": _compute_dtypes(compiled)}


def _compute_dtypes(compiled) -> dict:
  """{"convolution": {"bf16": n, "f32": m}, "dot": {...}}: result types of the compiled
  program's convolutions and dot products (is bf16 compute really bf16 on the target?)."""
  out = {"convolution": {}, "dot": {}}
  try:
    text = compiled.as_text()
  except Exception:  # Some backends cannot print their executables.
    return out
  for dtype, op in re.findall(r"=\s*(\w+)\[[^\]]*\][^=]*?\s(convolution|dot)\(", text):
    out[op][dtype] = out[op].get(dtype, 0) + 1
  return out


# ------------------------------------------------------------------------------ verdicts
def _settings(c) -> dict:
  return {"fsdp": int(c.mesh.fsdp), "dtype": c.model.dtype, "remat": c.model.remat,
          "grad_accum": int(c.optim.grad_accum)}


def _with(c, **changes):
  """A copy of stage config `c` with "block.key" changes (search candidates)."""
  c = c.copy_and_resolve_references()
  for dotted, value in changes.items():
    block, key = dotted.split(".")
    c[block][key] = value
  return c


def _candidates(c, m: dict, tgt: Target):
  """The search's lever steps from stage config `c` (measured `m`), in order: FSDP over every
  device (when the sharded state is a large part of memory), bf16 compute, remat keeping conv /
  matmul outputs, full remat, then gradient accumulation doubling while every device still
  gets at least one example per micro-batch."""
  n, steps = len(tgt.devices), []
  if c.mesh.fsdp < n and m["bytes"].get("arguments", 0) > tgt.hbm / 8:
    steps.append({"mesh.fsdp": n})
  if c.model.dtype == "float32":
    steps.append({"model.dtype": "bfloat16"})
  for r in REMAT_ORDER[REMAT_ORDER.index(c.model.remat) + 1:]:
    steps.append({"model.remat": r})
  accum = int(c.optim.grad_accum) * 2
  while c.data.batch_size % (accum * n) == 0:
    steps.append({"optim.grad_accum": accum})
    accum *= 2
  return steps


def _search(c, gs, tgt: Target, workdir: str, m: dict) -> tuple[list, Optional[dict]]:
  """Tries `_candidates` in order, each compiled on top of the levers that helped so far (a
  lever that did not lower the total is dropped again), until the program fits: (tried, the
  settings that fit or None)."""
  tried, kept, best = [], {}, m["bytes"]["total"]
  for step in _candidates(c, m, tgt):
    changes = {**kept, **step}
    logging.info("Plan search: %s", ", ".join(f"{k}={v}" for k, v in changes.items()))
    total = measure(_with(c, **changes), gs, "train", tgt, workdir)["bytes"]["total"]
    tried.append({"changes": changes, "total_gib": total / GiB, "fits": total <= tgt.hbm})
    if total <= tgt.hbm:
      return tried, changes
    if total < best:
      kept, best = changes, total
  return tried, None


def _project(m: dict, tgt: Target, mfu: float, num_steps: int) -> dict:
  if not m.get("flops") or not tgt.peak:
    return {"step_secs": None, "images_per_sec": None, "days": None}
  secs = m["flops"] / (tgt.peak * mfu)
  return {"step_secs": secs, "images_per_sec": m["global_batch"] / secs,
          "days": secs * num_steps / 86400}


def plan(config, workdir: str, topology: str = "local", mfu: float = 0.4,
         hbm_gib: float = 0) -> dict:
  """Compiles every program of `config` for `topology` and writes `workdir/plan.json` (see the
  module docstring); returns the same dict."""
  if not 0 < mfu <= 1:
    raise PlanError(f"--mfu={mfu}: a fraction of the peak in (0, 1], e.g. 0.4.")
  tgt = target(topology, hbm_gib)
  logging.info("Plan for %s: %d x %s, %.1f GiB each", topology, len(tgt.devices), tgt.kind,
               tgt.hbm / GiB)
  rows = []
  for stage, program, c, gs in programs(config):
    logging.info("Compiling %s %s (resolution %d)", stage, program, growth.resolution(c, gs))
    m = measure(c, gs, program, tgt, workdir)
    total = m["bytes"]["total"]
    row = {"stage": stage, "program": program, "resolution": growth.resolution(c, gs),
           "fading": gs.fading, "settings": _settings(c), **m, "hbm": tgt.hbm,
           "fits": total <= tgt.hbm, "headroom": tgt.hbm - total,
           **_project(m, tgt, mfu, c.train.num_steps if program == "train" else 0)}
    if m.get("global_batch"):
      row["per_device_batch"] = m["global_batch"] / len(tgt.devices)
    row["tried"], fix = [], None
    if not row["fits"] and program == "train":
      row["tried"], fix = _search(c, gs, tgt, workdir, m)
    row["verdict"] = _verdict(row, fix)
    rows.append(row)
  result = {"topology": topology, "device_kind": tgt.kind, "devices": len(tgt.devices),
            "devices_per_chip": tgt.per_chip, "hbm_bytes": tgt.hbm, "peak_flops": tgt.peak,
            "peak_source": tgt.peak_source, "mfu": mfu, "jax": jax.__version__,
            "programs": rows}
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(workdir, "plan.json"), result)
  return result


def _bytes(b: float) -> str:
  return f"{b / GiB:.3g} GiB" if abs(b) >= GiB / 10 else f"{b / 2 ** 20:.3g} MiB"


def _verdict(row: dict, fix: Optional[dict]) -> str:
  gib, what = _bytes, lambda changes: ", ".join(f"{k}={v}" for k, v in changes.items())
  if row["fits"]:
    return f"fits ({gib(row['headroom'])} free)"
  over = f"over by {gib(-row['headroom'])}"
  if row["program"] != "train":
    return f"{over}: lower sample.batch_size"
  if fix:
    return f"{over}; fits with {what(fix)} ({gib(row['tried'][-1]['total_gib'] * GiB)})"
  if not row["tried"]:
    return f"{over}; no lever left to try: use a larger slice"
  low = min(row["tried"], key=lambda t: t["total_gib"])
  return (f"{over}; tried {len(row['tried'])} lever settings, the lowest "
          f"{gib(low['total_gib'] * GiB)} with {what(low['changes'])}: use a larger slice")


# ------------------------------------------------------------------------------ report
def format_table(result: dict) -> str:
  """The plan as a text table (one row per compiled program)."""
  per = "TensorCore" if result["devices_per_chip"] > 1 else (
      "chip" if result["topology"] != "local" else "device")
  largest = max(r["bytes"]["total"] for r in result["programs"])
  unit, div = ("GiB", GiB) if max(largest, result["hbm_bytes"]) >= GiB else ("MiB", 2 ** 20)
  peak = result["peak_flops"]
  peak = (f", {peak / 1e12:.4g} TFLOP/s" if peak and peak >= 1e12 else
          f", {peak / 1e9:.4g} GFLOP/s" if peak else "")
  head = (f"Plan for {result['topology']}: {result['devices']} x {result['device_kind']}, "
          f"{result['hbm_bytes'] / div:.4g} {unit}{peak} ({result['peak_source']}) per {per}; "
          f"memory and FLOPs per {per}, times at MFU {result['mfu']:.2f}:")
  cols = ("stage", "program", "res", "params", "batch/dev", "settings", f"args {unit}", "temps",
          "outs", "total", "GFLOP", "step", "img/s", "days", "verdict")
  lines = []
  for r in result["programs"]:
    b = r["bytes"]
    g = lambda k: f"{b[k] / div:.3g}" if k in b else "-"
    s = r["settings"]
    lines.append((
        r["stage"], r["program"] + (" (fade)" if r["fading"] else ""), str(r["resolution"]),
        _count(r.get("params")),
        f"{r['per_device_batch']:g}" if r.get("per_device_batch") else "-",
        f"fsdp={s['fsdp']} {_SHORT[s['dtype']]} remat={s['remat']} accum={s['grad_accum']}",
        g("arguments"), g("temporaries"), g("outputs"), g("total"),
        f"{r['flops'] / 1e9:.4g}" if r.get("flops") else "-",
        _secs(r.get("step_secs")),
        f"{r['images_per_sec']:.4g}" if r.get("images_per_sec") else "-",
        f"{r['days']:.3g}" if r.get("days") else "-", r["verdict"]))
  widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
  fmt = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
  return "\n".join([head, fmt(cols)] + [fmt(l) for l in lines])


_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _count(n: Optional[int]) -> str:
  if not n:
    return "-"
  return next(f"{n / d:.3g}{u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "k"), (1, ""))
              if n >= d)


def _secs(s: Optional[float]) -> str:
  if s is None:
    return "-"
  if s < 1e-3:
    return f"{s * 1e6:.3g} us"
  return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def describe(result: dict) -> str:
  """One line: does everything fit, and the largest program's share of memory."""
  bad = [f"{r['stage']} {r['program']}" for r in result["programs"] if not r["fits"]]
  largest = max(r["bytes"]["total"] for r in result["programs"])
  return ("Every program fits" if not bad else
          f"{len(bad)} program(s) do not fit as configured ({', '.join(bad)})") + (
      f"; the largest needs {100 * largest / result['hbm_bytes']:.3g} % of a device's "
      f"{_bytes(result['hbm_bytes'])}. Written to plan.json.")
