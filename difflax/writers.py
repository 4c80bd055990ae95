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

`EventFileWriter` writes TensorBoard event files itself (TFRecord framing with masked CRC-32C of
tensorboard's `Event` protos: scalars as simple values, images as PNG summaries, texts as text
-plugin tensors) through `fileio` paths, so `gs://` workdirs work as local ones do. Nothing here
imports TensorFlow or clu: `clu.metric_writers` imports TensorFlow for its summary writer, 5 of
the ~7 CPU-seconds every difflax process (each host of a pod job, each test launch) spent
starting up.

`ReportProgress(num_train_steps=, writer=, every_steps=, every_secs=60)` is clu's periodic action
of that name: called after every step, it writes `steps_per_sec` and `uptime` every
`every_steps` steps (or `every_secs`, and at the last step) and logs
"<r> steps/s, <p>% (<step>/<total>), ETA: <t> (<uptime> : <share>% <part>)", where the parts are
the wall-clock shares of its `timed(name)` blocks.
"""
from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from absl import logging
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.compat.proto import types_pb2

from difflax import fileio
from difflax import images as images_lib

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


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected.
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`, the checksum TFRecord framing uses."""
  crc, table = 0xFFFFFFFF, _CRC_TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, its masked CRC (little-endian)."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data +
          struct.pack("<I", masked_crc32c(data)))


def _png(image) -> bytes:
  arr = np.asarray(image)
  if arr.dtype != np.uint8:  # Floats in [0, 1], as TensorBoard's image summaries take them.
    arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
  return images_lib.png_bytes(arr)


class EventFileWriter(MetricWriter):
  """TensorBoard events in `logdir/events.out.tfevents.<time>.<host>.<pid>.0.v2`, flushed after
  every write (an object store receives the file whole on `close`)."""

  def __init__(self, logdir: str):
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0.v2"
    path = fileio.path(logdir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    self.path = path
    self._file = path.open("wb")
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._file.write(tfrecord(event.SerializeToString()))
    self._file.flush()

  def _summary(self, step: int, values: Sequence[summary_pb2.Summary.Value]) -> None:
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=list(values))))

  def write_scalars(self, step, scalars):
    self._summary(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(np.asarray(v)))
                         for k, v in scalars.items()])

  def write_images(self, step, images):
    """images: {name: [N, H, W, C]} uint8 (or floats in [0, 1]); one summary per image."""
    values = []
    for k, batch in images.items():
      batch = np.asarray(batch)
      for i, im in enumerate(batch):
        tag = k if len(batch) == 1 else f"{k}/{i}"
        values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
            height=im.shape[0], width=im.shape[1], colorspace=im.shape[2],
            encoded_image_string=_png(im))))
    self._summary(step, values)

  def write_texts(self, step, texts):
    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    self._summary(step, [summary_pb2.Summary.Value(tag=k, metadata=meta, tensor=tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, string_val=[str(v).encode()],
        tensor_shape=tensor_shape_pb2.TensorShapeProto())) for k, v in texts.items()])

  def write_hparams(self, hparams):
    self.write_texts(0, {"hparams": "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items()))})

  def flush(self):
    self._file.flush()

  def close(self):
    if not self._file.closed:
      self._file.close()


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
