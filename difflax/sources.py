"""Where a config's data comes from, for every config file: the `:folder=PATH` and `:tfds=NAME`
parts of `--config=NAME:arg`, applied by `config.load` after the file's own presets.

Contract: `split_arg("tiny,folder=/data/x") -> ("tiny", {"folder": "/data/x"})` takes the data
source out of a config argument; `apply(config, source)` points every stage of a cascade (or the
one model, progressive growth included) at it, each stage at its own resolution: a folder sets
`data.name="folder"`, `data.folder` and `data.num_classes` from its class subfolders (a flat
folder: one class, and class conditioning off), a TFDS name sets `data.name`. A folder that is
not there raises `SourceError` (a ValueError) at load time, before anything is built.
"""
from __future__ import annotations

import os

from difflax import cascade
from difflax import folders

KEYS = ("folder", "tfds")


class SourceError(ValueError):
  """A `:folder=` / `:tfds=` that cannot be used; the message says why."""


def split_arg(arg: str | None) -> tuple[str, dict]:
  """The config argument without its data source, and the source {"folder"|"tfds": value}."""
  rest, source = [], {}
  for token in filter(None, (arg or "").split(",")):
    key, eq, value = token.partition("=")
    if eq and key.strip() in KEYS:
      source[key.strip()] = value.strip()
    else:
      rest.append(token)
  if len(source) > 1:
    raise SourceError(f"Give one data source, :folder=PATH or :tfds=NAME, not both ({source}).")
  return ",".join(rest), source


def apply(config, source: dict) -> None:
  """Sets the data source of every stage of `config` in place (see the module docstring)."""
  if not source:
    return
  stages = ([config.stages[n] for n in cascade.stage_names(config)]
            if cascade.is_cascade(config) else [config])
  if "folder" in source:
    root = os.path.expanduser(source["folder"])
    if not os.path.isdir(root):
      raise SourceError(f":folder={source['folder']} is not a directory; give a folder of "
                        "images (class subfolders become labels).")
    classes = folders.list_files(root)[1]
    for st in stages:
      st.data.update(name="folder", folder=root, num_classes=max(len(classes), 1))
      if not classes:  # A flat folder: no labels to condition on.
        st.model.class_conditional = False
  else:
    for st in stages:
      st.data.name = source["tfds"]
