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


def test_folder_dataset(tmp_path):
  from PIL import Image
  for cls, color in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
    os.makedirs(tmp_path / cls)
    for i in range(3):
      Image.new("RGB", (20, 12), color).save(tmp_path / cls / f"{i}.png")
  images, labels, classes = data.folder_dataset(str(tmp_path), 8)
  assert images.shape == (6, 8, 8, 3) and classes == ["cats", "dogs"]
  assert labels.tolist() == [0, 0, 0, 1, 1, 1] and images[0, 0, 0, 0] == 255
  with pytest.raises(data.DatasetNotAvailableError, match="not a directory"):
    data.folder_dataset(str(tmp_path / "missing"), 8)


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


def test_flat_folder_with_and_without_trailing_slash_and_bad_files(tmp_path, caplog):
  from PIL import Image
  flat = tmp_path / "icons"
  flat.mkdir()
  for i in range(3):
    Image.new("RGB", (10, 10), (0, 200, 0)).save(flat / f"{i}.png")
  (flat / ".hidden.png").write_bytes(b"ignored")  # Hidden files and non-images are not read.
  (flat / "notes.txt").write_text("ignored")
  for root in (str(flat), str(flat) + "/"):
    images, labels, classes = data.folder_dataset(root, 8)
    assert images.shape == (3, 8, 8, 3) and labels.tolist() == [0, 0, 0] and classes == []
  (flat / "broken.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(data.BadImageError, match="broken.png.*skip_bad_images"):
    data.folder_dataset(str(flat), 8)
  with caplog.at_level("WARNING"):
    images, _, _ = data.folder_dataset(str(flat), 8, skip_bad_images=True)
  assert len(images) == 3 and "Skipped 1 unreadable image" in caplog.text
