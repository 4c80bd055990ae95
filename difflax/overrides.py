"""Command-line overrides of a config: `override(c, "optim.lr", "3e-4")` sets a field from a
string parsed to the field's type; a mistake is a `ConfigError` naming the block, the closest
key and the block's keys (`unknown_key`).
"""
from __future__ import annotations

import ast
import difflib
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config, preset or override that cannot work; the message says what to change."""


def unknown_key(node: ml_collections.ConfigDict, key: str, where: str) -> ConfigError:
  """Names the block, the closest valid key and the block's keys (`key` "" : a block itself)."""
  keys = sorted(node.keys())
  initials = lambda k: "".join(w[:1] for w in k.split("_"))  # learning_rate ~ lr
  close = difflib.get_close_matches(key, keys, n=1) or [
      k for k in keys if key and initials(key) in (k, initials(k))][:1]
  hint = f" Did you mean {where}.{close[0]}?" if close else ""
  what = f"Unknown config key {where}.{key}." if key else f"{where} is a block, not a value."
  return ConfigError(f"{what}{hint} {where} has: {', '.join(keys)}.")


def parse_value(raw: str, old: Any, name: str):
  """A command-line string as the type of the field it replaces."""
  try:
    if isinstance(old, bool):
      low = raw.strip().lower()
      if low not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError
      return low in ("true", "1", "yes")
    if isinstance(old, int):
      value = float(raw) if any(ch in raw for ch in ".eE") else int(raw)
      if value != int(value):
        raise ValueError
      return int(value)
    if isinstance(old, float):
      return float(raw)
    if isinstance(old, (tuple, list)):
      if not raw.strip() or raw.strip() in ("()", "[]"):
        return ()
      value = ast.literal_eval(raw if raw.strip()[0] in "([" else f"({raw},)")
      return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if isinstance(old, str) or old is None:
      return raw
  except (ValueError, SyntaxError):
    pass
  raise ConfigError(f"--config.{name}={raw!r} is not a valid {type(old).__name__} "
                    f"(current value {old!r}).")


def override(c: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
  """Sets config field `dotted` ("optim.lr", "stages.sr_64.train.num_steps") from a string."""
  node, where = c, "config"
  *blocks, field = dotted.split(".")
  for b in blocks:
    if b not in node or not isinstance(node[b], ml_collections.ConfigDict):
      raise unknown_key(node, b, where)
    node, where = node[b], f"{where}.{b}"
  if field not in node:
    raise unknown_key(node, field, where)
  if isinstance(node[field], ml_collections.ConfigDict):
    raise unknown_key(node[field], "", f"{where}.{field}")
  value = parse_value(raw, node[field], dotted)
  try:
    node[field] = value
  except TypeError as e:
    raise ConfigError(f"--config.{dotted}={raw!r}: {e}") from e
