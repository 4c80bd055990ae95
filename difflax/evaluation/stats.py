"""Reference statistics of a dataset in a feature space: mean and covariance as an `.npz`.

Contract: `dataset_stats(config, features="quick", split=None, num=10000)` returns
{"mu": [D], "sigma": [D, D], "num": N, "features": label, "dataset": "name:split:resolution"};
files are written atomically and read with `allow_pickle=False` (`load_stats`). Features are
accumulated in float64 batch by batch (`metrics.StreamingStats`).

  python -m difflax.evaluation.stats --config=configs/ddpm_cifar10.py --features=quick \
      --split=test --num=10000 --out=ref_stats.npz

`--features=inception` uses the FID InceptionV3 (`evaluation.inception`; weights from a local
file, never downloaded); `--features=quick` the offline quick network. The label stored in the file
(`inception:<hash>` / `quick:<hash>`) is checked against the network an eval uses.
"""
from __future__ import annotations

import json

import numpy as np

from difflax import data as data_lib
from difflax import fileio
from difflax.evaluation import features as features_lib
from difflax.evaluation import inception
from difflax.evaluation import metrics


def extractor(config, features: str = "quick"):
  """The feature network named by `features` for `config`: an object with `.label` and
  `.features(images [N, H, W, C] in [-1, 1] or uint8) -> [N, D]`."""
  if features == "quick":
    return features_lib.get_or_train(config.data, config.eval.feature_net,
                                     config.eval.feature_steps)
  if features == "inception":
    if config.data.channels != 3:
      raise ValueError(f"Inception features need RGB data; config.data.channels="
                       f"{config.data.channels}.")
    return inception.load_weights(config.eval.inception_weights)
  raise ValueError(f"Unknown features={features!r}; use 'quick' or 'inception'.")


_REFERENCE_CACHE: dict = {}


def reference_features(config, net, num: int, split: str | None = None,
                       mesh=None) -> np.ndarray:
  """[num, D] features of `num` examples of the dataset's `split` (default: eval split),
  computed sharded over `mesh` (default: this process's devices). Cached per process by network
  label and data settings, so evaluators rebuilt for a new architecture (progressive growth
  phases, cascade stages at one resolution) do not recompute them."""
  d = config.data
  split = split or d.eval_split
  key = (net.label, *(d.get(k) for k in ("name", "resolution", "folder", "eval_fraction",
                                          "data_dir", "num_examples")), split, num, config.seed)
  if key not in _REFERENCE_CACHE:
    images = data_lib.sample_array(d, num, config.seed, split)
    _REFERENCE_CACHE[key] = net.features(images, mesh=mesh)
  return _REFERENCE_CACHE[key]


def dataset_stats(config, features: str = "quick", split: str | None = None,
                  num: int = 10_000) -> dict:
  d = config.data
  split = split or d.eval_split
  net = extractor(config, features)
  acc = metrics.StreamingStats.of(reference_features(config, net, num, split))
  return {"mu": acc.mean, "sigma": acc.cov, "num": acc.n, "features": net.label,
          "dataset": f"{d.name}:{split}:{d.resolution}"}


def save_stats(path: str, stats: dict) -> str:
  meta = {k: stats[k] for k in ("num", "features", "dataset")}
  return fileio.save_npz(path, mu=stats["mu"], sigma=stats["sigma"],
                         meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))


def load_stats(path: str) -> dict:
  f = fileio.load_npz(path)
  return {"mu": f["mu"], "sigma": f["sigma"], **json.loads(f["meta"].tobytes().decode())}


def main(argv):
  from absl import flags
  from difflax import cli
  del argv
  f = flags.FLAGS
  stats = dataset_stats(cli.load_config(), f.features, f.split or None, f.num)
  path = save_stats(f.out, stats)
  print(json.dumps({"path": path, "num": stats["num"], "features": stats["features"],
                    "dataset": stats["dataset"]}))


if __name__ == "__main__":
  from absl import flags
  from difflax import cli
  cli.define_config_flag()
  flags.DEFINE_enum("features", "quick", ["quick", "inception"], "Feature network.")
  flags.DEFINE_string("split", "", "Split ('' = config.data.eval_split).")
  flags.DEFINE_integer("num", 10_000, "Examples to use.")
  flags.DEFINE_string("out", "reference_stats.npz", "Output .npz.")
  cli.run(main)
