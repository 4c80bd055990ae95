import os

import numpy as np
import pytest

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
