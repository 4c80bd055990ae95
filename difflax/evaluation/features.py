"""Quick, offline feature network for sample-quality metrics on CPU.

Contract: `train_feature_net(data_config, steps, seed)` trains a small CNN classifier on a dataset
(the embedded one by default) with a fixed recipe, and returns a `FeatureNet` bundle whose
`features(images: [N, H, W, C] in [-1, 1]) -> [N, 128] float32` are its penultimate activations
and `probs(images) -> [N, num_classes]` its class probabilities; `accuracy` is its accuracy on
the eval split, measured after training and kept in its metadata.
Unlabelled data (one class: a flat folder, `data.num_classes <= 1`) cannot train a classifier
(a one-class one has features that carry nothing and scores every image perfectly), so the same
network trains label-free, as the encoder of an autoencoder: its 128 features must reconstruct
the image at 8x8 (`AE_SIZE`) through one linear layer; `meta["objective"]` says which, and
`meta["heldout_r2"]` (the fraction of the held-out images' 8x8 pixel variance the features
reconstruct) is its instrument check in place of an accuracy.
Bundles save to / load from one weights file (`fileio.save_weights`) and carry `weights_hash`
(`trees.content_hash` of their weights): quick FD / KID are always reported with it
("quick:<hash>") so they are never mistaken for Inception FID, which needs the standard network.

  python -m difflax.evaluation.features --config=configs/ddpm_cifar10.py --out=feats.npz
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from difflax import config as config_lib
from difflax import data as data_lib
from difflax import fileio
from difflax import images as images_lib
from difflax import parallel
from difflax import trees

FEATURE_DIM = 128
DEFAULT_STEPS = 1600  # At 32x32 and below; above, the stride-2 stem sees more per image:
ABOVE_32_STEPS = 1000  # 64x64 measured 99.3 % held out after 1000 steps (99.6 % after 1600).
RECIPE = 2  # Bump when the architecture or training recipe changes: cached networks retrain.
CHANNELS = (16, 32, 64, 128)
HELDOUT_EXAMPLES = 1000  # Eval-split examples its accuracy is measured on.
AE_SIZE = 8  # Unlabelled data: the features reconstruct the image at AE_SIZE x AE_SIZE.
# The embedded data are procedural, so the network trains on at least this many pixels' worth
# of draws of the train split (16,384 images at 16x16, 4,096 at 32x32): on the 4,096 examples of
# the default config it overfits at 16x16 (96.6 % held out after 1600 steps, 97.4 % with 16,384).
MIN_EMBEDDED_PIXELS = 16_384 * 16 * 16


class Classifier(nn.Module):
  """A small CNN that works at 32x32 whatever the input: smaller inputs are upsampled (nearest,
  nothing lost; the depth of a 32x32 net is what tells a 5-pixel star from a disc), larger ones
  brought down by learned stride-2 convs (so a 64x64 net still sees every pixel); then 3x3 conv +
  GroupNorm + ReLU stages, halving the resolution down to 4x4 so the receptive field spans the
  image. x: [B, H, W, C] -> logits [B, num_classes] (or features [B, FEATURE_DIM])."""
  num_classes: int

  @nn.compact
  def __call__(self, x, return_features: bool = False):
    if x.shape[1] < 32:
      x = images_lib.nearest_upsample(x, 32 // x.shape[1])
    i = 0
    while x.shape[1] > 32:
      x = nn.relu(nn.Conv(CHANNELS[0], (4, 4), strides=(2, 2), name=f"stem_{i}")(x))
      i += 1
    for i, ch in enumerate(CHANNELS):
      x = nn.relu(nn.GroupNorm(8, name=f"norm_{i}")(nn.Conv(ch, (3, 3), name=f"conv_{i}")(x)))
      if x.shape[1] <= 4 or i == len(CHANNELS) - 1:
        break
      x = nn.avg_pool(x, (2, 2), (2, 2))
    feats = nn.relu(nn.Dense(FEATURE_DIM, name="features")(x.mean(axis=(1, 2))))
    if return_features:
      return feats
    return nn.Dense(self.num_classes, name="head")(feats)


@dataclasses.dataclass
class FeatureNet:
  params: Any
  meta: dict

  @property
  def weights_hash(self) -> str:
    return self.meta["weights_hash"]

  @property
  def label(self) -> str:
    return f"quick:{self.weights_hash}"

  @property
  def accuracy(self) -> float | None:
    """Classification accuracy on the eval split, held out (None: unlabelled data or a network
    file from before it was recorded)."""
    return self.meta.get("accuracy")

  @property
  def labelled(self) -> bool:
    """A classifier (probabilities, shape score) rather than a label-free encoder."""
    return self.meta.get("objective", "classifier") == "classifier"

  def describe(self) -> str:
    """The instrument's own quality, as the quality line prints it."""
    if not self.labelled:
      r2 = self.meta.get("heldout_r2")
      return ("label-free autoencoder features" + (
          f", reconstructing {100 * r2:.1f}% of held-out {AE_SIZE}x{AE_SIZE} pixel variance"
          if r2 is not None else ""))
    if self.accuracy is None:
      return "accuracy unknown"
    on = self.meta.get("accuracy_split") or "held-out data"
    if on in ("test", "validation", "train"):  # Networks saved before the text was recorded.
      on = f"held-out {on}"
    return f"{100 * self.accuracy:.1f}% accurate on {on}"

  def features(self, images, mesh=None, batch_size: int = 256) -> np.ndarray:
    """[N, H, W, C] float in [-1, 1] (or uint8) -> [N, 128] float32 features, computed in
    batches sharded over `mesh` (default: this process's devices; `parallel.map_batches`)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 127.5 - 1.0
    return parallel.map_batches(_feature_fn(self.meta["num_classes"]), self.params, images,
                                mesh, batch_size)

  def probs(self, images, mesh=None, batch_size: int = 256) -> np.ndarray:
    """[N, H, W, C] -> [N, num_classes] class probabilities p(y|x) (the shape score's input)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 127.5 - 1.0
    return parallel.map_batches(_probs_fn(self.meta["num_classes"]), self.params, images,
                                mesh, batch_size)

  def save(self, path: str) -> str:
    return fileio.save_weights(path, self.params, self.meta)


@functools.lru_cache(maxsize=None)
def _feature_fn(num_classes: int):
  """One feature function per head size (a stable object, so `map_batches` jits it once)."""
  model = Classifier(num_classes)
  return lambda p, x: model.apply({"params": p}, x, return_features=True)


@functools.lru_cache(maxsize=None)
def _probs_fn(num_classes: int):
  model = Classifier(num_classes)
  return lambda p, x: jax.nn.softmax(model.apply({"params": p}, x), axis=-1)


def load(path: str) -> FeatureNet:
  params, meta = fileio.load_weights(path)
  return FeatureNet(jax.tree.map(jnp.asarray, params), meta)


def recipe_steps(resolution: int) -> int:
  """The recipe's length at a resolution (`eval.feature_steps=0` asks for it)."""
  return DEFAULT_STEPS if int(resolution) <= 32 else ABOVE_32_STEPS


def train_feature_net(data_config, steps: int = 0, seed: int = 0,
                      batch_size: int = 64) -> FeatureNet:
  """Fixed recipe: Adam, learning rate warmed up to 2e-3 over 50 steps then cosine-decayed,
  `steps` steps of `batch_size` with the dataset's random flips, cross-entropy; then its accuracy
  on `HELDOUT_EXAMPLES` of the eval split goes into the metadata (`accuracy`, what quick metrics
  are printed with: a weak instrument is visible as such)."""
  steps = steps or recipe_steps(data_config.resolution)
  num_classes = max(int(data_config.num_classes), 1)
  labelled = num_classes > 1
  model = Classifier(num_classes)
  train_data = data_config
  # ... but never more than the recipe draws (short smoke-test recipes render few).
  least = min(MIN_EMBEDDED_PIXELS // int(data_config.resolution) ** 2, steps * batch_size)
  if data_config.name == "embedded" and data_config.num_examples < least:
    train_data = ml_collections.ConfigDict(data_config.to_dict())
    train_data.num_examples = least
  # Whole batches even in a multi-process job (process 0 trains it alone): the network, and
  # its hash, do not depend on the process count.
  it = data_lib.host_batches(train_data, seed=seed, batch_size=batch_size, replicated=True)
  first = next(it)
  params = model.init(jax.random.key(seed), jnp.asarray(first["image"]))["params"]
  channels = first["image"].shape[-1]
  decoder = nn.Dense(AE_SIZE * AE_SIZE * channels)
  if not labelled:  # Label-free: a linear decoder from the features to the 8x8 image.
    params = {"net": params, "decoder": decoder.init(jax.random.key(seed + 1),
                                                     jnp.zeros((1, FEATURE_DIM)))["params"]}
  warmup = min(50, steps // 4)
  opt = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 2e-3, warmup, max(steps, warmup + 1)))
  opt_state = opt.init(params)

  def reconstruction(p, x):
    """(the features' 8x8 reconstruction, the 8x8 target) of x: [B, H, W, C]."""
    f = model.apply({"params": p["net"]}, x, return_features=True)
    target = jax.image.resize(x, (x.shape[0], AE_SIZE, AE_SIZE, channels), "linear")
    return decoder.apply({"params": p["decoder"]}, f).reshape(target.shape), target

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      if not labelled:
        pred, target = reconstruction(p, x)
        return jnp.mean((pred - target) ** 2), jnp.zeros(())
      logits = model.apply({"params": p}, x)
      return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
              (logits.argmax(-1) == y).mean())
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, acc

  batch, acc = first, 0.0
  for _ in range(steps):
    params, opt_state, loss, acc = step(params, opt_state, jnp.asarray(batch["image"]),
                                        jnp.asarray(batch["label"]))
    batch = next(it)
  trained = params
  params = params if labelled else params["net"]
  meta = {"recipe": RECIPE, "dataset": data_config.name, "resolution": int(data_config.resolution),
          "num_classes": num_classes, "steps": steps, "seed": seed,
          "objective": "classifier" if labelled else "autoencoder",
          "train_examples": int(train_data.num_examples) if train_data.name == "embedded" else None,
          "final_train_accuracy": float(acc) if labelled else None,
          "final_train_loss": float(loss), "weights_hash": trees.content_hash(params)}
  net = FeatureNet(params, meta)
  if not labelled:  # The held-out fraction of 8x8 pixel variance the features reconstruct.
    images, _ = data_lib.sample_examples(data_config, HELDOUT_EXAMPLES,
                                         split=data_config.eval_split)
    recon = jax.jit(reconstruction)
    err = var = 0.0
    for lo in range(0, len(images), 250):
      pred, target = recon(trained, jnp.asarray(images[lo:lo + 250]))
      err += float(jnp.sum((pred - target) ** 2))
      var += float(jnp.sum((target - target.mean(0)) ** 2))
    meta.update(heldout_r2=1.0 - err / max(var, 1e-12), heldout_examples=int(len(images)),
                accuracy_split=heldout_description(data_config))
  else:
    # On this process's default device (not `probs`, which shards over every process's
    # devices): in a multi-process job only process 0 trains and measures the network.
    images, labels = data_lib.sample_examples(data_config, HELDOUT_EXAMPLES,
                                              split=data_config.eval_split)
    probs = jax.jit(_probs_fn(num_classes))
    pred = np.concatenate([np.asarray(probs(params, images[lo:lo + 250])).argmax(-1)
                           for lo in range(0, len(images), 250)])
    meta.update(accuracy=float(np.mean(pred == labels)), accuracy_examples=int(len(labels)),
                accuracy_split=heldout_description(data_config))
  logging.info("Quick feature network %s (%s %dpx, %d steps): %s", net.label,
               data_config.name, data_config.resolution, steps, net.describe())
  return net


def heldout_description(data_config) -> str:
  """What the accuracy is measured on, as the quality line prints it."""
  d = data_config
  if d.name != "folder":
    return f"held-out {d.name}:{d.eval_split}"
  images, _, rows, _ = data_lib.folder_dataset(d, d.eval_split)
  if len(rows) == len(images):
    return "the folder's training images (no held-out split: data.eval_fraction=0 or too few files)"
  return (f"the held-out {len(rows)} images of the folder ({d.eval_split}, "
          f"data.eval_fraction={d.eval_fraction:g})")


def default_path(data_config, steps: int = 0) -> str:
  """~/.cache/difflax/features/quick_<dataset>_<res>px_<hash of the data settings>.npz (with
  `_s<steps>` for a recipe length other than the default)."""
  keys = ("name", "resolution", "channels", "num_classes", "num_examples", "folder", "data_dir",
          "split")
  if data_config.name == "folder":  # Its training images depend on the held-out fraction.
    keys += ("eval_fraction",)
  if data_config.name == "embedded" and data_config.get("embedded_style", "textured") != "textured":
    keys += ("embedded_style",)  # The textured style's networks keep their cached files.
  # A resolved config drops the keys of other sources (config.OPTIONAL): hash their defaults,
  # so a network's file name does not depend on that.
  full = config_lib.base_config().data
  full.update(data_config.to_dict())
  ident = hashlib.sha256(json.dumps({k: str(full[k]) for k in keys}).encode()).hexdigest()
  name = data_config.name.replace("/", "_")
  steps = steps or recipe_steps(data_config.resolution)
  suffix = "" if steps == recipe_steps(data_config.resolution) else f"_s{steps}"
  return os.path.join(os.path.expanduser("~/.cache/difflax/features"),
                      f"quick_{name}_{data_config.resolution}px_{ident[:8]}{suffix}.npz")


def get_or_train(data_config, path: str = "", steps: int = 0) -> FeatureNet:
  """The cached quick network for a dataset, trained (`steps` of the recipe, 0 = its length at
  the resolution: 80-130 s on 2 CPU cores) if missing. An explicit `path` is used as it is.

  Process 0 loads or trains it and broadcasts it, so a multi-process job trains it once and
  every host computes features with the same weights; jobs sharing a machine (parallel test
  workers, a sweep) train it once too (`fileio.lock`)."""
  explicit = bool(path)
  steps = steps or recipe_steps(data_config.resolution)
  path = path or default_path(data_config, steps)
  net = None
  if jax.process_index() == 0:
    with fileio.lock(path):
      if fileio.exists(path):
        net = load(path)
        current = (net.meta.get("recipe") == RECIPE and net.meta.get("steps") == steps
                   # One-class classifiers from before unlabelled data trained label-free.
                   and (int(data_config.num_classes) > 1 or not net.labelled))
        if not (explicit or current):
          net = None
      if net is None:
        net = train_feature_net(data_config, steps=steps)
        net.save(path)
  if jax.process_count() == 1:
    return net
  meta = parallel.json_from_process_0(net.meta if net else None)
  template = net.params if net else _init_params(meta["num_classes"], data_config)
  params = parallel.tree_from_process_0(jax.tree.map(np.asarray, template))
  return FeatureNet(jax.tree.map(jnp.asarray, params), meta)


def _init_params(num_classes: int, data_config):
  """Zeros shaped like the network's params (a template to receive a broadcast into)."""
  shape = (1, data_config.resolution, data_config.resolution, data_config.channels)
  abstract = jax.eval_shape(Classifier(num_classes).init, jax.random.key(0), jnp.zeros(shape))
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract["params"])


def main(argv):
  from absl import flags
  from difflax import cli
  del argv
  f = flags.FLAGS
  config = cli.load_config()
  net = train_feature_net(config.data, steps=f.steps, seed=f.seed)
  path = net.save(f.out or default_path(config.data, f.steps))
  print(json.dumps({"path": path, "label": net.label, **net.meta}, indent=2))


if __name__ == "__main__":
  from absl import flags
  from difflax import cli
  cli.define_config_flag()
  flags.DEFINE_string("out", "", "Output .npz (default ~/.cache/difflax/features/...).")
  flags.DEFINE_integer("steps", 0, "Training steps of the fixed recipe (0 = its length at the "
                       "resolution).")
  flags.DEFINE_integer("seed", 0, "Seed of the fixed recipe.")
  cli.run(main)
