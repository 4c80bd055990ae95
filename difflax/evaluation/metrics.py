"""Sample-quality metrics computed from feature vectors (pure numpy, float64).

Contract: features are `[N, D]` arrays (Inception pool3 or any feature network); statistics are
(mu: [D], sigma: [D, D]). Nothing here runs a network.

  frechet_distance   ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017), with
                     the trace of the matrix square root from the eigenvalues of the symmetric
                     S1^(1/2) S2 S1^(1/2), which is stable where sqrtm of S1 S2 is not.
  kid                unbiased MMD^2 with the cubic polynomial kernel (x.y / D + 1)^3 over random
                     subsets (Binkowski et al. 2018): (mean, std).
  precision_recall   k-NN manifold precision and recall (Kynkaenniemi et al. 2019).
  StreamingStats     float64 running mean / covariance, so 50k samples never sit in memory.
"""
from __future__ import annotations

import numpy as np


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """The FID formula on given statistics (mu: [D], sigma: [D, D])."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"Statistics differ in shape: {mu1.shape}/{s1.shape} vs "
                     f"{mu2.shape}/{s2.shape}.")
  w, v = np.linalg.eigh((s1 + s1.T) / 2)
  s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = s1_half @ s2 @ s1_half
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _poly_kernel(x, y):
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(features1, features2, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance: (mean, std) of the unbiased MMD^2 over random subsets."""
  x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  m = min(subset_size, len(x), len(y))
  if m < 2:
    raise ValueError("KID needs at least two examples in each set.")
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_subsets):
    a = x[rng.choice(len(x), m, replace=False)]
    b = y[rng.choice(len(y), m, replace=False)]
    kxx, kyy, kxy = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b)
    values.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                  + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
  return float(np.mean(values)), float(np.std(values))


def _pairwise_sq(a, b):
  return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0.0)


def _knn_radii(x, k: int, chunk: int) -> np.ndarray:
  radii = np.empty(len(x))
  for lo in range(0, len(x), chunk):
    d = _pairwise_sq(x[lo:lo + chunk], x)
    radii[lo:lo + chunk] = np.sort(d, axis=1)[:, k]  # Index 0 is the point itself.
  return radii


def _coverage_of(points, manifold, radii, chunk: int) -> float:
  inside = []
  for lo in range(0, len(points), chunk):
    d = _pairwise_sq(points[lo:lo + chunk], manifold)
    inside.append((d <= radii[None]).any(axis=1))
  return float(np.concatenate(inside).mean())


def precision_recall(real, fake, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
  """Precision: fraction of fake features inside the real k-NN manifold; recall: the converse."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if min(len(real), len(fake)) <= k:
    raise ValueError(f"precision_recall needs more than k={k} examples per set.")
  precision = _coverage_of(fake, real, _knn_radii(real, k, chunk), chunk)
  recall = _coverage_of(real, fake, _knn_radii(fake, k, chunk), chunk)
  return precision, recall


class StreamingStats:
  """Running float64 mean and (unbiased) covariance of feature batches [B, D]."""

  def __init__(self, dim: int):
    self.n = 0
    self.sum = np.zeros(dim, np.float64)
    self.outer = np.zeros((dim, dim), np.float64)

  @classmethod
  def of(cls, features, chunk: int = 4096) -> "StreamingStats":
    f = np.asarray(features)
    acc = cls(f.shape[1])
    for lo in range(0, len(f), chunk):
      acc.update(f[lo:lo + chunk])
    return acc

  def update(self, features) -> "StreamingStats":
    f = np.asarray(features, np.float64)
    self.n += len(f)
    self.sum += f.sum(0)
    self.outer += f.T @ f
    return self

  @property
  def mean(self) -> np.ndarray:
    return self.sum / self.n

  @property
  def cov(self) -> np.ndarray:
    if self.n < 2:
      raise ValueError("Covariance needs at least two examples.")
    mu = self.mean
    return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
