"""Command-line plumbing shared by every difflax entry point (`difflax.main` and the tools'
`python -m difflax.<module>` CLIs).

Contract: `define_config_flag()` defines `--config` (a packaged config's name or a file path,
with an optional `:arg`); `run(main)` runs an absl app whose `--config.a.b=value` (or
`--config.a.b value`) overrides are set aside before absl parses the rest; `load_config()` then
returns `config.load(FLAGS.config, overrides)`, or prints the `ConfigError` as one line and exits
with status 2. `fail(message)` is that exit for any other error a user can fix.
"""
from __future__ import annotations

import sys
from typing import Callable

from absl import app
from absl import flags

from difflax import config as config_lib

FLAGS = flags.FLAGS
_OVERRIDES: list[tuple[str, str]] = []


def define_config_flag() -> None:
  flags.DEFINE_string("config", None, "Config name (e.g. cascade_32_64) or file "
                      "(configs/x.py), optionally with ':preset,key=value'; override fields "
                      "with --config.block.key=value.")
  flags.mark_flag_as_required("config")


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing of everything but `--config.a.b=value` / `--config.a.b value`."""
  rest, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          fail(f"--config.{key} needs a value (--config.{key}=VALUE).")
        value, i = argv[i + 1], i + 1
      _OVERRIDES.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return FLAGS(rest)


def fail(message: str, status: int = 2):
  print(f"difflax: {message}", file=sys.stderr)
  sys.exit(status)


def load_config():
  try:
    return config_lib.load(FLAGS.config, _OVERRIDES)
  except config_lib.ConfigError as e:
    fail(str(e))


def run(main: Callable) -> None:
  app.run(main, flags_parser=parse_flags)
