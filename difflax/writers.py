"""Metric writers and progress reporting: every number a run reports goes through one writer.

Contract: `create(workdir)` returns a `MultiWriter` of (log lines, TensorBoard events in
`workdir`, `JsonlWriter(workdir/metrics.jsonl)`) on process 0 and log lines only on the other
processes (clu's multi-host convention). Every writer has clu's `MetricWriter` methods
(`write_scalars(step, {name: scalar})`, `write_images(step, {name: [N, H, W, C] uint8})`,
`write_texts`, `write_hparams`, `flush`, `close`), so a clu writer can stand in for any of them.
`JsonlWriter` appends one `{"step": s, name: value, ...}` row per `write_scalars` call, so
training metrics, `steps_per_sec` / `uptime` and eval results land in one machine-readable
history (`history(workdir)` reads it back; `evaluation.evaluator.plot_history` draws it).
Images and texts go to TensorBoard (and a log line) only.

`EventFileWriter` writes TensorBoard event files with tensorboardX (what PyTorch and JAX users
already install; no TensorFlow), URL logdirs through `fileio` paths, so `gs://` workdirs work as
local ones do. Nothing here imports TensorFlow or clu: `clu.metric_writers` imports TensorFlow
for its summary writer, 5 of the ~7 CPU-seconds every difflax process (each host of a pod job,
each test launch) spent starting up.

`ReportProgress(num_train_steps=, writer=, every_steps=, every_secs=60)` is clu's periodic action
of that name: called after every step, it writes `steps_per_sec` and `uptime` every
`every_steps` steps (or `every_secs`, and at the last step) and logs
"<r> steps/s, <p>% (<step>/<total>), ETA: <t> (<uptime> : <share>% <part>)", where the parts are
the wall-clock shares of its `timed(name)` blocks.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from absl import logging
import tensorboardX
import tensorboardX.record_writer

from difflax import fileio

HISTORY = "metrics.jsonl"


class MetricWriter:
  """clu's `MetricWriter` interface; every method a no-op unless a writer implements it."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    pass

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    pass

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    pass

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    self.flush()


class LoggingWriter(MetricWriter):
  """absl log lines in clu's format: `[step] name=value, ...` (sorted, floats to 6 digits)."""

  def write_scalars(self, step, scalars):
    values = [f"{k}={float(v):.6g}" for k, v in sorted(scalars.items())]
    logging.info("[%d] %s", step, ", ".join(values))

  def write_images(self, step, images):
    logging.info("[%d] Got images: %s.", step, {k: np.shape(v) for k, v in images.items()})

  def write_texts(self, step, texts):
    logging.info("[%d] Got texts: %s.", step, dict(texts))

  def write_hparams(self, hparams):
    logging.info("[Hyperparameters] %s", dict(hparams))


class JsonlWriter(MetricWriter):
  """Scalars as JSON lines; everything else is ignored (TensorBoard holds it)."""

  def __init__(self, path: str):
    self.path = path

  def write_scalars(self, step, scalars):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    fileio.append_jsonl(self.path, row)


class EventFileWriter(MetricWriter):
  """TensorBoard events in `logdir/events.out.tfevents.*`, written by tensorboardX (scalars as
  simple values, images as PNG summaries, texts as text-plugin tensors under
  `<name>/text_summary`), flushed every `flush_secs` and on `flush` / `close`. URL logdirs go
  through `fileio` paths like every other file of a run (`_UrlFiles`)."""

  def __init__(self, logdir: str, flush_secs: int = 30):
    logdir = str(logdir)
    if fileio.is_url(logdir):  # Any scheme fileio serves (gs://, s3://, a registered one).
      tensorboardX.record_writer.register_writer_factory(logdir.split(":")[0], _UrlFiles())
    self._writer = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=flush_secs)

  def write_scalars(self, step, scalars):
    for k, v in scalars.items():
      self._writer.add_scalar(k, float(np.asarray(v)), int(step))

  def write_images(self, step, images):
    """images: {name: [N, H, W, C]} uint8 (or floats in [0, 1]); one summary per image."""
    for k, batch in images.items():
      batch = np.asarray(batch)
      if batch.dtype != np.uint8:
        batch = (np.clip(batch, 0, 1) * 255).round().astype(np.uint8)
      for i, im in enumerate(batch):
        self._writer.add_image(k if len(batch) == 1 else f"{k}/{i}", im, int(step),
                               dataformats="HWC")

  def write_texts(self, step, texts):
    for k, v in texts.items():
      self._writer.add_text(k, str(v), int(step))

  def write_hparams(self, hparams):
    self.write_texts(0, {"hparams": "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items()))})

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class _UrlFiles:
  """tensorboardX's writer factory for URL logdirs: `fileio` paths (etils.epath), so event files
  land wherever checkpoints and metrics do (an object store receives each file whole on close)."""

  def open(self, path):
    return fileio.path(path).open("wb")

  def directory_check(self, path):
    fileio.path(path).mkdir(parents=True, exist_ok=True)



class MultiWriter(MetricWriter):
  """Every call forwarded to each writer in turn."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def write_texts(self, step, texts):
    for w in self.writers:
      w.write_texts(step, texts)

  def write_hparams(self, hparams):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def create(workdir: str) -> MetricWriter:
  if jax.process_index() > 0:
    return MultiWriter([LoggingWriter()])
  return MultiWriter([LoggingWriter(), EventFileWriter(workdir),
                      JsonlWriter(os.path.join(workdir, HISTORY))])


def history(workdir: str) -> list[dict]:
  """The rows of workdir/metrics.jsonl, oldest first."""
  return fileio.read_jsonl(os.path.join(workdir, HISTORY))


def format_secs(secs: float) -> str:
  """123456.7 -> '1d10h17m' (clu's format)."""
  days, rest = divmod(int(secs), 86400)
  hours, rest = divmod(rest, 3600)
  return (f"{days}d" if days else "") + (f"{hours}h" if hours else "") + f"{rest // 60}m"


class ReportProgress:
  """clu's `periodic_actions.ReportProgress` (see the module docstring); call it after every
  step with the step number. The first call only starts the clock."""

  def __init__(self, *, num_train_steps: Optional[int] = None,
               writer: Optional[MetricWriter] = None, every_steps: Optional[int] = None,
               every_secs: Optional[float] = 60.0):
    self.num_train_steps = num_train_steps
    self.writer, self.every_steps, self.every_secs = writer, every_steps, every_secs
    self._t0 = time.monotonic()
    self._previous: Optional[tuple[int, float]] = None
    self._parts: dict[str, float] = {}

  def __call__(self, step: int) -> bool:
    t = time.monotonic()
    if self._previous is None:
      self._previous = (step, t)
      return False
    prev_step, prev_t = self._previous
    due = ((self.every_steps and step % self.every_steps == 0) or step == self.num_train_steps
           or (self.every_secs is not None and t - prev_t > self.every_secs))
    if not due or step == prev_step:
      return False
    rate = (step - prev_step) / max(t - prev_t, 1e-9)
    message = f"{rate:.1f} steps/s"
    if self.num_train_steps:
      message += (f", {100 * step / self.num_train_steps:.1f}% ({step}/{self.num_train_steps}), "
                  f"ETA: {format_secs((self.num_train_steps - step) / rate)}")
    if self._parts:
      total = t - self._t0
      message += f" ({format_secs(total)} : " + ", ".join(
          f"{100 * dt / total:.1f}% {name}" for name, dt in sorted(self._parts.items())) + ")"
    logging.info("Progress: %s", message)
    if self.writer is not None:
      self.writer.write_scalars(step, {"steps_per_sec": rate, "uptime": t - self._t0})
    self._previous = (step, t)
    return True

  @contextlib.contextmanager
  def timed(self, name: str):
    """Counts the wall-clock of the block as part `name` of the reported time."""
    start = time.monotonic()
    try:
      yield
    finally:
      self._parts[name] = self._parts.get(name, 0.0) + time.monotonic() - start
