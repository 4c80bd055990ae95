"""The embedded offline dataset: procedural coloured shapes (pure numpy), in two styles.

Contract: `embedded_dataset(num_examples, resolution, num_classes=10, seed=0, split="train",
style="plain")` -> (images uint8 [N, R, R, 3], labels int32 [N]), deterministic per (seed, split,
style), the "test" and "validation" splits drawn from disjoint seeds, classes balanced (label =
index mod num_classes). `STYLES`: "plain" (the default: one large bright shape filling about
half the frame on a flat, dark, muted background: what a small model learns to draw in minutes
on a CPU) and "textured" (smaller shapes anywhere in the frame on striped / checked / gradient
backgrounds: the harder original). Each example is a set of continuous parameters
(`embedded_params`) rendered analytically (`render_embedded`, area-averaged supersampling), so
any resolution can be rendered and low- and high-resolution views of an example agree (what
cascade stages rely on). `SHAPES` are the classes; `MAX_TILT` the most a shape is rotated.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os

import numpy as np

STYLES = ("plain", "textured")
SHAPES = ("disc", "square", "triangle", "diamond", "ring", "cross", "hbar", "vbar", "half_disc",
          "star")
# Shapes stand upright, tilted by at most 15 degrees: under any rotation an hbar and a vbar are
# one distribution, and a square is a diamond of another size, so no viewer (or classifier)
# could tell those classes apart.
MAX_TILT = np.pi / 12


def _shape_mask(kind: str, u, v):
  """Inside test for a unit shape in local coordinates u, v: [N, P] -> bool [N, P]."""
  r = np.sqrt(u ** 2 + v ** 2)
  if kind == "disc":
    return r < 1
  if kind == "square":
    return (np.abs(u) < 0.8) & (np.abs(v) < 0.8)
  if kind == "triangle":
    return (v > -0.7) & (v < 1.0 - 1.7 * np.abs(u) * 1.0) & (np.abs(u) < 1)
  if kind == "diamond":
    return np.abs(u) + np.abs(v) < 1
  if kind == "ring":
    return (r < 1) & (r > 0.55)
  if kind == "cross":
    return ((np.abs(u) < 0.3) & (np.abs(v) < 1)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1))
  if kind == "hbar":
    return (np.abs(u) < 1) & (np.abs(v) < 0.35)
  if kind == "vbar":
    return (np.abs(v) < 1) & (np.abs(u) < 0.35)
  if kind == "half_disc":
    return (r < 1) & (v > 0)
  theta = np.arctan2(v, u)
  return r < 0.55 + 0.45 * np.cos(5 * theta)  # star


def _hsv_to_rgb(h, s, v):
  i = np.floor(h * 6).astype(int) % 6
  f = h * 6 - np.floor(h * 6)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
  return np.stack([np.choose(i, [row[c] for row in table]) for c in range(3)], axis=-1)


def embedded_params(num_examples: int, num_classes: int = 10, seed: int = 0,
                    style: str = "plain") -> dict:
  """Continuous per-example scene parameters; rendering them is `render_embedded`."""
  if not 1 <= num_classes <= len(SHAPES):
    raise ValueError(f"The embedded dataset has at most {len(SHAPES)} classes, asked for "
                     f"{num_classes}.")
  if style not in STYLES:
    raise ValueError(f"Unknown embedded style {style!r}; valid: {', '.join(STYLES)}.")
  rng = np.random.default_rng(seed)
  n = num_examples
  if style == "plain":
    # Shapes span 55-75 % of the frame near its centre (a star's tips stay inside), on one flat
    # colour darker and greyer than any shape's: every pixel is shape or background.
    return dict(
        label=(np.arange(n) % num_classes).astype(np.int32),
        cx=rng.uniform(-0.12, 0.12, n), cy=rng.uniform(-0.12, 0.12, n),
        size=rng.uniform(0.55, 0.75, n), angle=rng.uniform(-MAX_TILT, MAX_TILT, n),
        fg_hue=rng.uniform(0, 1, n), fg_val=rng.uniform(0.8, 1.0, n),
        bg_hue=rng.uniform(0, 1, (n, 2)), bg_val=np.repeat(rng.uniform(0.1, 0.3, (n, 1)), 2, 1),
        bg_sat=np.full(n, 0.3), pattern=np.full(n, 3), freq=np.zeros(n),
        pattern_angle=np.zeros(n))
  return dict(
      label=(np.arange(n) % num_classes).astype(np.int32),
      cx=rng.uniform(-0.35, 0.35, n), cy=rng.uniform(-0.35, 0.35, n),
      size=rng.uniform(0.3, 0.55, n), angle=rng.uniform(-MAX_TILT, MAX_TILT, n),
      fg_hue=rng.uniform(0, 1, n), fg_val=rng.uniform(0.7, 1.0, n),
      bg_hue=rng.uniform(0, 1, (n, 2)), bg_val=rng.uniform(0.15, 0.55, (n, 2)),
      pattern=rng.integers(0, 3, n), freq=rng.uniform(2, 6, n),
      pattern_angle=rng.uniform(0, np.pi, n), bg_sat=np.full(n, 0.6))


def render_embedded(params: dict, resolution: int, supersample: int = 2,
                    chunk: int = 256) -> np.ndarray:
  """Renders scene parameters to uint8 images [N, R, R, 3] (area-averaged supersampling).

  Chunks render on a few threads (numpy's ufuncs release the GIL) and each background pattern
  is evaluated only on the rows that use it: the same pixels as one full pass, several times
  faster (4,096 images at 64x64 took 32 s in one pass on 2 cores)."""
  n = len(params["label"])
  s = supersample
  grid = (np.arange(resolution * s) + 0.5) / (resolution * s) * 2 - 1
  yy, xx = np.meshgrid(grid, grid, indexing="ij")
  xx, yy = xx.reshape(1, -1), yy.reshape(1, -1)
  out = np.empty((n, resolution, resolution, 3), np.uint8)

  def render(lo):
    p = {k: v[lo:lo + chunk] for k, v in params.items()}
    m = len(p["label"])
    col = lambda a: a.reshape(-1, 1)
    # Background: stripes, checkerboard, a smooth gradient between two colours, or flat (3).
    w = np.zeros((m, xx.shape[1]))
    for kind in range(3):
      rows = p["pattern"] == kind
      if not rows.any():
        continue
      angle, freq = col(p["pattern_angle"][rows]), col(p["freq"][rows])
      proj = xx * np.cos(angle) + yy * np.sin(angle)
      if kind == 2:
        w[rows] = (proj + 1.5) / 3
        continue
      wave = np.sin(np.pi * freq * proj)
      if kind == 1:
        orth = -xx * np.sin(angle) + yy * np.cos(angle)
        wave = wave * np.sin(np.pi * freq * orth)
      w[rows] = (wave > 0).astype(np.float64)
    w = w[..., None]
    c0 = _hsv_to_rgb(p["bg_hue"][:, 0], p["bg_sat"], p["bg_val"][:, 0])[:, None, :]
    c1 = _hsv_to_rgb(p["bg_hue"][:, 1], p["bg_sat"], p["bg_val"][:, 1])[:, None, :]
    img = c0 * (1 - w) + c1 * w
    # Foreground shape, rotated and scaled; shape kind is the class.
    dx, dy = (xx - col(p["cx"])) / col(p["size"]), (yy - col(p["cy"])) / col(p["size"])
    ca, sa = np.cos(col(p["angle"])), np.sin(col(p["angle"]))
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    mask = np.zeros(u.shape, bool)
    for k, kind in enumerate(SHAPES):
      rows = p["label"] == k
      if rows.any():
        mask[rows] = _shape_mask(kind, u[rows], v[rows])
    fg = _hsv_to_rgb(p["fg_hue"], 0.9, p["fg_val"])[:, None, :]
    img = np.where(mask[..., None], fg, img)
    img = img.reshape(m, resolution, s, resolution, s, 3).mean(axis=(2, 4))
    out[lo:lo + m] = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)

  with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
    list(pool.map(render, range(0, n, chunk)))
  return out


@functools.lru_cache(maxsize=8)
def embedded_dataset(num_examples: int, resolution: int, num_classes: int = 10,
                     seed: int = 0, split: str = "train",
                     style: str = "plain") -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, R, R, 3], labels int32 [N]); the "test" split uses disjoint seeds."""
  split_seed = {"train": seed, "test": seed + 10_007, "validation": seed + 20_011}
  if split not in split_seed:
    raise ValueError(f"The embedded dataset has splits {sorted(split_seed)}, not {split!r}.")
  params = embedded_params(num_examples, num_classes, split_seed[split], style)
  return render_embedded(params, resolution), params["label"]
