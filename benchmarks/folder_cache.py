"""Folder dataset start-up: cold decode vs a cached start (memory map), side by side.

  .venv/bin/python benchmarks/folder_cache.py [--num 3000 --size 64 --resolution 32]

Writes `--num` PNG icons (RGBA shapes on transparent backgrounds, like an icon set) into a
temporary folder, then times `data.folder_dataset` twice with an empty cache directory: the first
call decodes, composites and resizes every file; the second only lists the folder, hashes sizes
and mtimes and memory-maps the array. Prints one JSON object with both times and their ratio.
"""
import argparse
import json
import os
import tempfile
import time

import _common  # noqa: F401  (puts the repository on sys.path)


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--num", type=int, default=3000)
  p.add_argument("--size", type=int, default=64, help="pixels of the PNG files")
  p.add_argument("--resolution", type=int, default=32, help="decoded resolution")
  args = p.parse_args()
  import numpy as np
  from PIL import Image
  from difflax import config as config_lib
  from difflax import data
  tmp = tempfile.mkdtemp(prefix="difflax_folder_bench_")
  folder = os.path.join(tmp, "icons")
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:args.size, :args.size] / args.size - 0.5
  for i in range(args.num):
    img = np.zeros((args.size, args.size, 4), np.uint8)
    r = rng.uniform(0.15, 0.45)
    mask = (xx - rng.uniform(-.2, .2)) ** 2 + (yy - rng.uniform(-.2, .2)) ** 2 < r * r
    img[mask, :3] = rng.integers(0, 256, 3)
    img[mask, 3] = 255
    Image.fromarray(img, "RGBA").save(os.path.join(folder, f"{i:05d}.png"))
  c = config_lib.base_config().data
  c.update(name="folder", folder=folder, resolution=args.resolution, num_classes=0,
           cache_dir=os.path.join(tmp, "cache"))
  times = []
  for _ in range(2):
    t0 = time.perf_counter()
    images, *_ = data.folder_dataset(c)
    times.append(time.perf_counter() - t0)
  print(json.dumps({"benchmark": "folder_cache", "files": args.num, "file_size": args.size,
                    "resolution": args.resolution, "cold_decode_seconds": times[0],
                    "cached_start_seconds": times[1], "speedup": times[0] / times[1],
                    "dataset_shape": list(images.shape)}))


if __name__ == "__main__":
  main()
