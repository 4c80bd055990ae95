"""Metric writers: TensorBoard event files (tensorboardX) TensorFlow itself reads back, the JSONL history,
progress reporting, and a start-up that imports neither TensorFlow nor clu."""
import glob
import os
import subprocess
import sys

import numpy as np

from conftest import REPO
from difflax import writers


def test_event_files_read_back_with_tensorflow(tmp_path):
  import tensorflow as tf
  w = writers.create(str(tmp_path))
  img = np.random.default_rng(0).integers(0, 256, (1, 6, 10, 3), dtype=np.uint8)
  w.write_scalars(3, {"loss": 0.25, "lr": np.float32(1e-3)})
  w.write_images(4, {"samples": img})
  w.write_texts(5, {"note": "hello"})
  w.close()
  (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  # tf_record_iterator checks both CRCs of every record.
  events = list(tf.compat.v1.train.summary_iterator(path))
  assert events[0].file_version == "brain.Event:2"
  scalars = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value
             if v.HasField("simple_value")}
  assert scalars == {(3, "loss"): 0.25, (3, "lr"): np.float32(1e-3)}
  (png,) = [v.image for e in events for v in e.summary.value if v.HasField("image")]
  np.testing.assert_array_equal(tf.io.decode_png(png.encoded_image_string).numpy(), img[0])
  (text,) = [v for e in events for v in e.summary.value if v.tag == "note/text_summary"]
  assert text.metadata.plugin_data.plugin_name == "text" and text.tensor.string_val == [b"hello"]
  assert writers.history(str(tmp_path)) == [{"step": 3, "loss": 0.25, "lr": np.float32(1e-3)}]


def test_report_progress_writes_rates_every_n_steps_and_at_the_end(tmp_path):
  w = writers.JsonlWriter(os.path.join(tmp_path, writers.HISTORY))
  report = writers.ReportProgress(num_train_steps=7, writer=w, every_steps=3)
  fired = [report(step) for step in range(1, 8)]
  assert fired == [False, False, True, False, False, True, True]
  rows = writers.history(str(tmp_path))
  assert [r["step"] for r in rows] == [3, 6, 7]
  assert all(r["steps_per_sec"] > 0 and r["uptime"] >= 0 for r in rows)
  with report.timed("periodic"):
    pass
  assert writers.format_secs(123456.7) == "1d10h17m"


def test_starting_difflax_imports_neither_tensorflow_nor_clu():
  out = subprocess.run(
      [sys.executable, "-c", "import sys, difflax.main, difflax.evaluation.evaluator; "
       "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'clu', 'keras'}))"],
      cwd=REPO, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
