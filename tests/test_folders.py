"""Folder datasets: layouts, transparency, grayscale, bad files, the decode cache."""
import os

import numpy as np
import pytest
from PIL import Image

from conftest import load_config
from difflax import data
from difflax import folders


def save(path, mode, size, color, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, size, color).save(path, **kw)


def test_class_subfolders_become_sorted_labels(tmp_path):
  for cls, color in (("dogs", (0, 0, 255)), ("cats", (255, 0, 0))):
    for i in range(3):
      save(tmp_path / "d" / cls / f"{i}.png", "RGB", (20, 12), color)
  images, labels, classes = folders.load(str(tmp_path / "d"), 8, cache_dir=str(tmp_path / "c"))
  assert isinstance(images, np.memmap) and images.shape == (6, 8, 8, 3)
  assert classes == ["cats", "dogs"] and labels.tolist() == [0, 0, 0, 1, 1, 1]
  assert tuple(images[0, 4, 4]) == (255, 0, 0) and tuple(images[5, 4, 4]) == (0, 0, 255)
  with pytest.raises(data.DatasetNotAvailableError, match="not a directory"):
    folders.load(str(tmp_path / "missing"), 8)


def test_flat_folder_with_and_without_trailing_slash_symlink_and_hidden(tmp_path):
  flat = tmp_path / "icons"
  for i in range(3):
    save(flat / f"{i}.png", "RGB", (10, 10), (0, 200, 0))
  (flat / ".hidden.png").write_bytes(b"ignored")  # Hidden files and non-images are not read.
  (flat / "notes.txt").write_text("ignored")
  os.symlink(flat, tmp_path / "link")
  for root in (flat, str(flat) + "/", tmp_path / "link", str(tmp_path / "link") + "/"):
    images, labels, classes = folders.load(str(root), 8, cache_dir=str(tmp_path / "c"))
    assert images.shape == (3, 8, 8, 3) and labels.tolist() == [0, 0, 0] and classes == []


def test_alpha_composites_over_the_background_before_resizing(tmp_path, recwarn):
  img = np.zeros((4, 4, 4), np.uint8)
  img[..., 0] = 255                          # Red everywhere ...
  img[:2, :, 3] = 0                          # ... transparent in the top half,
  img[2:, :, 3] = 128                        # half opaque in the bottom half.
  os.makedirs(tmp_path / "a")
  Image.fromarray(img, "RGBA").save(tmp_path / "a" / "rgba.png")
  got = folders.decode(str(tmp_path / "a" / "rgba.png"), 4, background=(10, 20, 30))
  assert tuple(got[0, 0]) == (10, 20, 30)    # alpha 0: exactly the background.
  a = 128 / 255
  np.testing.assert_allclose(got[3, 0], [255 * a + 10 * (1 - a), 20 * (1 - a), 30 * (1 - a)],
                             atol=1.0)
  white = folders.decode(str(tmp_path / "a" / "rgba.png"), 4)  # Default background: white.
  assert tuple(white[0, 0]) == (255, 255, 255)
  # A palette image whose index 0 is transparent: composited too, and PIL warns about nothing.
  pal = Image.new("P", (4, 4), 0)
  pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
  pal.putpixel((3, 3), 1)
  pal.save(tmp_path / "a" / "pal.png", transparency=0)
  got = folders.decode(str(tmp_path / "a" / "pal.png"), 4, background=(0, 255, 0))
  assert tuple(got[0, 0]) == (0, 255, 0) and tuple(got[3, 3]) == (255, 0, 0)
  assert not [w for w in recwarn if "ransparency" in str(w.message)]


def test_grayscale_keeps_one_channel(tmp_path):
  save(tmp_path / "g" / "x.png", "L", (6, 6), 77)
  images, _, _ = folders.load(str(tmp_path / "g"), 4, channels=1, cache_dir=str(tmp_path / "c"))
  assert images.shape == (1, 4, 4, 1) and (np.asarray(images) == 77).all()
  rgb, _, _ = folders.load(str(tmp_path / "g"), 4, channels=3, cache_dir=str(tmp_path / "c"))
  assert rgb.shape == (1, 4, 4, 3) and (np.asarray(rgb) == 77).all()


def test_cache_is_hit_without_opening_images_and_rebuilt_when_the_folder_changes(
    tmp_path, monkeypatch):
  for i in range(4):
    save(tmp_path / "f" / f"{i}.png", "RGB", (8, 8), (i * 40, 0, 0))
  first, _, _ = folders.load(str(tmp_path / "f"), 8, cache_dir=str(tmp_path / "c"))
  first = np.asarray(first).copy()

  def no_decoding(*args, **kwargs):
    raise AssertionError("an image was opened although the cache is valid")
  real = folders.decode
  monkeypatch.setattr(folders, "decode", no_decoding)
  again, _, _ = folders.load(str(tmp_path / "f"), 8, cache_dir=str(tmp_path / "c"))
  np.testing.assert_array_equal(again, first)
  save(tmp_path / "f" / "new.png", "RGB", (8, 8), (0, 0, 255))
  with pytest.raises(AssertionError, match="opened"):  # A new file: the cache is stale.
    folders.load(str(tmp_path / "f"), 8, cache_dir=str(tmp_path / "c"))
  monkeypatch.setattr(folders, "decode", real)
  grown, _, _ = folders.load(str(tmp_path / "f"), 8, cache_dir=str(tmp_path / "c"))
  assert len(grown) == 5 and not [p for p in os.listdir(tmp_path / "c") if ".lock" in p]


def test_bad_file_is_named_or_skipped_and_counted(tmp_path, caplog):
  for i in range(3):
    save(tmp_path / "b" / f"{i}.png", "RGB", (10, 10), (0, 200, 0))
  (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(data.BadImageError, match="broken.png.*skip_bad_images"):
    folders.load(str(tmp_path / "b"), 8, cache_dir=str(tmp_path / "c"))
  with caplog.at_level("WARNING"):
    images, labels, _ = folders.load(str(tmp_path / "b"), 8, skip_bad_images=True,
                                     cache_dir=str(tmp_path / "c"))
  assert images.shape == (3, 8, 8, 3) and len(labels) == 3
  assert "Skipped 1 unreadable image" in caplog.text


def test_class_count_is_checked_and_a_memory_mapped_folder_trains(tmp_path):
  from difflax import train
  for cls, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
    for i in range(8):
      save(tmp_path / "d" / cls / f"{i}.png", "RGB", (12, 12), color)
  c = load_config("ddpm_cifar10", "tiny")
  c.data.update(name="folder", folder=str(tmp_path / "d"), cache_dir=str(tmp_path / "c"))
  with pytest.raises(data.DatasetError, match="num_classes=2"):
    data.folder_dataset(c.data)
  c.data.num_classes = 2
  images, _, _ = data.folder_dataset(c.data)
  assert isinstance(images, np.memmap)  # Batches are read from the map, not a copy in RAM.
  c.train.update(num_steps=1, preview_every=0, eval_every=0)
  assert train.run(c, str(tmp_path / "run"))["step"] == 1


def test_concurrent_loaders_decode_once(tmp_path, monkeypatch):
  """Two loaders at once (processes of one job on a shared disk): one decodes, one waits."""
  import threading
  for i in range(6):
    save(tmp_path / "f" / f"{i}.png", "RGB", (8, 8), (i * 40, 0, 0))
  real, calls, gate = folders.decode, [], threading.Event()

  def slow_decode(*args, **kwargs):
    calls.append(args[0])
    gate.wait(5)  # Hold the first builder until the second loader has started waiting.
    return real(*args, **kwargs)
  monkeypatch.setattr(folders, "decode", slow_decode)
  out = [None, None]

  def load(i):
    out[i] = np.asarray(folders.load(str(tmp_path / "f"), 8, cache_dir=str(tmp_path / "c"))[0])
  threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  gate.set()
  for t in threads:
    t.join(30)
  assert len(calls) == 6  # Every file decoded once, not once per loader.
  np.testing.assert_array_equal(out[0], out[1])
