"""Writes small archives in TorchScript's zip format without torch, to test
`inception.read_torchscript` in CI (where torch is not installed).

The layout is what `torch.jit.save` writes: `<root>/data.pkl` pickles (protocol 2) the module
tree as objects of classes `__torch__.<path>.<Name>` whose state is their attribute dict; each
tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
backward_hooks)`, its storage a persistent id ('storage', torch.<Type>Storage, key, 'cpu', numel)
naming the raw little-endian file `<root>/data/<key>`; `<root>/version` holds the format version.
Tensors may share a storage at an offset and have any strides (views, transposes), which is what
the reader must undo.

  python tests/torchscript_writer.py   # rewrites tests/data/tiny_torchscript.pt
"""
import collections
import io
import os
import pickle
import sys
import types
import zipfile

import numpy as np

STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage",
            np.dtype(np.float16): "HalfStorage"}


class Storage:
  def __init__(self, key: str, flat: np.ndarray):
    self.key, self.flat = key, flat


class Tensor:
  """A view (offset, size, stride in elements) into a Storage."""

  def __init__(self, storage: Storage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def __reduce__(self):
    return (_rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                 collections.OrderedDict()))


def _rebuild_tensor_v2(*args):  # Only its module and name are written.
  raise NotImplementedError


def _fake_modules(class_names):
  """Registers `torch`, `torch._utils` and `__torch__.*` modules so pickle can name globals."""
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")
  _rebuild_tensor_v2.__module__ = "torch._utils"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch._utils = utils
  for name in STORAGES.values():
    setattr(torch, name, type(name, (), {"__module__": "torch"}))
  mods = {"torch": torch, "torch._utils": utils}
  classes = {}
  for qual in class_names:
    module, _, name = qual.rpartition(".")
    mod = mods.setdefault(module, types.ModuleType(module))
    cls = type(name, (), {"__module__": module})
    setattr(mod, name, cls)
    classes[qual] = cls
  return mods, classes, torch


def write(path: str, tree: dict, storages: list, root: str = "archive") -> str:
  """tree: nested {name: Tensor | dict} (dicts become `__torch__` submodules)."""
  names = []

  def collect(node, prefix):
    names.append(prefix)
    for k, v in node.items():
      if isinstance(v, dict):
        collect(v, f"{prefix}.{k}")
  collect(tree, "__torch__.Net")
  mods, classes, torch = _fake_modules(names)

  def build(node, prefix):
    obj = classes[prefix]()
    obj.__dict__.update({k: build(v, f"{prefix}.{k}") if isinstance(v, dict) else v
                         for k, v in node.items()})
    return obj

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        stype = getattr(torch, STORAGES[obj.flat.dtype])
        return ("storage", stype, obj.key, "cpu", obj.flat.size)
      return None

  saved = {k: sys.modules.get(k) for k in mods}
  sys.modules.update(mods)
  try:
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(build(tree, "__torch__.Net"))
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{root}/data.pkl", buf.getvalue())
    z.writestr(f"{root}/version", "3\n")
    for s in storages:
      z.writestr(f"{root}/data/{s.key}", np.ascontiguousarray(s.flat).astype(
          s.flat.dtype.newbyteorder("<")).tobytes())
  return path


def fixture_tensors():
  """The fixture's storages, module tree and the arrays the reader must return."""
  a = Storage("0", np.arange(24, dtype=np.float32) * 0.5 - 3.0)
  b = Storage("1", np.arange(6, dtype=np.int64) - 2)
  c = Storage("2", np.linspace(-1, 1, 5).astype(np.float16))
  tree = {
      "conv": {"weight": Tensor(a, 0, (2, 3, 2, 2), (12, 4, 2, 1)),     # OIHW, contiguous
               "bias": Tensor(a, 22, (2,), (1,))},                     # offset into a shared one
      "head": {"weight_t": Tensor(a, 0, (4, 3), (1, 4)),               # a transposed view
               "steps": Tensor(b, 1, (), ())},                          # a scalar at an offset
      "scale": Tensor(c, 0, (5,), (1,)),
  }
  flat_a = a.flat
  expected = {
      "conv.weight": flat_a[:24].reshape(2, 3, 2, 2),
      "conv.bias": flat_a[22:24],
      "head.weight_t": flat_a[:12].reshape(3, 4).T,
      "head.steps": np.asarray(-1, np.int64),
      "scale": c.flat,
  }
  return [a, b, c], tree, expected


if __name__ == "__main__":
  storages, tree, _ = fixture_tensors()
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_torchscript.pt")
  print(write(out, tree, storages))
