import numpy as np
import pytest

from conftest import load_config
from difflax import data
from difflax.evaluation import features, metrics


@pytest.fixture(scope="module")
def quick_net(tmp_path_factory):
  c = load_config("ddpm_cifar10", "")  # Embedded data, 16x16.
  net = features.get_or_train(c.data, steps=300)  # Cached: test_quality.py uses it too.
  path = net.save(str(tmp_path_factory.mktemp("feat") / "quick.npz"))
  return net, path, c


def fd(net, ref, images):
  a, b = net.features(ref), net.features(images)
  return metrics.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                  np.cov(b, rowvar=False))


def test_quick_features_rank_known_corruptions_worse_than_clean_data(quick_net):
  net, _, c = quick_net
  assert net.meta["final_train_accuracy"] > 0.25  # 10 classes: chance is 0.1.
  # Its held-out accuracy is measured and recorded (what every quick metric is printed with);
  # 300 steps of the recipe already tell most upright shapes apart at 16x16.
  assert net.meta["accuracy_split"].endswith("test")  # "held-out embedded:test"
  assert net.meta["accuracy_examples"] == 1000
  assert net.accuracy > 0.6, net.meta
  ref, _ = data.embedded_dataset(1000, 16, split="test")
  clean, labels = data.embedded_dataset(1000, 16, split="train")
  x = clean.astype(np.float32) / 127.5 - 1
  blurred = (x + np.roll(x, 1, 1) + np.roll(x, -1, 1) + np.roll(x, 1, 2) + np.roll(x, -1, 2)) / 5
  noisy = np.clip(x + np.random.default_rng(0).normal(0, 0.2, x.shape), -1, 1)
  dropped = x[labels < 5]
  base = fd(net, ref, x)
  for name, bad in (("blur", blurred), ("noise", noisy), ("dropped classes", dropped)):
    assert fd(net, ref, bad) > 2 * base, name


def test_feature_net_round_trips_with_its_hash(quick_net):
  net, path, _ = quick_net
  loaded = features.load(path)
  assert loaded.weights_hash == net.weights_hash and loaded.label.startswith("quick:")
  imgs, _ = data.embedded_dataset(16, 16)
  np.testing.assert_allclose(loaded.features(imgs), net.features(imgs), rtol=1e-5, atol=1e-6)


def test_quick_fd_known_answers(quick_net):
  """FD of a set against itself is 0; a colour shift of the same images moves it away, and more
  for a larger shift."""
  net, _, _ = quick_net
  x, _ = data.embedded_dataset(512, 16, split="test")
  x = x.astype(np.float32) / 127.5 - 1
  # Round-off relative to the features' scale: the covariance of ReLU features is rank-deficient
  # and sqrt of its round-off-sized eigenvalues is what remains.
  scale = np.trace(np.cov(net.features(x), rowvar=False))
  assert abs(fd(net, x, x)) < 1e-6 * scale
  small, large = fd(net, x, np.clip(x + 0.1, -1, 1)), fd(net, x, np.clip(x + 0.4, -1, 1))
  assert 1e-3 < small < large


def test_weight_files_refuse_corruption(quick_net, tmp_path):
  from difflax import fileio
  net, path, _ = quick_net
  params, meta = fileio.load_weights(path)
  params["features"]["kernel"] = params["features"]["kernel"] + 1.0
  fileio.save_weights(str(tmp_path / "edited.npz"), params, {})  # A new, consistent hash.
  assert fileio.load_weights(str(tmp_path / "edited.npz"))[1]["weights_hash"] != net.weights_hash
  import zipfile
  with zipfile.ZipFile(path) as z, zipfile.ZipFile(tmp_path / "bad.npz", "w") as out:
    for name in z.namelist():  # Same recorded hash, one array changed: refused.
      data_bytes = z.read(name)
      if name == "features/bias.npy":
        data_bytes = data_bytes[:-4] + b"\x00\x00\x80\x7f"
      out.writestr(name, data_bytes)
  with pytest.raises(ValueError, match="recorded hash"):
    features.load(str(tmp_path / "bad.npz"))


def test_on_demand_networks_are_built_once_per_machine(tmp_path, monkeypatch):
  """`get_or_train` holds `fileio.lock` on the cache file: a second job (another test worker, a
  sweep) waits for the first to save instead of training its own; the recipe length is part of
  the cache key."""
  import subprocess
  import sys
  from difflax import fileio
  path = str(tmp_path / "net.npz")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from difflax import fileio\n"
       f"with fileio.lock({path!r}):\n  print('held', flush=True); time.sleep(3)"],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  import time
  t0 = time.perf_counter()
  with fileio.lock(path):
    waited = time.perf_counter() - t0
  holder.wait()
  assert waited > 1.5
  c = load_config("ddpm_cifar10", "tiny")
  trained = []
  real = features.train_feature_net
  monkeypatch.setattr(features, "train_feature_net",
                      lambda d, steps: trained.append(steps) or real(d, steps=steps))
  monkeypatch.setenv("HOME", str(tmp_path))
  a = features.get_or_train(c.data, steps=3)
  b = features.get_or_train(c.data, steps=3)
  assert trained == [3] and a.weights_hash == b.weights_hash and a.meta["steps"] == 3
  assert features.default_path(c.data, 3).endswith("_s3.npz")
  features.get_or_train(c.data, steps=4)
  assert trained == [3, 4]


def test_the_network_does_not_depend_on_the_process_count(monkeypatch):
  """Process 0 trains it alone in a multi-process job: on whole batches, so the network (and
  the hash every quick metric is labelled with) is the one a single process trains."""
  import jax
  c = load_config("ddpm_cifar10", "tiny")
  want = features.train_feature_net(c.data, steps=3).weights_hash
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert features.train_feature_net(c.data, steps=3).weights_hash == want


def test_the_cache_key_follows_the_embedded_style():
  c = load_config("ddpm_cifar10", "tiny").data
  plain = features.default_path(c)
  c.embedded_style = "textured"
  assert features.default_path(c) != plain
