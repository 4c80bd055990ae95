"""Command-line plumbing shared by every difflax entry point (`difflax.main` and the tools'
`python -m difflax.<module>` CLIs).

Contract: `define_config_flag()` defines `--config` (a packaged config's name or a file path,
with an optional `:arg`); `run(main)` runs an absl app whose `--config.a.b=value` (or
`--config.a.b value`) overrides are set aside before absl parses the rest. Every flag mistake
(an unknown flag, with the closest one; a value a flag cannot take; a stray argument) is one
line on stderr and exit status 2, never a traceback or a page of usage. `load_config()` returns
`config.load(FLAGS.config, overrides)`, or prints the `ConfigError` (a missing `--config`
included) as one line and exits with status 2. `fail(message)` is that exit for any other error
a user can fix. `list_configs()` is the text of `--list_configs`.
"""
from __future__ import annotations

import os
import re
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


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing of everything but `--config.a.b=value` / `--config.a.b value`; mistakes are
  one line and exit 2."""
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
  try:
    left = FLAGS(rest)
  except flags.Error as e:
    fail(" ".join(str(e).split()) + " (--help lists the flags).")
  if len(left) > 1:
    fail(f"unexpected argument(s) {' '.join(left[1:])!r}: flags take the form --name=value "
         "(--help lists them).")
  return left


def fail(message: str, status: int = 2):
  print(f"difflax: {message}", file=sys.stderr)
  sys.exit(status)


def load_config():
  if not FLAGS.config:
    fail("missing --config: a packaged config's name (--list_configs lists them) or a "
         "config file, e.g. --config=ddpm_cifar10 or --config=configs/ddpm_cifar10.py:tiny.")
  try:
    return config_lib.load(FLAGS.config, _OVERRIDES)
  except config_lib.ConfigError as e:
    fail(str(e))


def list_configs() -> str:
  """One line per packaged config: name, presets and the first line of its docstring."""
  lines = []
  for name in config_lib.packaged_names():
    module = config_lib.load_module(os.path.join(config_lib.CONFIG_DIR, name + ".py"))
    doc = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
    doc = re.split(r"(?<=[a-z0-9)])\. (?=[A-Z])", doc)[0].rstrip(".")
    doc = doc if len(doc) <= 90 else doc[:87] + "..."
    presets = ", ".join(getattr(module, "PRESETS", ()))
    lines.append(f"{name:22s} [{presets}]  {doc}")
  return "\n".join(lines + ["Every config also takes :folder=PATH and :tfds=NAME (your data), "
                            "and --config.block.key=value overrides."])


def run(main: Callable) -> None:
  app.run(main, flags_parser=parse_flags)
