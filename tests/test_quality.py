"""The quality line: the shape score's closed forms and the line's real-data ceiling."""
import numpy as np

from conftest import load_config
from difflax import data
from difflax.evaluation import quality


def test_shape_score_closed_forms():
  k = 10
  confident = np.eye(k)[np.arange(200) % k]  # Sure of each image, classes balanced: IS = K.
  assert np.allclose(quality.shape_score(confident), (k, 1.0))
  one_class = np.tile(np.eye(k)[3], (50, 1))  # Sure, but one class: p(y|x) = p(y), IS = 1.
  assert np.allclose(quality.shape_score(one_class), (1.0, 1.0))
  undecided = np.full((50, k), 1 / k)
  assert np.allclose(quality.shape_score(undecided), (1.0, 0.0))
  # Two equally likely classes per image, balanced: KL = log(K / 2) for every image.
  halves = np.zeros((100, k))
  halves[np.arange(100), np.arange(100) % k] = halves[np.arange(100), (np.arange(100) + 1) % k] = .5
  score, conf = quality.shape_score(halves)
  assert np.isclose(score, k / 2) and conf == 0.0


def test_real_images_score_at_their_ceiling_and_corrupted_ones_below_it():
  c = load_config("ddpm_cifar10", "")  # 16x16 embedded data.
  c.eval.update(feature_steps=300, reference_examples=256)
  real, labels = data.sample_examples(c.data, 128, split="train")
  r = quality.score(c, real)
  assert r["num"] == 128 and r["features"].startswith("quick:") and r["features_accuracy"] > 0.6
  # The samples are the ceiling's own images: every number equals its real_ twin.
  for k in ("quick_fd", "quick_kid", "shape_score", "confident"):
    assert np.isclose(r[k], r[f"real_{k}"]), k
  assert r["shape_score"] > 2  # 10 shapes, balanced; 300 steps of the recipe: not yet sure.
  blur = (real + np.roll(real, 1, 1) + np.roll(real, -1, 1) + np.roll(real, 1, 2)
          + np.roll(real, -1, 2)) / 5
  noise = np.random.default_rng(0).uniform(-1, 1, real.shape).astype(np.float32)
  one_shape = real[labels == 0].repeat(10, axis=0)[:128]
  for name, x in (("blur", blur), ("noise", noise), ("one shape", one_shape)):
    b = quality.score(c, x)
    assert b["quick_fd"] > 2 * r["quick_fd"], name
    assert b["shape_score"] < r["shape_score"], name
  line = quality.line(r)
  assert line.startswith("Quality of 128 samples (quick:") and "shape score" in line
