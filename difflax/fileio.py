"""Files difflax writes: atomic writes, JSON / JSONL, `.npz` arrays and hashed weight files.

Contract: every file the framework writes outside orbax checkpoints goes through here, so each
one is either absent or complete (written to a temporary name beside it, then renamed; a killed
run never leaves half a file that a resumed run would trust).
  `atomic_write(path, data: bytes | str)`, `write_json(path, obj)`, `append_jsonl(path, row)`,
  `read_jsonl(path) -> [dict]` (missing file -> []), `save_npz(path, **arrays)`.
  `save_weights(path, params, meta)` / `load_weights(path) -> (params, meta)`: a parameter tree as
  one `.npz` (leaves under their `trees.path_str`, the JSON meta under `__meta__`, read with
  `allow_pickle=False`); `meta["weights_hash"]` is `trees.content_hash(params)`, set on save and
  verified on load, so a corrupt or edited file is refused by name. The quick feature network and
  the Inception weights share this format.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np

from difflax import trees

META_KEY = "__meta__"


def atomic_write(path: str, data: bytes | str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
  os.replace(tmp, path)
  return path


def write_json(path: str, obj: Any) -> str:
  return atomic_write(path, json.dumps(obj, indent=2))


def append_jsonl(path: str, row: dict) -> None:
  """One JSON object per line; a line is written with one `write` call (a killed run may lose the
  last row, never corrupt an earlier one)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:  # A row cut short by a kill.
        continue
  return rows


def save_npz(path: str, **arrays) -> str:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return atomic_write(path, buf.getvalue())


def save_weights(path: str, params: Any, meta: dict) -> str:
  """params (any pytree of arrays) + JSON meta -> one `.npz`; records `meta["weights_hash"]`."""
  meta = {**meta, "weights_hash": trees.content_hash(params)}
  flat = {k: np.asarray(v) for k, v in trees.flatten(params).items()}
  return save_npz(path, **{META_KEY: np.frombuffer(json.dumps(meta).encode(), np.uint8)}, **flat)


def load_weights(path: str) -> tuple[dict, dict]:
  """(nested dict of numpy arrays, meta) of a `save_weights` file; the hash is verified."""
  with np.load(path, allow_pickle=False) as f:
    meta = json.loads(f[META_KEY].tobytes().decode()) if META_KEY in f.files else {}
    params = trees.unflatten({k: f[k] for k in f.files if k != META_KEY})
  h = trees.content_hash(params)
  if meta.get("weights_hash", h) != h:
    raise ValueError(f"{path}: the weights do not match their recorded hash "
                     f"({meta['weights_hash']} vs {h}); the file is corrupt or was edited. "
                     "Delete it to rebuild it.")
  meta["weights_hash"] = h
  return params, meta


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)
