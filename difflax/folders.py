"""Folder-of-images datasets: listing, decoding and a memory-mapped decode cache.

Contract: `load(root, resolution, channels=3, background=(255, 255, 255), skip_bad_images=False,
cache_dir="")` -> `(images: uint8 [N, R, R, C] (an `np.memmap`), labels: int32 [N], classes,
paths: [N] each row's file relative to root)`. `held_out(paths, fraction)` -> bool [N]: the rows
of the held-out (eval) split, chosen by a hash of each relative path, so a file stays in its
split when others are added or removed, on every machine; `split_rows` the row indices of one.
`balanced_draw(labels, num, seed)`: a seeded draw of rows spread evenly over the classes.
  Layout: class subfolders of `root` become labels in sorted name order (`classes`); images
  directly in a flat folder get label 0 (`classes == []`). `root` may end in a slash or be a
  symlink; symlinked subfolders are followed; hidden files and non-image files are ignored.
  Decoding: images with alpha (RGBA, LA, P with a transparency entry) are composited over
  `background` before anything else, then center-cropped to a square and resized (Lanczos,
  antialiased) to R x R; `channels=1` keeps one grey channel, 3 converts to RGB. An unreadable or
  truncated file raises `BadImageError` naming it, or with `skip_bad_images` is skipped and counted.
  Cache: the first call decodes every file once into `<cache_dir>/<key>/images.npy` (written row
  by row into a memory map, so folders larger than RAM work) with `labels.npy` and `meta.json`;
  the key hashes the file list with sizes and mtimes and every decoding setting, so a changed
  folder gets a new cache and later calls only memory-map the array (no image is opened). One
  process builds while the others wait on a lock file, on a shared or a per-host file system alike.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings

import numpy as np

from difflax import images

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
RECIPE = 2  # Bump when decoding or the cache's contents change: folders are decoded again.
DEFAULT_CACHE = os.path.join("~", ".cache", "difflax", "folders")


class DatasetNotAvailableError(RuntimeError):
  """Raised when a dataset is not on this machine; nothing is ever downloaded."""


class DatasetError(ValueError):
  """The data on disk cannot serve the config: the message says what to change."""


class BadImageError(DatasetError):
  """An image file of a folder dataset cannot be read."""


def list_files(root: str) -> tuple[list[tuple[str, int]], list[str]]:
  """([(path, label)], classes) in a deterministic order (see the module docstring)."""
  root = os.path.normpath(root)
  visible = lambda names: sorted(n for n in names if not n.startswith("."))
  classes = [d for d in visible(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
  files = []
  for label, sub in enumerate(classes or [""]):
    top = os.path.join(root, sub) if sub else root
    for dirpath, dirnames, names in os.walk(top, followlinks=True):
      dirnames[:] = visible(dirnames) if classes else []  # A flat folder: its own files only.
      files += [(os.path.join(dirpath, f), label) for f in visible(names)
                if f.lower().endswith(IMAGE_EXTENSIONS)]
  return files, classes


def decode(path: str, resolution: int, channels: int = 3, background=(255, 255, 255),
           sides: list | None = None) -> np.ndarray:
  """One file -> uint8 [R, R, C]: alpha composited over `background`, center crop, resize
  (`sides`, if given, gets the image's shorter side)."""
  from PIL import Image
  with Image.open(path) as im:
    im.load()
    if sides is not None:
      sides.append(min(im.size))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
      with warnings.catch_warnings():  # PIL's palette-transparency note: handled right here.
        warnings.simplefilter("ignore")
        rgba = im.convert("RGBA")
      base = Image.new("RGBA", rgba.size, tuple(int(v) for v in background) + (255,))
      im = Image.alpha_composite(base, rgba)
    return images.center_crop_resize(im, resolution, channels)


def cache_key(files, resolution: int, channels: int, background, skip_bad_images: bool) -> str:
  h = hashlib.sha256(json.dumps([RECIPE, resolution, channels, list(background),
                                 bool(skip_bad_images)]).encode())
  for path, label in files:
    st = os.stat(path)
    h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


def _build(out_dir: str, files, resolution, channels, background, skip_bad_images):
  """Decodes `files` into a temporary directory next to `out_dir`, then renames it."""
  tmp = f"{out_dir}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  images = np.lib.format.open_memmap(os.path.join(tmp, "images.npy"), "w+", np.uint8,
                                     (len(files), resolution, resolution, channels))
  labels, bad, sides, t0 = [], [], [], time.perf_counter()
  for path, label in files:
    try:
      images[len(labels)] = decode(path, resolution, channels, background, sides)
      labels.append(label)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files.
      if not skip_bad_images:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BadImageError(f"Cannot read image {path} ({type(e).__name__}: {e}). Fix or remove "
                            "it, or set --config.data.skip_bad_images=True to skip such files.")
      bad.append(path)
  images.flush()
  del images
  n = len(labels)
  if not n:
    shutil.rmtree(tmp, ignore_errors=True)
    raise DatasetError(f"None of the {len(files)} images is readable (e.g. {bad[0]}).")
  if bad:
    logging.warning("Skipped %d unreadable image(s) (data.skip_bad_images), e.g. %s.", len(bad),
                    bad[0])
    full = np.load(os.path.join(tmp, "images.npy"), mmap_mode="r")
    kept = np.lib.format.open_memmap(os.path.join(tmp, "kept.npy"), "w+", np.uint8,
                                     (n,) + full.shape[1:])
    for lo in range(0, n, 1024):  # Without the unused tail rows, in chunks (RAM stays flat).
      kept[lo:lo + 1024] = full[lo:min(lo + 1024, n)]
    kept.flush()
    del full, kept
    os.replace(os.path.join(tmp, "kept.npy"), os.path.join(tmp, "images.npy"))
  np.save(os.path.join(tmp, "labels.npy"), np.asarray(labels, np.int32))
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump({"num": n, "skipped": bad, "resolution": resolution, "channels": channels,
               "background": list(background), "seconds": time.perf_counter() - t0,
               "upsampled": sum(side < resolution for side in sides),
               "smallest_side": min(sides)}, f)
  try:
    os.rename(tmp, out_dir)
  except OSError:  # Another process finished the same cache first.
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("Decoded %d images into %s in %.1fs.", n, out_dir, time.perf_counter() - t0)


def load(root: str, resolution: int, channels: int = 3, background=(255, 255, 255),
         skip_bad_images: bool = False, cache_dir: str = "", wait_secs: float = 3600.0):
  """(images memmap [N, R, R, C] uint8, labels [N] int32, classes); see the module docstring."""
  if not root or not os.path.isdir(root):
    raise DatasetNotAvailableError(f"config.data.folder={root!r} is not a directory; point it at "
                                   "a folder of images (subfolders = classes).")
  files, classes = list_files(root)
  if not files:
    raise DatasetNotAvailableError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root}.")
  key = cache_key(files, resolution, channels, background, skip_bad_images)
  base = os.path.expanduser(cache_dir or DEFAULT_CACHE)
  out_dir = os.path.join(base, f"{os.path.basename(os.path.normpath(root))}_{resolution}px_{key}")
  lock = out_dir + ".lock"
  deadline = time.monotonic() + wait_secs
  while not os.path.exists(os.path.join(out_dir, "meta.json")):
    os.makedirs(base, exist_ok=True)
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # Another process decodes: wait for its result.
      if time.monotonic() > deadline:
        raise DatasetError(f"Waited {wait_secs:.0f}s for {lock} (another process decoding "
                           f"{root}); if no process is, delete the lock file.")
      time.sleep(0.5)
      continue
    try:
      os.write(fd, str(os.getpid()).encode())
      os.close(fd)
      logging.info("Decoding %d images of %s (once; cached in %s).", len(files), root, out_dir)
      _build(out_dir, files, resolution, channels, background, skip_bad_images)
    finally:
      os.remove(lock)
  images = np.load(os.path.join(out_dir, "images.npy"), mmap_mode="r")
  labels = np.load(os.path.join(out_dir, "labels.npy"))
  with open(os.path.join(out_dir, "meta.json")) as f:
    meta = json.load(f)
  if meta.get("upsampled"):  # Blurrier than the resolution promises: say so on every run.
    logging.warning("%d of %d images of %s are smaller than %dx%d (shorter side down to %d px) "
                    "and are upsampled; a lower data.resolution matches them.", meta["upsampled"],
                    meta["num"], root, resolution, resolution, meta["smallest_side"])
  skipped = set(meta["skipped"])
  root = os.path.normpath(root)
  paths = [os.path.relpath(p, root) for p, _ in files if p not in skipped]
  return images, labels, classes, paths


def split_rows(paths, fraction: float, held: bool) -> np.ndarray:
  """Rows of the held-out split (`held`) or of the rest; every row when the hash holds none or
  all of the files out (`fraction=0`, or a folder too small), which the log says."""
  if not 0 <= fraction < 1:
    raise DatasetError(f"config.data.eval_fraction={fraction} must be in [0, 1).")
  mask = held_out(paths, fraction)
  if mask.any() and not mask.all():
    return np.flatnonzero(mask if held else ~mask)
  if fraction:
    logging.warning("%d images leave no held-out split at data.eval_fraction=%g; evaluation "
                    "uses the training images.", len(paths), fraction)
  return np.arange(len(paths))


def held_out(paths, fraction: float) -> np.ndarray:
  """bool [N]: True for the rows whose relative path hashes below `fraction` (SHA-1 as a number
  in [0, 1)): about `fraction` of the folder, fixed per file."""
  u = np.array([int(hashlib.sha1(p.replace(os.sep, "/").encode()).hexdigest()[:15], 16)
                for p in paths], np.float64) / 16 ** 15
  return u < fraction


def balanced_draw(labels: np.ndarray, num: int, seed: int) -> np.ndarray:
  """`min(num, N)` distinct indices into labels [N], drawn at random and as evenly over the label
  values as the data allow (round robin over the classes in a random order): real and reference
  sets that stand for the whole dataset, whatever order its files are in."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(labels))
  lab = np.asarray(labels)[order]
  rank = np.zeros(len(lab), np.int64)
  for c in np.unique(lab):
    at = lab == c
    rank[at] = np.arange(at.sum())
  return order[np.lexsort((rng.random(len(lab)), rank))[:num]]
