"""Pytree paths, flat dicts and content hashes: the one way difflax names and fingerprints leaves.

Contract (pure, numpy / jax agnostic):
  `path_str(key_path) -> "params/down_32/res_0/conv_0/kernel"` for a jax key path (dict keys,
    attribute names and sequence indices joined by "/"); every module that prints, shards, saves
    or compares parameters by path uses it, so one path reads the same everywhere.
  `flatten(tree) -> {"a/b/c": leaf}` and `unflatten(flat) -> nested dicts` (inverse for dict trees).
  `content_hash(tree, digits=12)`: hex SHA-256 over sorted (path, float32 bytes) pairs, so equal
    weights give equal hashes whatever their container type or dict order.
"""
from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np


def path_str(path) -> str:
  """'params/down_32/res_0/conv_0/kernel' for a jax key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
  """{"a/b/c": leaf} for every leaf of `tree`."""
  return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[str, Any]) -> dict:
  """Nested dicts from {"a/b/c": leaf} (the inverse of `flatten` for trees of dicts)."""
  tree: dict = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def content_hash(tree: Any, digits: int = 12) -> str:
  """First `digits` hex digits of SHA-256 over the sorted (path, float32 bytes) of the leaves."""
  h = hashlib.sha256()
  for key, leaf in sorted(flatten(tree).items()):
    h.update(key.encode())
    h.update(np.ascontiguousarray(np.asarray(leaf), np.float32).tobytes())
  return h.hexdigest()[:digits]
