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
  images, labels, classes, paths = folders.load(str(tmp_path / "d"), 8,
                                               cache_dir=str(tmp_path / "c"))
  assert isinstance(images, np.memmap) and images.shape == (6, 8, 8, 3)
  assert classes == ["cats", "dogs"] and labels.tolist() == [0, 0, 0, 1, 1, 1]
  assert paths == [os.path.join(c, f"{i}.png") for c in classes for i in range(3)]
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
    images, labels, classes, _ = folders.load(str(root), 8, cache_dir=str(tmp_path / "c"))
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
  images, *_ = folders.load(str(tmp_path / "g"), 4, channels=1, cache_dir=str(tmp_path / "c"))
  assert images.shape == (1, 4, 4, 1) and (np.asarray(images) == 77).all()
  rgb, *_ = folders.load(str(tmp_path / "g"), 4, channels=3, cache_dir=str(tmp_path / "c"))
  assert rgb.shape == (1, 4, 4, 3) and (np.asarray(rgb) == 77).all()


def test_cache_is_hit_without_opening_images_and_rebuilt_when_the_folder_changes(
    tmp_path, monkeypatch):
  for i in range(4):
    save(tmp_path / "f" / f"{i}.png", "RGB", (8, 8), (i * 40, 0, 0))
  first, *_ = folders.load(str(tmp_path / "f"), 8, cache_dir=str(tmp_path / "c"))
  first = np.asarray(first).copy()

  def no_decoding(*args, **kwargs):
    raise AssertionError("an image was opened although the cache is valid")
  real = folders.decode
  monkeypatch.setattr(folders, "decode", no_decoding)
  again, *_ = folders.load(str(tmp_path / "f"), 8, cache_dir=str(tmp_path / "c"))
  np.testing.assert_array_equal(again, first)
  save(tmp_path / "f" / "new.png", "RGB", (8, 8), (0, 0, 255))
  with pytest.raises(AssertionError, match="opened"):  # A new file: the cache is stale.
    folders.load(str(tmp_path / "f"), 8, cache_dir=str(tmp_path / "c"))
  monkeypatch.setattr(folders, "decode", real)
  grown, *_ = folders.load(str(tmp_path / "f"), 8, cache_dir=str(tmp_path / "c"))
  assert len(grown) == 5 and not [p for p in os.listdir(tmp_path / "c") if ".lock" in p]


def test_bad_file_is_named_or_skipped_and_counted(tmp_path, caplog):
  for i in range(3):
    save(tmp_path / "b" / f"{i}.png", "RGB", (10, 10), (0, 200, 0))
  (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(data.BadImageError, match="broken.png.*skip_bad_images"):
    folders.load(str(tmp_path / "b"), 8, cache_dir=str(tmp_path / "c"))
  with caplog.at_level("WARNING"):
    images, labels, *_ = folders.load(str(tmp_path / "b"), 8, skip_bad_images=True,
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
  images, *_ = data.folder_dataset(c.data)
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


def shapes_folder(root, per_class=60, size=16, seed=0):
  """Three classes of solid shapes (disc, square, triangle) in random colours and places,
  stored sorted by class as a user's folder would be."""
  from PIL import ImageDraw
  rng = np.random.default_rng(seed)
  for cls in ("a_disc", "b_square", "c_triangle"):
    os.makedirs(root / cls, exist_ok=True)
    for i in range(per_class):
      im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
      d = ImageDraw.Draw(im)
      r = int(rng.integers(size // 4, size // 4 + 3))
      x, y = (int(v) for v in rng.integers(r, size - r, 2))
      fill = tuple(int(v) for v in rng.integers(120, 256, 3))
      if cls == "a_disc":
        d.ellipse((x - r, y - r, x + r, y + r), fill=fill)
      elif cls == "b_square":
        d.rectangle((x - r, y - r, x + r, y + r), fill=fill)
      else:
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
      im.save(root / cls / f"{i:03d}.png")


def test_held_out_split_is_disjoint_stable_and_real_sets_stand_for_every_class(tmp_path):
  shapes_folder(tmp_path / "f")
  c = load_config("ddpm_cifar10", "tiny")
  c.data.update(name="folder", folder=str(tmp_path / "f"), cache_dir=str(tmp_path / "c"),
                num_classes=3, resolution=16, eval_fraction=0.25)
  d = c.data
  images, labels, train_rows, classes = data.folder_dataset(d, d.split)
  _, _, eval_rows, _ = data.folder_dataset(d, d.eval_split)
  assert classes == ["a_disc", "b_square", "c_triangle"] and len(images) == 180
  assert not set(train_rows) & set(eval_rows) and len(train_rows) + len(eval_rows) == 180
  assert 25 <= len(eval_rows) <= 65  # About a quarter, by the path hash.
  _, _, _, paths = folders.load(d.folder, 16, cache_dir=d.cache_dir)
  held = {paths[i] for i in eval_rows}
  # A new file changes nothing for the others: each file's split is its own path's hash.
  save(tmp_path / "f" / "b_square" / "new.png", "RGB", (16, 16), (9, 9, 9))
  _, _, _, paths2 = folders.load(d.folder, 16, cache_dir=d.cache_dir)
  _, _, eval2, _ = data.folder_dataset(d, d.eval_split)
  assert held <= {paths2[i] for i in eval2} and len(paths2) == 181
  with pytest.raises(data.DatasetError, match="two splits"):
    data.folder_dataset(d, "validation")
  # The files are sorted by class, yet a real set of 30 holds every class, 10 each ...
  real, real_labels = data.sample_examples(d, 30, seed=1, split=d.split)
  assert np.bincount(real_labels, minlength=3).tolist() == [10, 10, 10]
  assert real.shape == (30, 16, 16, 3) and real.dtype == np.float32
  # ... drawn from the training rows only, and returned as drawn (not grouped by class).
  _, eval_labels = data.sample_examples(d, 1000, seed=1, split=d.eval_split)
  assert len(eval_labels) == len(eval2)
  assert len(set(real_labels[:3].tolist())) > 1 or len(set(real_labels[3:6].tolist())) > 1


def test_quality_line_of_a_class_folder_describes_the_whole_folder(tmp_path):
  """The real images' brackets: shape score near the class count (every class present), a
  quick FD to the held-out reference far below that of noise; the accuracy line names the
  held-out images."""
  from difflax.evaluation import quality
  shapes_folder(tmp_path / "f", per_class=80)
  c = load_config("ddpm_cifar10", "tiny")
  c.data.update(name="folder", folder=str(tmp_path / "f"), cache_dir=str(tmp_path / "c"),
                num_classes=3, resolution=16, eval_fraction=0.25)
  c.eval.update(feature_net=str(tmp_path / "quick.npz"), feature_steps=300,
                reference_examples=1000)
  real, _ = data.sample_examples(c.data, 60, seed=5, split=c.data.split)
  noise = np.random.default_rng(0).uniform(-1, 1, real.shape).astype(np.float32)
  good, bad = quality.score(c, real), quality.score(c, noise)
  assert good["real_shape_score"] > 2.5 and good["shape_score"] > 2.5, good
  assert good["quick_fd"] < 0.2 * bad["quick_fd"], (good, bad)
  assert good["features_accuracy"] > 0.9
  assert " accurate on the held-out " in good["features_quality"]
  assert "accurate on the held-out" in quality.line(good)


def test_one_flag_points_every_cascade_stage_at_a_folder_and_trains_them(tmp_path, caplog):
  """`cascade_32_64:tiny,folder=DIR`: both stages read the folder, each at its own resolution
  (8 and 16), with its 3 classes (the default preset conditions on them); the 12x12 images are upsampled for the 16x16
  stage, which the log says."""
  from difflax import cascade
  from difflax import config as config_lib
  from difflax import train
  shapes_folder(tmp_path / "f", per_class=20, size=12)
  c = config_lib.load(f"cascade_32_64:tiny,folder={tmp_path / 'f'}")
  c.unlock()
  for name in cascade.stage_names(c):
    st = c.stages[name]
    st.data.cache_dir = str(tmp_path / "c")
    st.train.update(preview_every=0)
  stages = {n: cascade.stage_config(c, n).data for n in cascade.stage_names(c)}
  assert {n: (d.name, d.folder, d.resolution, d.num_classes) for n, d in stages.items()} == {
      "base": ("folder", str(tmp_path / "f"), 8, 3),
      "sr_64": ("folder", str(tmp_path / "f"), 16, 3)}
  default = config_lib.load(f"cascade_32_64:folder={tmp_path / 'f'}")  # Class-conditional.
  assert [(default.stages[n].data.num_classes, default.stages[n].model.class_conditional)
          for n in ("base", "sr_64")] == [(3, True), (3, True)]
  batch = next(data.host_batches(stages["sr_64"], seed=0))
  assert batch["image"].shape == (8, 16, 16, 3) and batch["low_res"].shape == (8, 8, 8, 3)
  assert "are smaller than 16x16 (shorter side down to 12 px)" in caplog.text
  out = train.run(c, str(tmp_path / "run"))
  assert out["base"]["step"] == 4 and out["sr_64"]["step"] == 4
  # A flat folder has no labels to condition on; a missing one fails at load time.
  save(tmp_path / "flat" / "x.png", "RGB", (8, 8), (1, 2, 3))
  flat = config_lib.load(f"progressive_cifar10:tiny,folder={tmp_path / 'flat'}")
  assert (flat.data.name, flat.data.num_classes, flat.model.class_conditional) == (
      "folder", 1, False)
  with pytest.raises(config_lib.ConfigError, match="is not a directory"):
    config_lib.load(f"ddpm_cifar10:tiny,folder={tmp_path / 'missing'}")
  assert config_lib.load("ddpm_cifar10:tiny,tfds=mnist").data.name == "mnist"


def test_a_flat_folder_gets_label_free_features_that_rank_real_above_blur_and_noise(tmp_path):
  """One class: no classifier to train, so the quick network is an autoencoder's encoder; its
  quality line is not the perfect 0 a one-class classifier gave, and real images score better
  than the same images blurred, than shuffled 4x4 patches and than noise."""
  from difflax import cascade as cascade_lib
  from difflax.evaluation import features, quality
  shapes_folder(tmp_path / "flat_src", per_class=60)
  flat = tmp_path / "flat"
  os.makedirs(flat)
  for cls in os.listdir(tmp_path / "flat_src"):
    for f in os.listdir(tmp_path / "flat_src" / cls):
      os.rename(tmp_path / "flat_src" / cls / f, flat / f"{cls}_{f}")
  c = load_config("ddpm_cifar10", f"tiny,folder={flat}")
  c.data.update(cache_dir=str(tmp_path / "c"), resolution=16, eval_fraction=0.25)
  c.eval.update(feature_net=str(tmp_path / "quick.npz"), feature_steps=400)
  assert c.data.num_classes == 1 and not c.model.class_conditional
  real, _ = data.sample_examples(c.data, 60, seed=5, split=c.data.split)
  rng = np.random.default_rng(0)
  blurred = np.asarray(cascade_lib.gaussian_blur(real, np.full(60, 1.5), kernel_size=5))
  tiles = real.reshape(60, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(60, 16, 4, 4, 3)
  shuffled = tiles[:, rng.permutation(16)].reshape(60, 4, 4, 4, 4, 3).transpose(
      0, 1, 3, 2, 4, 5).reshape(60, 16, 16, 3)
  noise = rng.uniform(-1, 1, real.shape).astype(np.float32)
  fd = {name: quality.score(c, x)["quick_fd"] for name, x in (
      ("real", real), ("blurred", blurred), ("shuffled", shuffled), ("noise", noise))}
  assert fd["real"] < fd["blurred"] < fd["noise"] and fd["real"] < fd["shuffled"], fd
  assert fd["noise"] > 0.5, fd  # Not the one-class classifier's 0 for everything.
  result = quality.score(c, real)
  assert "shape_score" not in result  # No classes to score.
  net = features.load(str(tmp_path / "quick.npz"))
  assert net.meta["objective"] == "autoencoder" and net.meta["heldout_r2"] > 0.5, net.meta
  assert "label-free autoencoder features, reconstructing" in quality.line(result)
