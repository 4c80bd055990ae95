import functools
import os

import numpy as np
import pytest

from conftest import load_config
from difflax import data
from difflax import parallel


def test_embedded_is_deterministic_labelled_and_resolution_consistent():
  a, la = data.embedded_dataset(40, 32)
  b, lb = data.embedded_dataset(40, 32)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (40, 32, 32, 3) and a.dtype == np.uint8
  assert sorted(set(la.tolist())) == list(range(10))
  # Low-res render == area-downsampled high-res render (up to rounding and supersampling).
  lo, _ = data.embedded_dataset(40, 16)
  down = a.astype(np.float32).reshape(40, 16, 2, 16, 2, 3).mean(axis=(2, 4))
  assert np.abs(down - lo).mean() < 4.0
  # Test split differs; varied content (not a constant image).
  test, _ = data.embedded_dataset(40, 32, split="test")
  assert not np.array_equal(test, a) and a.std() > 30


@pytest.mark.parametrize("style", data.STYLES)
def test_embedded_styles_are_deterministic_balanced_and_distinct(style):
  a, la = data.embedded_dataset(30, 16, style=style)
  b, lb = data.embedded_dataset(30, 16, style=style)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(np.bincount(la), np.full(10, 3))  # Balanced classes.
  test, _ = data.embedded_dataset(30, 16, split="test", style=style)
  assert not np.array_equal(test, a)
  other = data.embedded_dataset(30, 16, style=({*data.STYLES} - {style}).pop())[0]
  assert np.abs(other.astype(float) - a).mean() > 10
  if style == "plain":  # One flat background colour: the four corners agree, the centre differs.
    corners = a[:, [0, 0, -1, -1], [0, -1, 0, -1]].astype(int)
    assert np.abs(corners - corners[:, :1]).max() <= 1
    assert (np.abs(a[:, 8, 8].astype(int) - corners[:, 0]).sum(-1) > 60).mean() > 0.6
  c = load_config("ddpm_cifar10", "tiny")
  c.data.embedded_style = "fancy"
  with pytest.raises(ValueError, match="valid: plain, textured"):
    data.check_source(c.data)


def test_array_batches_depend_only_on_seed_and_step():
  images, labels = data.embedded_dataset(20, 8)
  it = data.array_batches(images, labels, 8, seed=3)
  batches = [next(it) for _ in range(5)]
  resumed = data.array_batches(images, labels, 8, seed=3, start_step=3)
  for want in batches[3:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  assert batches[0]["image"].min() >= -1 and batches[0]["image"].max() <= 1
  # Per-process slices partition the global batch.
  halves = [next(data.array_batches(images, labels, 8, seed=3, process_index=i,
                                    process_count=2)) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["label"] for h in halves]),
                                batches[0]["label"])


def test_missing_tfds_dataset_fails_fast_with_instructions(tiny_config, tmp_path):
  tiny_config.data.name = "cifar10"
  tiny_config.data.data_dir = str(tmp_path)
  with pytest.raises(data.DatasetNotAvailableError, match="never downloads"):
    next(data.host_batches(tiny_config.data, seed=0))
  tiny_config.data.name = "no_such_dataset_xyz"
  with pytest.raises(data.DatasetNotAvailableError, match="embedded"):
    next(data.host_batches(tiny_config.data, seed=0))


def test_tfds_under_mock_data_gives_global_sharded_batches(tiny_config):
  import tensorflow_datasets as tfds
  tiny_config.data.update(name="cifar10", resolution=8, batch_size=16)
  mesh = parallel.make_mesh(tiny_config.mesh)
  with tfds.testing.mock_data(num_examples=32):
    it = data.make_iterator(tiny_config.data, mesh, seed=0)
    batch = next(it)
    again = next(data.make_iterator(tiny_config.data, mesh, seed=0))
  assert batch["image"].shape == (16, 8, 8, 3) and batch["label"].shape == (16,)
  assert batch["image"].sharding.spec == parallel.BATCH_SPEC
  assert len(batch["image"].sharding.device_set) == 8
  x = np.asarray(batch["image"])
  assert x.min() >= -1 and x.max() <= 1
  np.testing.assert_array_equal(x, np.asarray(again["image"]))


@functools.lru_cache(maxsize=None)  # TFDS registers a builder class once per process.
def _tiny_tfds_builder():
  """A 40-example TFDS dataset (12x10 RGB, 3 classes) defined here, so nothing downloads."""
  import tensorflow_datasets as tfds

  class DifflaxTinyRecords(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(12, 10, 3)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(40):
        yield i, {"image": np.random.default_rng(i).integers(0, 256, (12, 10, 3), np.uint8),
                  "label": i % 3}
  return DifflaxTinyRecords


def test_tfds_array_record_is_read_by_index_and_resumes_at_any_step_for_one_batch(
    tiny_config, tmp_path):
  from difflax import images as images_lib
  builder_cls = _tiny_tfds_builder()
  builder_cls(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  c = tiny_config.data
  c.update(name="difflax_tiny_records", data_dir=str(tmp_path), num_classes=3)
  read, n = data.tfds_reader(c, "train")
  assert n == 40
  imgs, labels = read(np.array([5, 0]))
  assert imgs.shape == (2, 8, 8, 3)
  # TFDS stores examples in its own order: find each one among the generated examples.
  generated = [images_lib.center_crop_resize(
      np.random.default_rng(k).integers(0, 256, (12, 10, 3), np.uint8), 8) for k in range(40)]
  for img, label in zip(imgs, labels):
    keys = [k for k in range(40) if np.array_equal(generated[k], img)]
    assert len(keys) == 1 and keys[0] % 3 == label
  # A resume at step 10**6 reads this process's 4 examples of the batch, nothing else, and
  # yields the batch a continuous run would have seen at that step.
  calls = []

  def counting(idx):
    calls.append(len(idx))
    return read(idx)
  late = next(data.index_batches(counting, n, 8, seed=1, start_step=10**6, process_index=1,
                                 process_count=2))
  assert calls == [4] and late["image"].shape == (4, 8, 8, 3)
  stream = data.tfds_batches(c, "train", 8, seed=1)
  batches = [next(stream) for _ in range(7)]  # 7 x 8 > 40: crosses an epoch boundary.
  resumed = next(data.tfds_batches(c, "train", 8, seed=1, start_step=6))
  np.testing.assert_array_equal(resumed["image"], batches[6]["image"])
  np.testing.assert_array_equal(resumed["label"], batches[6]["label"])


def test_statistics_examples_are_the_same_on_every_process(tiny_config, tmp_path, monkeypatch):
  """`sample_examples` (reference statistics, NCSN's sigma_1, SR conditioning) reads the same
  examples whatever the process: not process i's slice of each batch."""
  import jax
  _tiny_tfds_builder()(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  c = tiny_config.data
  c.update(name="difflax_tiny_records", data_dir=str(tmp_path), num_classes=3)
  want = data.sample_examples(c, 16, split="train")
  for i in range(2):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda i=i: i)
    got = data.sample_examples(c, 16, split="train")
    assert got[0].shape == (16, 8, 8, 3)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_tensorflow_is_an_extra_and_its_absence_is_one_line(monkeypatch, tiny_config):
  """`pip install difflax` resolves no TensorFlow (the [tfds] extra brings it with TFDS);
  choosing a TFDS dataset without it says which extra to install."""
  import builtins
  import importlib.metadata
  core = [r for r in importlib.metadata.requires("difflax") if "extra ==" not in r]
  assert core and not [r for r in core if r.lower().startswith(("tensorflow", "tf-"))], core
  tfds_extra = [r for r in importlib.metadata.requires("difflax") if 'extra == "tfds"' in r]
  assert any(r.startswith("tensorflow-datasets") for r in tfds_extra), tfds_extra
  real_import = builtins.__import__

  def no_tfds(name, *args, **kwargs):
    if name.startswith("tensorflow"):
      raise ImportError(f"No module named {name!r}")
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, "__import__", no_tfds)
  tiny_config.data.name = "cifar10"
  with pytest.raises(data.DatasetNotAvailableError, match=r"\[tfds\] extra \(pip install -e"):
    next(data.host_batches(tiny_config.data, seed=0))


def test_prefetch_yields_the_same_batches_and_raises_where_the_item_would_be():
  mesh = parallel.local_mesh()
  cfg = load_config("ddpm_cifar10", "tiny").data
  plain = data.make_iterator(cfg, mesh, seed=3, start_step=5, ahead=0)
  ahead = data.make_iterator(cfg, mesh, seed=3, start_step=5)  # Two batches ahead.
  for _ in range(4):
    a, b = next(plain), next(ahead)
    np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    np.testing.assert_array_equal(np.asarray(a["label"]), np.asarray(b["label"]))
    assert a["image"].sharding == b["image"].sharding
  ahead.close()

  def broken():
    yield 1
    raise ValueError("bad batch")
  it = data.prefetch(broken())
  assert next(it) == 1
  with pytest.raises(ValueError, match="bad batch"):
    next(it)
  assert list(data.prefetch(iter(range(5)), size=1)) == [0, 1, 2, 3, 4]
  # A consumer that stops early lets the thread go, and the thread has ended when close()
  # returns: one still freeing its last batch once the interpreter finalizes aborts the process.
  import threading
  for source in (iter(range(100)), slow_after_first()):
    it = data.prefetch(source, size=1)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "difflax-prefetch"]


def slow_after_first():
  import time
  yield 0
  time.sleep(0.5)  # The thread is producing the next item when the consumer closes.
  yield 1


def test_iterators_left_open_do_not_outlive_the_interpreter(tmp_path):
  """A script that exits with unclosed iterators (benchmarks do): their prefetch threads are
  stopped and joined by an exit hook, before finalization would unwind a thread inside JAX's
  C++ transfer code by force and abort the process (seen as exit status -6)."""
  import subprocess
  import sys
  from conftest import REPO
  script = (
      "import atexit, threading\n"
      # Registered first, so it runs last: after difflax's hook, before finalization.
      "atexit.register(lambda: print('alive', sum(t.name == 'difflax-prefetch' and t.is_alive()"
      " for t in threading.enumerate())))\n"
      "from difflax import config, data, parallel\n"
      "c = config.load('ddpm_cifar10:tiny').data\n"
      "its = [data.make_iterator(c, parallel.local_mesh(), seed=s) for s in range(3)]\n"
      "print([next(it)['image'].shape for it in its])\n")
  r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                     text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip().splitlines()[-1] == "alive 0", r.stdout
