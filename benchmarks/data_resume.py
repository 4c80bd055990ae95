"""Cost of resuming the input stream at step S: time to the first batch at S = 10 and S = 10^6.

Issue 11's requirement: a resume late in a long run costs what an early one costs. In-memory
datasets (embedded, folder caches) and TFDS datasets prepared as ArrayRecord are read by index
(`data.index_batches`); TFDS's default TFRecord format streams through tf.data and replays S
batches, measured here at a small S for contrast. The TFDS datasets are generated locally
(random 32x32 images), nothing downloads.

  python benchmarks/data_resume.py [--examples 2000] [--batch-size 64] [--tfrecord-steps 200]
"""
from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import numpy as np


def first_batch_secs(make):
  t0 = time.perf_counter()
  next(make())
  return time.perf_counter() - t0


@functools.cache
def builder_class(n: int):
  import tensorflow_datasets as tfds

  class DifflaxBenchRecords(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(32, 32, 3)),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for i in range(n):
        yield i, {"image": rng.integers(0, 256, (32, 32, 3), np.uint8), "label": i % 10}
  return DifflaxBenchRecords


def build(data_dir: str, n: int, file_format: str):
  builder_class(n)(data_dir=data_dir, file_format=file_format).download_and_prepare()


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--examples", type=int, default=2000)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--tfrecord-steps", type=int, default=200)
  args = p.parse_args()
  from difflax import config as config_lib
  from difflax import data
  c = config_lib.base_config().data
  c.update(resolution=32, batch_size=args.batch_size, num_examples=args.examples)
  b, out = args.batch_size, {"examples": args.examples, "batch_size": args.batch_size}
  images, labels = data.embedded_dataset(args.examples, 32)
  for s in (10, 10**6):
    out[f"embedded_s{s}"] = first_batch_secs(
        lambda: data.array_batches(images, labels, b, seed=0, start_step=s))
  with tempfile.TemporaryDirectory() as tmp:
    for fmt, steps in (("array_record", (10, 10**6)), ("tfrecord", (10, args.tfrecord_steps))):
      d = f"{tmp}/{fmt}"
      build(d, args.examples, fmt)
      c.update(name="difflax_bench_records", data_dir=d, num_classes=10)
      for s in steps:
        out[f"tfds_{fmt}_s{s}"] = first_batch_secs(
            lambda: data.tfds_batches(c, "train", b, seed=0, start_step=s))
  out["embedded_ratio_late_vs_early"] = out["embedded_s1000000"] / out["embedded_s10"]
  out["array_record_ratio_late_vs_early"] = (out["tfds_array_record_s1000000"] /
                                             out["tfds_array_record_s10"])
  out["tfrecord_ratio"] = out[f"tfds_tfrecord_s{args.tfrecord_steps}"] / out["tfds_tfrecord_s10"]
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
