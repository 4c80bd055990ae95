"""Files difflax reads and writes in a workdir: paths, atomic writes, JSON / JSONL, `.npz`
arrays, figures and hashed weight files.

Contract: every file the framework touches outside orbax checkpoints goes through here, through
`etils.epath` (what orbax itself uses), so a workdir may be a local path or a URL (`gs://`,
`s3://`, or any scheme registered with `epath.register_path_cls`): URLs are passed through
verbatim, never turned into a local folder. Each written file is either absent or complete: a
local file is written to a temporary name beside it and renamed; an object store publishes an
object whole. JSONL rows are appended locally and rewritten whole on object stores (which cannot
append).
  `path(p) -> epath.Path`, `exists(p)`, `atomic_write(p, data: bytes | str)`, `write_json`,
  `read_json`, `append_jsonl(p, row)`, `read_jsonl(p) -> [dict]` (missing file -> []),
  `save_npz(p, **arrays)`, `load_npz(p) -> {name: array}`, `save_figure(p, fig)`.
  `lock(p)`: a context manager holding an exclusive lock on a local `p.lock` (a no-op for URLs),
  so jobs sharing a machine build a cached file once. `exclusive(p, what)`: the same lock taken
  without waiting, `BusyError` naming the holder (pid, host, start) if another process has it;
  the OS drops a dead process's lock, so a killed run leaves none behind.
  `save_weights(p, params, meta)` / `load_weights(p) -> (params, meta)`: a parameter tree as one
  `.npz` (leaves under their `trees.path_str`, the JSON meta under `__meta__`, read with
  `allow_pickle=False`); `meta["weights_hash"]` is `trees.content_hash(params)`, set on save and
  verified on load, so a corrupt or edited file is refused by name. The quick feature network and
  the Inception weights share this format.
  `save_png(p, image)`: a uint8 grid as PNG, upscaled to stay viewable.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import socket
import time
from typing import Any

import numpy as np
from etils import epath

from difflax import images
from difflax import trees

META_KEY = "__meta__"


def is_url(p: str | os.PathLike) -> bool:
  return "://" in os.fspath(p)


def path(p: str | os.PathLike) -> epath.Path:
  """An `epath.Path`: a URL verbatim, a local path made absolute (orbax wants absolute)."""
  s = os.fspath(p)
  return epath.Path(s if is_url(s) else os.path.abspath(s))


def exists(p: str | os.PathLike) -> bool:
  return path(p).exists()


def atomic_write(p: str | os.PathLike, data: bytes | str) -> str:
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  data = data.encode() if isinstance(data, str) else data
  if is_url(p):  # An object store publishes the object whole or not at all.
    target.write_bytes(data)
  else:
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(target)
  return os.fspath(p)


@contextlib.contextmanager
def lock(p: str | os.PathLike):
  if is_url(p):
    yield
    return
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  with open(os.fspath(target) + ".lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class BusyError(RuntimeError):
  """Another live process holds the lock `exclusive` asked for."""


@contextlib.contextmanager
def exclusive(p: str | os.PathLike, what: str):
  """Holds an exclusive lock on the local file `p` for the block, or raises `BusyError` at once
  (`what` says what is busy); the lock file records its holder. A no-op for URLs (object stores
  have no locks)."""
  if is_url(p):
    yield
    return
  target = os.fspath(path(p))
  os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
  with open(target, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise BusyError(f"{what} is in use by {holder}: wait for it to finish or stop it (a "
                      "killed run releases it), or use another directory.") from None
    try:
      f.seek(0)
      f.truncate()
      f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
      f.flush()
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def write_json(p: str | os.PathLike, obj: Any) -> str:
  return atomic_write(p, json.dumps(obj, indent=2))


def read_json(p: str | os.PathLike) -> Any:
  return json.loads(path(p).read_text())


def append_jsonl(p: str | os.PathLike, row: dict) -> None:
  """One JSON object per line; a local line is written with one `write` call (a killed run may
  lose the last row, never corrupt an earlier one); on object stores the file is rewritten."""
  line = json.dumps(row) + "\n"
  if is_url(p):
    target = path(p)
    atomic_write(p, (target.read_text() if target.exists() else "") + line)
    return
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  with target.open("a") as f:
    f.write(line)


def read_jsonl(p: str | os.PathLike) -> list[dict]:
  target = path(p)
  if not target.exists():
    return []
  rows = []
  for line in target.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:  # A row cut short by a kill.
      continue
  return rows


def save_npz(p: str | os.PathLike, **arrays) -> str:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return atomic_write(p, buf.getvalue())


def load_npz(p: str | os.PathLike) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(path(p).read_bytes()), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def save_figure(p: str | os.PathLike, fig, dpi: int = 80) -> str:
  """A matplotlib Figure as a PNG."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  return atomic_write(p, buf.getvalue())


def save_weights(p: str, params: Any, meta: dict) -> str:
  """params (any pytree of arrays) + JSON meta -> one `.npz`; records `meta["weights_hash"]`."""
  meta = {**meta, "weights_hash": trees.content_hash(params)}
  flat = {k: np.asarray(v) for k, v in trees.flatten(params).items()}
  return save_npz(p, **{META_KEY: np.frombuffer(json.dumps(meta).encode(), np.uint8)}, **flat)


def load_weights(p: str) -> tuple[dict, dict]:
  """(nested dict of numpy arrays, meta) of a `save_weights` file; the hash is verified."""
  arrays = load_npz(p)
  meta = json.loads(arrays.pop(META_KEY).tobytes().decode()) if META_KEY in arrays else {}
  params = trees.unflatten(arrays)
  h = trees.content_hash(params)
  if meta.get("weights_hash", h) != h:
    raise ValueError(f"{p}: the weights do not match their recorded hash "
                     f"({meta['weights_hash']} vs {h}); the file is corrupt or was edited. "
                     "Delete it to rebuild it.")
  meta["weights_hash"] = h
  return params, meta


def save_png(path: str, image: np.ndarray, min_width: int = 256) -> str:
  """Writes a uint8 [H, W, C] image atomically, nearest-upscaled by an integer factor to
  >= min_width px so grids of small images stay viewable."""
  factor = max(1, -(-min_width // image.shape[1]))
  return atomic_write(path, images.png_bytes(images.nearest_upsample(image[None], factor)[0]))
