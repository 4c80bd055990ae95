import math

import numpy as np
import pytest

from difflax import data
from difflax import noise_scales as ns


def test_initial_sigma_closed_forms_and_chunking():
  assert ns.initial_sigma(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(37, 2, 3, 2))
  flat = x.reshape(37, -1)
  brute = max(np.linalg.norm(a - b) for a in flat for b in flat)
  for chunk in (1, 5, 1000):
    assert ns.initial_sigma(x, chunk_size=chunk) == pytest.approx(brute, rel=1e-9)
  with pytest.raises(ValueError):
    ns.initial_sigma(x[:1])


def test_coverage_and_ratio_solve_the_phi_equation():
  from scipy import stats
  d, g = 3072, 1.04
  a = math.sqrt(2 * d) * (g - 1)
  assert ns.coverage(d, g) == pytest.approx(stats.norm.cdf(a + 3 * g) - stats.norm.cdf(a - 3 * g))
  with pytest.raises(ValueError, match="D=2"):
    ns.scale_ratio(2, 0.5)
  for dim in (64, 784, 3072, 12288):
    r = ns.scale_ratio(dim, 0.5)
    assert r > 1 and ns.coverage(dim, r) == pytest.approx(0.5, abs=1e-9)
  # Higher dimension -> scales must be closer together.
  assert ns.scale_ratio(12288) < ns.scale_ratio(3072) < ns.scale_ratio(784)
  with pytest.raises(ValueError, match="coverage"):
    ns.scale_ratio(3072, 0.999)


def test_paper_cifar10_setting():
  """D=3072, sigma 50 -> 0.01, L=232, T=5: the paper's epsilon is 6.2e-6; coverage ~0.57."""
  sigmas = ns.geometric_sigmas(50, 0.01, 232)
  assert sigmas[0] == pytest.approx(50) and sigmas[-1] == pytest.approx(0.01)
  ratio = sigmas[0] / sigmas[1]
  np.testing.assert_allclose(sigmas[:-1] / sigmas[1:], ratio)
  assert ns.coverage(3072, ratio) == pytest.approx(0.567, abs=0.005)
  eps = ns.langevin_step_size(ratio, 0.01, 5)
  assert eps == pytest.approx(6.2e-6, rel=0.03)
  # eps is the minimiser of |Eq. 4 - 1| on its neighbourhood.
  here = abs(ns.langevin_ratio(eps, ratio, 0.01, 5) - 1)
  for other in (eps * 0.9, eps * 1.1):
    assert abs(ns.langevin_ratio(other, ratio, 0.01, 5) - 1) > here
  # Coverage 0.5 needs fewer scales than the paper used.
  assert 200 < ns.num_noise_scales(3072, 50, 0.01) < 232


def test_langevin_ratio_limits():
  # eps -> 0: the chain does not move, s_T = sigma_{i-1} so the ratio is gamma^2.
  assert ns.langevin_ratio(1e-14, 1.1, 0.01, 5) == pytest.approx(1.21, rel=1e-6)
  # Many steps: the chain forgets its start and the ratio tends to the fixed point.
  eps = 1e-5
  decay = 1 - eps / 0.01 ** 2
  fixed = 2 * eps / (0.01 ** 2 * (1 - decay ** 2))
  assert ns.langevin_ratio(eps, 1.1, 0.01, 10_000) == pytest.approx(fixed, rel=1e-9)


def test_recommend_on_embedded_data():
  images, _ = data.embedded_dataset(64, 8)
  rec = ns.recommend(images.astype(np.float32) / 127.5 - 1)
  assert rec["dim"] == 192 and 0 < rec["sigma_first"] <= 2 * math.sqrt(192)
  assert rec["coverage"] >= 0.5 and rec["num_scales"] > 2 and 0 < rec["step_size"] < 1e-4


def test_cli_prints_the_design_for_data_and_for_the_paper_setting():
  import json, os, subprocess, sys
  from conftest import REPO

  def cli(arg):
    proc = subprocess.run([sys.executable, "-m", "difflax.noise_design", f"--config={arg}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])
  rec = cli("configs/ncsnv2_cifar10.py:tiny")
  assert rec["dim"] == 8 * 8 * 3 and rec["num_scales"] > 2
  assert rec["sigma_first_from"] == "data (Technique 1)" and rec["coverage"] >= 0.5
  paper = cli("configs/ncsnv2_cifar10.py:paper")
  assert paper["num_scales"] == 232 and paper["coverage"] == pytest.approx(0.567, abs=0.005)
  assert paper["technique4_step_size"] == pytest.approx(6.2e-6, rel=0.03)


def test_from_config_computes_missing_fields_and_keeps_given_ones():
  from conftest import load_config
  c = load_config("ncsnv2_cifar10", "tiny")
  with pytest.raises(ValueError, match="sigma_first=0 asks for Technique 1"):
    ns.from_config(c)  # The data comes from the caller (this module reads no files).
  out = ns.from_config(c, lambda n: data.sample_array(c.data, n, c.seed))
  want = ns.initial_sigma(data.sample_array(c.data, c.ncsn.stat_examples, c.seed))
  assert out["sigmas"][0] == pytest.approx(want)
  assert out["sigmas"][0] > out["sigmas"][-1] == pytest.approx(0.05)
  assert out["coverage"] >= 0.5 and out["step_size"] > 0
  paper = load_config("ncsnv2_cifar10", "paper")
  fixed = ns.from_config(paper)  # Every field given: no data needed (CIFAR-10 is not here).
  assert len(fixed["sigmas"]) == 232 and fixed["step_size"] == 6.2e-6
  assert fixed["sigmas"][0] == pytest.approx(50)


def test_coverage_is_monotonic_in_the_ratio_for_image_dimensions():
  # Just above 1 coverage rises negligibly (by < 1e-4, above 0.997); below that it falls
  # monotonically, so Technique 2's equation has one root for any coverage below 0.99.
  for dim in (192, 3072, 12288):
    ratios = np.linspace(1.0, 1.5, 400)
    values = np.array([ns.coverage(dim, r) for r in ratios])
    assert values.max() - ns.MAX_COVERAGE < 1e-4
    tail = values[(values < 0.99) & (values > 1e-12)]
    assert len(tail) > 30 and np.all(np.diff(tail) < 0)
