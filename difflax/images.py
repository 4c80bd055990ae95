"""Image I/O at the framework's edges: [-1, 1] float <-> uint8, grids and PNG files.

Contract: `to_uint8(x: [B, H, W, C] in [-1, 1]) -> uint8 [B, H, W, C]`; `make_grid(images, ncol)`
tiles [B, H, W, C] uint8 into one [rows*(H+pad), ncol*(W+pad), C] image; `save_png(path, image)`
writes it (single-channel grids as grey, small grids upscaled); `make_pair_grid(low, high)` shows
each super-resolution sample next to its low-res input. Nothing here touches devices.
"""
from __future__ import annotations

import math
import os

import numpy as np


def to_uint8(x) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
  b, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(b)))
  nrow = int(math.ceil(b / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i in range(b):
    r, col = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  return grid


def make_pair_grid(low, high) -> np.ndarray:
  """low: [B, h, w, C] conditioning (float, may be noised), high: [B, H, W, C] uint8 or float
  outputs -> one grid whose cells are [low nearest-upsampled to H | high]."""
  high = high if np.asarray(high).dtype == np.uint8 else to_uint8(high)
  f = high.shape[1] // low.shape[1]
  up = to_uint8(np.repeat(np.repeat(np.asarray(low), f, 1), f, 2))
  return make_grid(np.concatenate([up, high], axis=2))


def save_png(path: str, image: np.ndarray, min_width: int = 256) -> str:
  """Writes a uint8 [H, W, C] image, nearest-upscaled by an integer factor to >= min_width px so
  grids of small images stay viewable."""
  from PIL import Image
  factor = max(1, -(-min_width // image.shape[1]))
  image = image.repeat(factor, axis=0).repeat(factor, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image = image[..., 0] if image.shape[-1] == 1 else image
  tmp = path + ".tmp.png"
  Image.fromarray(image).save(tmp)
  os.replace(tmp, path)
  return path
