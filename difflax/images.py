"""Image arrays at the framework's edges: [-1, 1] float <-> uint8, resampling, grids, PNG files.

Contract: `to_uint8(x: [B, H, W, C] in [-1, 1]) -> uint8 [B, H, W, C]`;
`block_average(x: [B, H, W, C], factor) -> [B, H/f, W/f, C]` (f x f box means, how low-resolution
variants of a dataset are made) and `nearest_upsample(x, factor) -> [B, H*f, W*f, C]`, both on
numpy or jax arrays alike (einops), the one implementation the data pipeline, growth views, the
UNet and previews share; `make_grid(images, ncol)` tiles uint8 [B, H, W, C] into one
[rows*(H+pad), ncol*(W+pad), C] image; `make_pair_grid(low, high)` shows each super-resolution
sample next to its low-res input; `png_bytes(image)` encodes one (single-channel as grey;
`fileio.save_png` writes it). `figure(**kw)` is a matplotlib Figure for plots written to files,
or None when matplotlib (the `plots` extra) is not installed. Nothing here touches devices or
files.
"""
from __future__ import annotations

import io
import math

import einops
import numpy as np



def to_uint8(x) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def block_average(x, factor: int):
  """[B, H, W, C] -> [B, H/f, W/f, C] means of f x f blocks (numpy or jax)."""
  if factor == 1:
    return x
  if x.shape[1] % factor or x.shape[2] % factor:
    raise ValueError(f"Cannot average {x.shape[1]}x{x.shape[2]} images in {factor}x{factor} "
                     "blocks: the factor must divide the image size.")
  return einops.reduce(x, "b (h p) (w q) c -> b h w c", "mean", p=factor, q=factor)


def nearest_upsample(x, factor: int):
  """[B, H, W, C] -> [B, H*f, W*f, C], each pixel repeated f x f times (numpy or jax)."""
  if factor == 1:
    return x
  return einops.repeat(x, "b h w c -> b (h p) (w q) c", p=factor, q=factor)


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
  up = to_uint8(nearest_upsample(np.asarray(low), high.shape[1] // low.shape[1]))
  return make_grid(np.concatenate([up, high], axis=2))


def png_bytes(image: np.ndarray) -> bytes:
  """The PNG encoding of a uint8 [H, W, C] image (C = 1 stored as greyscale)."""
  from PIL import Image
  image = image[..., 0] if image.shape[-1] == 1 else image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def center_crop_resize(image, resolution: int, channels: int | None = None):
  """A PIL image or uint8 array [h, w, C] -> uint8 [R, R, channels] (default C): the centred
  square, resized with Lanczos, grey <-> RGB by PIL (how folder datasets and random-access TFDS
  examples are brought to a resolution)."""
  from PIL import Image
  im = image if isinstance(image, Image.Image) else Image.fromarray(
      np.asarray(image)[..., 0] if np.asarray(image).shape[-1] == 1 else np.asarray(image))
  if channels is not None:
    im = im.convert("L" if channels == 1 else "RGB")
  side = min(im.size)
  left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
  im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution),
                                                            Image.Resampling.LANCZOS)
  out = np.asarray(im, np.uint8)
  return out[..., None] if out.ndim == 2 else out


def figure(**kwargs):
  """A `matplotlib.figure.Figure` (no pyplot, so a notebook's backend is left alone), or None
  if matplotlib (the `plots` extra) is not installed."""
  try:
    from matplotlib.figure import Figure
  except ImportError:
    return None
  return Figure(**kwargs)
