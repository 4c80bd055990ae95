"""The quality line: how far a run's images are from the data, printed when a run ends.

Contract: `score(config, images, mesh=None) -> dict` measures `images` [N, H, W, C] (uint8, or
float in [-1, 1]) in the quick feature network of `config.data` (cached, trained on demand;
`evaluation.features`):
  * `quick_fd`, `quick_kid` against the eval split's reference features (the reference the
    evals use, `eval.reference_examples` examples);
  * for labelled data, `shape_score`: the Inception Score's formula exp(E_x KL(p(y|x) || p(y)))
    (Salimans et al. 2016) in the quick classifier's space (1 for one class or undecided
    images, the number of classes for confident, balanced ones), and `confident`, the fraction
    of images whose top class has probability > `CONFIDENT`;
  * the same numbers for N real training-split examples as `real_<name>`: the ceiling at this
    sample count (FD and KID are biased upwards for small N, so a run's numbers are read against
    them, not against 0);
  * `features` (the network label), `features_accuracy` (its held-out accuracy),
    `features_quality` (that, or for unlabelled data the label-free features' held-out
    reconstruction, as a phrase) and `num`. Unlabelled data get FD and KID only.
`line(result, what)` is the one-line summary; `report(config, images, mesh, what)` logs it and
returns the result (what `train`, `--mode=sample` and a cascade's pipeline call).
"""
from __future__ import annotations

import logging

import numpy as np

from difflax import data as data_lib
from difflax.evaluation import metrics
from difflax.evaluation import stats

CONFIDENT = 0.9


def shape_score(probs) -> tuple[float, float]:
  """probs: [N, K] class probabilities -> (exp(E_x KL(p(y|x) || p(y))), fraction with
  max_y p(y|x) > CONFIDENT)."""
  p = np.asarray(probs, np.float64)
  p_y = p.mean(0, keepdims=True)
  kl = np.sum(p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(p_y, 1e-12, None))), axis=1)
  return float(np.exp(kl.mean())), float(np.mean(p.max(1) > CONFIDENT))


def _measure(net, images, ref, mu, cov, labelled: bool, mesh) -> dict:
  f = net.features(images, mesh=mesh)
  kid, _ = metrics.kid(f, ref, num_subsets=20, subset_size=min(len(f), len(ref), 1000))
  out = {"quick_fd": metrics.frechet_distance(f.mean(0), np.cov(f, rowvar=False), mu, cov),
         "quick_kid": kid}
  if labelled:
    out["shape_score"], out["confident"] = shape_score(net.probs(images, mesh=mesh))
  return out


def score(config, images, mesh=None) -> dict:
  """See the module docstring. Needs at least 2 images (a covariance)."""
  images = np.asarray(images)
  if len(images) < 2:
    raise ValueError("The quality line needs at least 2 images.")
  d = config.data
  net = stats.extractor(config, "quick")
  ref = stats.reference_features(config, net, config.eval.reference_examples, mesh=mesh)
  mu, cov = ref.mean(0), np.cov(ref, rowvar=False)
  labelled = int(d.num_classes) > 1 and net.labelled
  real, _ = data_lib.sample_examples(d, len(images), config.seed, d.split)
  result = {"features": net.label, "features_accuracy": net.accuracy,
            "features_quality": net.describe(), "num": int(len(images)),
            "reference": f"{d.name}:{d.eval_split}:{len(ref)}"}
  result.update(_measure(net, images, ref, mu, cov, labelled, mesh))
  result.update({f"real_{k}": v for k, v in
                 _measure(net, real, ref, mu, cov, labelled, mesh).items()})
  return result


def line(result: dict, what: str = "samples") -> str:
  """'Quality of 64 samples (quick:ab12 net, 98.0% accurate; real data of the same count in
  brackets): quick FD 12.3 [4.1], KID 0.0123 [0.0011], shape score 7.9 [9.6], confident 0.81
  [0.97]'."""
  acc = result.get("features_quality", "accuracy unknown")
  parts = [f"quick FD {result['quick_fd']:.2f} [{result['real_quick_fd']:.2f}]",
           f"KID {result['quick_kid']:.4f} [{result['real_quick_kid']:.4f}]"]
  if "shape_score" in result:
    parts += [f"shape score {result['shape_score']:.2f} [{result['real_shape_score']:.2f}]",
              f"confident {result['confident']:.2f} [{result['real_confident']:.2f}]"]
  return (f"Quality of {result['num']} {what} ({result['features']} network, {acc}; real "
          f"training images of the same count in brackets, reference {result['reference']}): "
          + ", ".join(parts))


def report(config, images, mesh=None, what: str = "samples") -> dict:
  """`score`, logged as `line`."""
  result = score(config, images, mesh)
  logging.info("%s", line(result, what))
  return result
