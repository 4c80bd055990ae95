"""Metric writers: every number a run reports goes through one clu `MetricWriter`.

Contract: `create(workdir)` returns clu's asynchronous multi-writer of (log lines, TensorBoard
events in `workdir`, `JsonlWriter(workdir/metrics.jsonl)`) on process 0 and log lines only on the
other processes (clu's multi-host convention). `JsonlWriter` is a clu-compatible writer that
appends one `{"step": s, name: value, ...}` row per `write_scalars` call, so training metrics,
clu's `steps_per_sec` / `uptime` and eval results land in one machine-readable history
(`history(workdir)` reads it back; `evaluation.evaluator.plot_history` draws it). Images, texts
and other summaries go to TensorBoard only.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from clu import metric_writers

from difflax import fileio

HISTORY = "metrics.jsonl"


class JsonlWriter(metric_writers.MetricWriter):
  """Scalars as JSON lines; everything else is ignored (TensorBoard holds it)."""

  def __init__(self, path: str):
    self.path = path

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    fileio.append_jsonl(self.path, row)

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets: Optional[Mapping[str, int]] = None):
    pass

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create(workdir: str) -> metric_writers.MetricWriter:
  if jax.process_index() > 0:
    return metric_writers.AsyncMultiWriter([metric_writers.LoggingWriter()])
  return metric_writers.AsyncMultiWriter([
      # TensorFlow's file systems take the URL itself (gs://...); fspath keeps it verbatim.
      metric_writers.LoggingWriter(), metric_writers.SummaryWriter(os.fspath(fileio.path(workdir))),
      JsonlWriter(os.path.join(workdir, HISTORY))])


def history(workdir: str) -> list[dict]:
  """The rows of workdir/metrics.jsonl, oldest first."""
  return fileio.read_jsonl(os.path.join(workdir, HISTORY))
