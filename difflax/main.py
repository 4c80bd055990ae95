"""Command-line entry point: flags only.

  python -m difflax.main --config=configs/ddpm_cifar10.py[:preset] --workdir=DIR \
      [--mode=train|sample|eval|sweep] [--config.x.y=value ...]

The config file's `get_config(arg)` returns a locked ConfigDict, so an override of a key that does
not exist fails with that key's name. Multi-process launches (TPU pods, SLURM, explicit
JAX_COORDINATOR_ADDRESS) call `jax.distributed.initialize()` before anything touches devices.
"""
import os

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':preset'.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "sweep"],
                  "What to do (sweep: a cascade's augmentation-level sweep).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize(): auto = when a multi-process cluster is detected.")
flags.DEFINE_string("compilation_cache", "~/.cache/difflax/jax",
                    "Persistent XLA compilation cache ('' disables); reruns and resumes skip "
                    "most of the compile.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
  from difflax import parallel
  parallel.maybe_initialize_distributed(FLAGS.distributed)
  logging.set_verbosity(logging.INFO)
  # Orbax and TF log every file they touch at INFO; keep the run's own progress readable.
  quiet = lambda r: r.levelno >= 30 or not any(
      s in r.pathname for s in ("/orbax/", "/tensorflow", "/jax/_src/"))
  for handler in (logging.get_absl_handler(), logging.get_absl_handler().python_handler):
    handler.addFilter(quiet)
  from difflax import train
  train.run(FLAGS.config, FLAGS.workdir, FLAGS.mode)


if __name__ == "__main__":
  app.run(main)
