"""difflax: train, sample, evaluate and plan diffusion models from a config.

  python -m difflax.main --config=NAME[:presets] --workdir=DIR [--mode=MODE] [--config.a.b=V]

  --config=cascade_32_64            a packaged config (--list_configs), or configs/x.py, with
                                    ':tiny', ':paper', ':folder=/your/images', ... after it
  --mode=train,sample               train | sample | eval | sweep | plan, several in order
  --config.optim.lr=3e-4            override any field (--print_config shows them all)
  --dry_run                         check config, data and workdir, build nothing
  --mode=plan --topology=v5e:16x16  compile for a TPU slice: memory, FLOPs, a verdict

Mistakes print one line saying what to do and exit with status 2; --helpfull lists every
library's flags.
"""
import os

import jax
from absl import flags
from absl import logging

from difflax import checkpoint
from difflax import cli
from difflax import config as config_lib
from difflax import data
from difflax import fileio
from difflax import parallel
from difflax import modes
from difflax import train
from difflax.evaluation import inception

cli.define_config_flag()
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_string("mode", "train", f"What to do: {', '.join(modes.MODES)} (sweep: a "
                    "cascade's augmentation-level sweep), or several in order in one process, "
                    "comma separated (train,sample).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize(): auto = with the flags below or when a "
                  "multi-process cluster (TPU pod, SLURM, Open MPI) is detected.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for multi-process runs "
                    "(default: $JAX_COORDINATOR_ADDRESS or auto-detected).")
flags.DEFINE_integer("num_processes", 0, "Processes in the job (0: auto-detected).")
flags.DEFINE_integer("process_id", -1, "This process's index, 0..num_processes-1 (-1: auto).")
flags.DEFINE_string("topology", "local", "--mode=plan: compile for this TPU topology (JAX's "
                    "names: v4:2x2x4, v5e:16x16, v5p:4x4x4, v6e:8x8; needs the [tpu] extra) or "
                    "'local' (this process's devices).")
flags.DEFINE_float("mfu", 0.4, "--mode=plan: fraction of the device's peak FLOP/s assumed for "
                   "projected step times.")
flags.DEFINE_float("hbm_gib", 0.0, "--mode=plan: memory per device in GiB (0: the device's "
                   "own, from the table in difflax/plan.py).")
flags.DEFINE_string("compilation_cache", "~/.cache/difflax/jax",
                    "Persistent XLA compilation cache ('' disables); reruns and resumes skip "
                    "most of the compile.")
flags.DEFINE_bool("list_configs", False, "List the packaged configs and their presets, then "
                  "exit.")
flags.DEFINE_bool("print_config", False, "Print the resolved config (presets and overrides "
                  "applied) as JSON, then exit.")
flags.DEFINE_bool("dry_run", False, "Check the config, its data source and the workdir, then "
                  "exit without building or writing anything.")
FLAGS = flags.FLAGS

# What a user can fix without reading code: one line and exit status 2.
USER_ERRORS = (config_lib.ConfigError, data.DatasetNotAvailableError, data.DatasetError,
               checkpoint.CheckpointMismatchError, checkpoint.CheckpointCorruptError,
               inception.WeightsNotAvailableError, fileio.BusyError,
               FileNotFoundError)


def main(argv):
  del argv  # cli.parse_flags refused anything that is not a flag.
  if FLAGS.list_configs:
    print(cli.list_configs())
    return
  config = cli.load_config()
  if FLAGS.print_config:
    print(config.to_json_best_effort(indent=2))
    return
  if not FLAGS.workdir:
    cli.fail("missing --workdir: the directory for this run's checkpoints, metrics and samples "
             "(e.g. --workdir=runs/ddpm); rerunning with the same one resumes.")
  if FLAGS.dry_run:
    try:
      print(modes.check(config, FLAGS.workdir, FLAGS.mode))
    except USER_ERRORS as e:
      cli.fail(" ".join(str(e).split("\n")))
    return
  if FLAGS.compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
  logging.set_verbosity(logging.INFO)
  parallel.maybe_initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address,
                                        FLAGS.num_processes, FLAGS.process_id)
  # Orbax and TF log every file they touch at INFO; keep the run's own progress readable.
  quiet = lambda r: r.levelno >= 30 or not any(
      s in r.pathname for s in ("/orbax/", "/tensorflow", "/jax/_src/"))
  for handler in (logging.get_absl_handler(), logging.get_absl_handler().python_handler):
    handler.addFilter(quiet)
  try:
    train.run(config, FLAGS.workdir, FLAGS.mode,
              plan_options={"topology": FLAGS.topology, "mfu": FLAGS.mfu,
                            "hbm_gib": FLAGS.hbm_gib})
  except USER_ERRORS as e:
    cli.fail(" ".join(str(e).split("\n")))
  except FloatingPointError as e:  # NaN loss or samples: the message says what was kept.
    cli.fail(str(e), status=1)


if __name__ == "__main__":
  cli.run(main)
