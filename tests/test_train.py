"""End-to-end tests of the train loop, modes, resumption and error paths (tiny models)."""
import glob
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from difflax import checkpoint as ckpt_lib
from difflax import data as data_lib
from difflax import experiment
from difflax import config as config_lib
from difflax import train
from difflax import writers


def params_at(workdir, step=None):
  c = load_config("ddpm_cifar10", "tiny")
  s = experiment.setup(c, workdir)
  target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                  s.abstract_state)
  state, _ = s.checkpointer.restore(target, step)
  return jax.device_get(state)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The tiny preset trained straight to step 4 (checkpoints at 2 and 4)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  c = load_config("ddpm_cifar10", "tiny")
  c.train.preview_every = 0
  train.run(c, workdir)
  return workdir


def test_cli_config_by_name_and_override_types(tmp_path):
  """`--config=NAME` resolves to the packaged config; overrides are parsed to the field type."""
  c = config_lib.load("ddpm_cifar10:tiny", [("optim.lr", "3e-3"), ("train.num_steps", "2"),
                                            ("model.ch_mult", "1,2"), ("eval.bpd", "false")])
  assert c.optim.lr == 3e-3 and c.train.num_steps == 2 and c.model.ch_mult == (1, 2)
  assert c.eval.bpd is False
  with pytest.raises(config_lib.ConfigError, match="not a valid int"):
    config_lib.load("ddpm_cifar10:tiny", [("train.num_steps", "many")])
  # The same errors the CLI prints as one line (status 2; see the subprocess test below).
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load("ddpm_cifar10:papr")
  assert str(e.value) == ("Unknown preset(s) ['papr'] for ddpm_cifar10.py; valid presets: "
                          "['paper', 'tiny'].")
  with pytest.raises(config_lib.ConfigError, match="Did you mean ddpm_cifar10\\? Packaged "
                     "configs: cascade_16_64, "):
    config_lib.load("ddpm_cifar1O")


@pytest.mark.parametrize("args,says", [
    (["--config=ddpm_cifar10:tiny", "--config.optim.learning_rate=1e-3"],
     "Unknown config key config.optim.learning_rate. Did you mean config.optim.lr? config.optim "
     "has: b1, b2, ema_decay"),
    (["--config=configs/ddpm_cifar10.py:tiny", "--config.data.name=folder",
      "--config.data.folder=BAD"], "Cannot read image"),
])
def test_cli_user_errors_are_one_line_with_status_2(tmp_path, args, says):
  if "BAD" in args[-1]:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    args = args[:-1] + [f"--config.data.folder={tmp_path / 'imgs'}"]
  cmd = [sys.executable, "-m", "difflax.main", f"--workdir={tmp_path / 'run'}"] + args
  proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and says in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("difflax: ") and ("broken.png" in last or "BAD" not in args[-1])
  assert not glob.glob(str(tmp_path / "run" / "checkpoints" / "*"))


def test_killed_run_resumes_bit_identically(trained, tmp_path, monkeypatch):
  c = load_config("ddpm_cifar10", "tiny")
  c.train.update(preview_every=0, checkpoint_every=100)
  real = data_lib.make_iterator

  def sigterm_after_two(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == 2:  # The third step is running when the "pod" is preempted.
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  monkeypatch.setattr(data_lib, "make_iterator", sigterm_after_two)
  out = train.run(c, str(tmp_path))
  assert out["step"] == 3
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 3
  monkeypatch.setattr(data_lib, "make_iterator", real)
  assert train.run(c, str(tmp_path))["step"] == 4
  want, got = params_at(trained, 4), params_at(str(tmp_path), 4)
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_corrupt_latest_checkpoint_is_named_and_the_run_resumes_from_the_previous(
    trained, tmp_path, caplog):
  """4,000 flipped bytes in the largest array file of the latest checkpoint: the run names it,
  sets it aside, resumes from step 2 and ends where the uninterrupted run ended."""
  import shutil
  shutil.copytree(trained, tmp_path / "run")
  files = [f for f in glob.glob(str(tmp_path / "run" / "checkpoints" / "4" / "**"),
                                recursive=True) if os.path.isfile(f)]
  largest = max([f for f in files if "/d/" in f], key=os.path.getsize)  # An array file.
  data = bytearray(open(largest, "rb").read())
  for p in np.random.default_rng(0).choice(len(data), 4000, replace=False):
    data[p] ^= 0xA5
  open(largest, "wb").write(bytes(data))
  c = load_config("ddpm_cifar10", "tiny")
  c.train.preview_every = 0
  with caplog.at_level("ERROR"):
    assert train.run(c, str(tmp_path / "run"))["step"] == 4
  assert "checkpoints/4 is damaged" in caplog.text
  assert os.listdir(tmp_path / "run" / "checkpoints_damaged") == ["4"]
  want, got = params_at(trained, 4), params_at(str(tmp_path / "run"), 4)
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_sample_and_eval_modes(trained):
  c = load_config("ddpm_cifar10", "tiny")
  c.eval.quality_line = True
  out = train.run(c, trained, mode="sample")
  imgs = np.load(out["npz"])["images"]
  assert imgs.shape == (8, 8, 8, 3) and imgs.dtype == np.uint8 and os.path.exists(out["png"])
  q = out["quality"]  # The sample run's quality line: its 8 samples against 8 real images.
  assert q["num"] == 8 and q["features"].startswith("quick:") and q["confident"] >= 0
  assert {"quick_fd", "real_quick_fd", "shape_score", "real_shape_score"} <= set(q)
  result = train.run(c, trained, mode="eval")
  assert result["quick_features_accuracy"] == q["features_accuracy"]  # Printed with the FD.
  # 4 steps of a tiny model: far from the data (8 bits/dim of uniform noise is the ceiling).
  assert 1.0 < result["eval_bpd"] < 12.0
  assert result["quick_fd"] > 1.0 and result["quick_features"].startswith("quick:")
  assert result["quick_fd_reference"] == result["quick_kid_reference"] == "embedded:test:64"
  assert result["num_samples"] == c.eval.num_samples
  assert os.path.exists(os.path.join(trained, "eval", "eval_step000004.json"))
  assert json.load(open(os.path.join(trained, "eval", "best.json")))["step"] == 4
  assert os.path.exists(os.path.join(trained, "eval", "metrics.png"))


def test_a_finished_train_run_ends_with_the_quality_line(trained, tmp_path, caplog):
  import shutil
  shutil.copytree(os.path.join(trained, "checkpoints"), tmp_path / "checkpoints")
  c = load_config("ddpm_cifar10", "tiny")
  c.train.update(num_steps=5, preview_every=4)
  c.eval.quality_line = True
  with caplog.at_level("INFO"):
    out = train.run(c, str(tmp_path))
  q = out["quality"]
  # The final preview grid is the quality line's first preview_num samples (one pass for both).
  from PIL import Image
  grid = Image.open(tmp_path / "samples" / "step_000005.png")
  assert c.train.preview_num == 8  # 8 samples of 8x8 in a 3x3 grid: 32 px, saved x8.
  assert grid.size == (8 * (3 * (8 + 2) + 2),) * 2
  assert q["num"] == c.eval.quality_samples and np.isfinite(q["quick_fd"])
  assert "Quality of 16 samples at step 5 (quick:" in caplog.text
  saved = json.load(open(tmp_path / "eval" / "quality_step000005.json"))
  assert saved["shape_score"] == q["shape_score"] and saved["real_confident"] == q["real_confident"]
  assert any("quality_shape_score" in row for row in writers.history(str(tmp_path)))
  # A run stopped early (here: already at num_steps) draws nothing.
  assert "quality" not in train.run(c, str(tmp_path))


def test_eval_with_inception_and_reference_stats_files(trained, tmp_path):
  from difflax.evaluation import inception, stats
  params = inception.init_params(seed=3)  # Random weights: shapes and plumbing, not real FID.
  weights = inception.InceptionWeights(params, {"weights_hash": inception.weights_hash(params)})
  c = load_config("ddpm_cifar10", "tiny")
  c.eval.update(bpd=False, inception=True, inception_weights=weights.save(str(tmp_path / "w.npz")),
                num_samples=8, reference_examples=16)
  quick_stats = stats.dataset_stats(c, "quick", num=32)
  c.eval.reference_stats = stats.save_stats(str(tmp_path / "ref.npz"), quick_stats)
  result = train.run(c, trained, mode="eval")
  assert result["features"] == weights.label and np.isfinite(result["fid"])
  assert np.isfinite(result["kid"])
  # Each metric names its own reference: the FD the stats file, KID / PR the eval split.
  assert "ref.npz" in result["quick_fd_reference"] and "ref.npz" not in result["fid_reference"]
  assert result["quick_kid_reference"] == result["quick_recall_reference"] == "embedded:test:16"
  quick_stats["features"] = "quick:000000000000"  # Statistics from another quick network.
  c.eval.reference_stats = stats.save_stats(str(tmp_path / "other.npz"), quick_stats)
  with pytest.raises(ValueError, match="recompute them"):
    train.run(c, trained, mode="eval")


def test_checkpoint_from_another_architecture_is_refused(trained):
  c = load_config("ddpm_cifar10", "tiny")
  c.model.ch = 16
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="different architecture"):
    train.run(c, trained, mode="sample")


def test_nan_loss_stops_without_checkpointing_the_bad_state(tmp_path, monkeypatch):
  c = load_config("ddpm_cifar10", "tiny")
  c.train.update(preview_every=0, num_steps=4)
  real = data_lib.make_iterator

  def nan_from_step_two(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i >= 2:
        batch = dict(batch, image=batch["image"] * np.nan)
      yield batch
  monkeypatch.setattr(data_lib, "make_iterator", nan_from_step_two)
  with pytest.raises(FloatingPointError, match="last good checkpoint"):
    train.run(c, str(tmp_path))
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 2


def test_non_finite_samples_stop_like_a_nan_loss(trained, tmp_path, monkeypatch):
  real = experiment.restore_trained

  def nan_ema(config, workdir):
    exp, state = real(config, workdir)
    return exp, state.replace(ema_params=jax.tree_util.tree_map(lambda p: p * np.nan,
                                                                state.ema_params))
  monkeypatch.setattr(experiment, "restore_trained", nan_ema)
  c = load_config("ddpm_cifar10", "tiny")
  c.sample.seed = 7  # A tag of its own: shards of other tests' sample runs are not reused.
  with pytest.raises(FloatingPointError, match="Non-finite samples"):
    train.run(c, trained, mode="sample")


def test_sample_without_checkpoint_says_train_first(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first"):
    train.run(load_config("ddpm_cifar10", "tiny"), str(tmp_path), mode="sample")


@pytest.mark.parametrize("name,arg,tag", [
    ("chen_schedules", "tiny,gamma=sigmoid,start=0,end=3,tau=0.7,scale=0.5,pred=v", "ddim10"),
    ("ncsnv2_cifar10", "tiny", "langevin"), ("flow_cifar10", "tiny", "heun5")])
def test_continuous_score_and_flow_configs_train_and_sample(tmp_path, name, arg, tag):
  cmd = [sys.executable, "-m", "difflax.main", f"--config=configs/{name}.py:{arg}",
         f"--workdir={tmp_path}"]
  proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "loss=" in proc.stderr and "nan" not in proc.stderr.split("loss=")[-1][:10]
  assert os.path.exists(tmp_path / "samples" / "step_000004.png")
  c = load_config(name, arg)
  result = train.run(c, str(tmp_path), mode="sample")
  assert tag in result["png"]
  imgs = np.load(result["npz"])["images"]
  assert imgs.shape == (8, 8, 8, 3)
  # Eight different samples (per-batch keys), not one image repeated.
  assert len({im.tobytes() for im in imgs}) == 8
  meta = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).read_meta()
  assert meta["diffusion"]["type"] == c.diffusion.type
  if name == "ncsnv2_cifar10":
    assert len(meta["ncsn"]["sigmas"]) > 2  # Computed from the data, recorded with the run.
    result = train.run(c, str(tmp_path), mode="eval")  # Quick FD only: no bits/dim for NCSN.
    assert "eval_bpd" not in result and np.isfinite(result["quick_fd"])
    c.eval.quick_fd = False
    with pytest.raises(ValueError, match="discrete"):
      train.run(c, str(tmp_path), mode="eval")


def test_interrupted_sample_run_resumes_without_duplicating_or_losing_shards(trained):
  c = load_config("ddpm_cifar10", "tiny")
  c.sample.update(num=20, batch_size=8, seed=5)  # 3 shards, the last one partly used.
  first = train.run(c, trained, mode="sample")
  shard_dir = first["npz"][:-len(".npz")]
  shards = sorted(os.listdir(shard_dir))
  assert shards == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
  kept = os.path.getmtime(os.path.join(shard_dir, shards[0]))
  os.remove(os.path.join(shard_dir, shards[1]))  # As if killed while writing shard 1.
  second = train.run(c, trained, mode="sample")
  assert sorted(os.listdir(shard_dir)) == shards
  assert os.path.getmtime(os.path.join(shard_dir, shards[0])) == kept  # Not resampled.
  a, b = np.load(first["npz"]), np.load(second["npz"])
  assert a["images"].shape == (20, 8, 8, 3)
  np.testing.assert_array_equal(a["images"], b["images"])
  np.testing.assert_array_equal(a["labels"], b["labels"])


def test_url_workdir_is_passed_through_verbatim(tmp_path, monkeypatch):
  """A workdir URL reaches every writer as the URL: through a scheme registered with
  `epath.register_path_cls` (a stand-in bucket in a temp dir), checkpoints, metrics, previews,
  evals and samples land in the bucket and no local folder named after the scheme appears."""
  from etils import epath
  bucket = tmp_path / "bucket"

  @epath.register_path_cls("difflaxtest://")
  class BucketPath(epath.gpath.PosixGPath):
    def __new__(cls, *parts):
      full = "/".join(os.fspath(p) for p in parts)
      if full.startswith("difflaxtest://"):
        full = os.path.join(bucket, full[len("difflaxtest://"):])
      return super().__new__(cls, full)

  monkeypatch.chdir(tmp_path)
  c = load_config("ddpm_cifar10", "tiny")
  c.train.update(num_steps=2, checkpoint_every=2, preview_every=2, eval_every=2)
  c.eval.bpd = False
  url = "difflaxtest://runs/x"
  assert train.run(c, url)["step"] == 2
  assert train.run(c, url, mode="sample")["num"] == c.sample.num
  run = bucket / "runs" / "x"
  for f in ("config.json", "metrics.jsonl", "checkpoints/2", "samples/step_000002.png",
            "eval/eval_step000002.json", "eval/best.json", "best/2"):
    assert (run / f).exists(), f
  assert glob.glob(str(run / "events.out.tfevents.*"))
  assert glob.glob(str(run / "samples" / "sample_step000002_*" / "shard_00000.npz"))
  assert [r["step"] for r in writers.history(url) if "loss" in r] == [2]
  assert not [p for p in glob.glob(str(tmp_path / "**"), recursive=True) if "difflaxtest:" in p]


def test_paper_002_objectives_resume_bit_identically(tmp_path):
  """Importance sampling (+2 refreshes) with IWDiff: the loss history is checkpointed with the
  state, so a run stopped at step 3 and resumed ends where the straight run ends."""
  c = load_config("dgm_cifar10", "tiny,is2,iwdiff")
  c.diffusion.update(num_timesteps=8, schedule="cosine")  # A history that warms up in 2 steps.
  c.loss.resampler_history = 2
  c.train.update(num_steps=6, checkpoint_every=3, preview_every=0)
  train.run(c, str(tmp_path / "straight"))
  c.train.num_steps = 3
  train.run(c, str(tmp_path / "resumed"))
  c.train.num_steps = 6
  assert train.run(c, str(tmp_path / "resumed"))["step"] == 6

  def final(w):
    s = experiment.setup(c, w)
    state, _ = s.checkpointer.restore(
        jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                               s.abstract_state))
    return jax.device_get(state)
  want, got = final(str(tmp_path / "straight")), final(str(tmp_path / "resumed"))
  assert int(want.resampler["count"].sum()) == 6 * 8 * 3  # 8 losses + 2 x 8 refreshes a step.
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)
  history = writers.history(str(tmp_path / "straight"))
  assert any("loss_unweighted" in h and "iwdiff_max_weight" in h for h in history)


def test_sample_mode_with_a_surrogate_workdir_or_npz(trained, tmp_path):
  """Paper 002 Algorithm 4 from the CLI's sample mode: a difflax workdir as the surrogate (here
  the run itself) at t_mid=50 runs only the chain steps below 50; an .npz of 4x4 images is
  resized bilinearly to 8x8, and at t_mid=0 the samples are those images."""
  from difflax import images as images_lib
  c = load_config("ddpm_cifar10", "tiny")
  c.sample.update(surrogate=trained, surrogate_t_mid=50)
  out = train.run(c, trained, mode="sample")
  assert "surrogate-" in out["npz"] and "-t50" in out["npz"]
  # "5" of T=100 keeps steps 0, 25, 50, 74, 99: two lie below 50.
  assert (out["model_evaluations"], out["model_evaluations_full"]) == (2, 5)
  small = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
  np.savez(tmp_path / "small.npz", images=small)
  c.sample.update(surrogate=str(tmp_path / "small.npz"), surrogate_t_mid=0)
  out = train.run(c, trained, mode="sample")
  want = jax.image.resize(small.astype(np.float32) / 127.5 - 1, (8, 8, 8, 3), "bilinear")
  np.testing.assert_array_equal(np.load(out["npz"])["images"],
                                images_lib.to_uint8(np.clip(np.asarray(want), -1, 1)))
  assert out["model_evaluations"] == 0
  c.sample.surrogate = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="neither an .npz"):
    train.run(c, trained, mode="sample")
