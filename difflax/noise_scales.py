"""NCSNv2 noise-scale design (Song & Ermon 2020, paper 004), pure numpy/scipy functions.

Contract: every function takes arrays or numbers and returns numbers or arrays; nothing trains
or samples. Sigmas are descending: sigma_1 (largest) ... sigma_L (smallest).

  Technique 1  `initial_sigma(data)`: sigma_1 = the maximum pairwise Euclidean distance between
               (flattened) training examples, computed in chunks so 50k images fit in memory.
  Technique 2  `scale_ratio(D, coverage)`: the common ratio gamma = sigma_{i-1} / sigma_i solving
               Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) = coverage
               (0.5 in the paper; `coverage(D, gamma)` evaluates the left-hand side), and
               `num_noise_scales` the L that geometric sigmas with that ratio need.
  Technique 4  `langevin_step_size(gamma, sigma_L, T)`: the epsilon that brings Eq. 4's
               s_T^2 / sigma_i^2 closest to 1, by grid search as the paper recommends.

The paper's CIFAR-10 setting (D = 3072, sigma 50 -> 0.01, L = 232) has coverage about 0.57, not
exactly 0.5: with coverage 0.5 Technique 2 gives a slightly larger ratio and fewer scales.

Run `python -m difflax.noise_design --config=configs/ncsnv2_cifar10.py[:paper]` to print the
noise design of a config (computed from its dataset where the config leaves fields at 0).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import optimize
from scipy import stats



def initial_sigma(data, chunk_size: int = 1024) -> float:
  """Max pairwise Euclidean distance of the examples in data: [N, ...] (Technique 1)."""
  x = np.asarray(data, np.float64).reshape(len(data), -1)
  if len(x) < 2:
    raise ValueError("initial_sigma needs at least two examples.")
  sq = (x * x).sum(axis=1)
  best = 0.0
  for lo in range(0, len(x), chunk_size):
    block = x[lo:lo + chunk_size]
    # Only pairs (i, j) with j >= lo: the rest were covered by earlier blocks.
    d2 = sq[lo:lo + chunk_size, None] + sq[None, lo:] - 2.0 * block @ x[lo:].T
    best = max(best, float(d2.max()))
  return math.sqrt(max(best, 0.0))


def coverage(dim: int, ratio: float) -> float:
  """Phi(sqrt(2D)(g - 1) + 3g) - Phi(sqrt(2D)(g - 1) - 3g): the probability mass of
  p_{sigma_i}(r) inside the 3-sigma radial shell of p_{sigma_{i-1}} (Technique 2)."""
  a = math.sqrt(2 * dim) * (ratio - 1)
  return float(stats.norm.cdf(a + 3 * ratio) - stats.norm.cdf(a - 3 * ratio))


_coverage = coverage  # `scale_ratio`'s argument is named `coverage` (DESIGN.md API).
# The coverage of ratio 1, whatever D: Phi(3) - Phi(-3). Past a rise of < 1e-4 just above 1,
# coverage falls monotonically as the ratio grows, so each target below it has one root.
MAX_COVERAGE = float(stats.norm.cdf(3) - stats.norm.cdf(-3))


def scale_ratio(dim: int, coverage: float = 0.5) -> float:
  """The ratio gamma > 1 with `coverage(dim, gamma) == coverage` (Technique 2)."""
  if not 0 < coverage < MAX_COVERAGE:
    raise ValueError(f"coverage must lie in (0, {MAX_COVERAGE:.4f}), got {coverage}.")
  hi = 2.0
  while _coverage(dim, hi) > coverage:
    hi *= 2
    if hi > 1e6:  # sqrt(2D)(g - 1) must outgrow 3g: in very low D coverage never falls.
      raise ValueError(f"No ratio reaches coverage {coverage} for D={dim}; Technique 2 is "
                       "meant for high-dimensional data.")
  return float(optimize.brentq(lambda g: _coverage(dim, g) - coverage, 1.0, hi, xtol=1e-14))


def geometric_sigmas(sigma_first: float, sigma_last: float, num_scales: int) -> np.ndarray:
  """Descending geometric sequence sigma_1 = sigma_first ... sigma_L = sigma_last: [L] float64."""
  if not sigma_first > sigma_last > 0:
    raise ValueError(f"Need sigma_first > sigma_last > 0, got {sigma_first}, {sigma_last}.")
  return np.geomspace(sigma_first, sigma_last, num_scales)


def num_noise_scales(dim: int, sigma_first: float, sigma_last: float,
                     coverage: float = 0.5) -> int:
  """L such that geometric sigmas from sigma_first to sigma_last have a ratio no larger than
  Technique 2's (so consecutive scales overlap at least as much as asked)."""
  ratio = scale_ratio(dim, coverage)
  return int(math.ceil(math.log(sigma_first / sigma_last) / math.log(ratio))) + 1


def langevin_ratio(eps: float, ratio: float, sigma_last: float, steps_per_scale: int) -> float:
  """s_T^2 / sigma_i^2 of Eq. 4 (Proposition 3) for step size eps: 1 is the target."""
  decay = 1 - eps / sigma_last ** 2
  fixed = 2 * eps / (sigma_last ** 2 - sigma_last ** 2 * decay ** 2)
  return decay ** (2 * steps_per_scale) * (ratio ** 2 - fixed) + fixed


def langevin_step_size(ratio: float, sigma_last: float, steps_per_scale: int,
                       num_grid: int = 4000) -> float:
  """Epsilon making Eq. 4 closest to 1, by a log-spaced grid search then a finer local grid
  (Technique 4)."""
  def best_of(grid):
    vals = np.abs(np.array([langevin_ratio(e, ratio, sigma_last, steps_per_scale)
                            for e in grid]) - 1)
    return int(np.argmin(vals))
  # Eq. 4 needs eps < sigma_L^2 for the chain to contract.
  grid = np.geomspace(sigma_last ** 2 * 1e-8, sigma_last ** 2 * 0.999, num_grid)
  i = best_of(grid)
  fine = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)], num_grid)
  return float(fine[best_of(fine)])


def recommend(data, sigma_last: float = 0.01, steps_per_scale: int = 5,
              target_coverage: float = 0.5) -> dict:
  """Techniques 1, 2 and 4 applied to data: [N, ...] in the model's input scale."""
  dim = int(np.prod(np.asarray(data).shape[1:]))
  sigma_first = initial_sigma(data)
  num = num_noise_scales(dim, sigma_first, sigma_last, target_coverage)
  ratio = (sigma_first / sigma_last) ** (1 / (num - 1))
  eps = langevin_step_size(ratio, sigma_last, steps_per_scale)
  return {"dim": dim, "num_examples": int(len(data)), "sigma_first": sigma_first,
          "sigma_last": sigma_last, "num_scales": num, "ratio": ratio,
          "coverage": coverage(dim, ratio), "steps_per_scale": steps_per_scale,
          "step_size": eps,
          "eq4_ratio": langevin_ratio(eps, ratio, sigma_last, steps_per_scale)}


def from_config(config, sample_data=None) -> dict:
  """The noise configuration of an NCSN config: fields of `config.ncsn` that are 0 are computed
  by Techniques 1, 2 and 4, Technique 1 from `sample_data(n)`, a function returning n training
  images [n, H, W, C] in [-1, 1] (called only when `ncsn.sigma_first` is 0; the caller owns the
  data, this module stays pure). Returns {"sigmas": [L], "step_size", "ratio", "coverage", "dim"};
  deterministic given the sample, so every process and every resumption agree."""
  n, d = config.ncsn, config.data
  dim = d.resolution * d.resolution * d.channels
  sigma_first = n.sigma_first
  if sigma_first <= 0:
    if sample_data is None:
      raise ValueError("config.ncsn.sigma_first=0 asks for Technique 1 from the training data; "
                       "pass sample_data or set config.ncsn.sigma_first.")
    sigma_first = initial_sigma(sample_data(n.stat_examples))
  num = n.num_scales if n.num_scales > 0 else num_noise_scales(dim, sigma_first, n.sigma_last,
                                                               n.coverage)
  sigmas = geometric_sigmas(sigma_first, n.sigma_last, num)
  ratio = float(sigmas[0] / sigmas[1])
  eps = n.step_size if n.step_size > 0 else langevin_step_size(ratio, n.sigma_last,
                                                               n.steps_per_scale)
  return {"sigmas": sigmas, "step_size": float(eps), "ratio": ratio,
          "coverage": coverage(dim, ratio), "dim": dim}
