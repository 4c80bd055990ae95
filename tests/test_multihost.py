"""Multi-process runs for real: 2 processes x 4 CPU devices on 127.0.0.1 (gloo collectives),
started through launch/local.sh, against the same configs on 1 process (8 or 1 devices).

One module-scoped 2-process run (8 steps, fsdp=2 spanning both processes) is shared by the
tests that read it; the others launch their own jobs. Every launch is a real `python -m
difflax.main` job per process. 1-process jobs run beside 2-process ones (the reference run
beside the shared run; the 1-device continuation of its checkpoint beside the SIGTERM and
cascade tests), filling their waits; two 2-process jobs side by side measured no faster than
one after the other on 2 cores (compiles are CPU-bound, gloo waits spin)."""
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from difflax import cascade
from difflax import experiment
from difflax import writers

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo test bed on Linux")

HOOKS = os.path.join(REPO, "tests", "hooks")  # sitecustomize: cache writes, SIGTERM at a step.
# One resolution level and no attention: what these tests check is the multi-process
# machinery, and a smaller program halves every compile (init, step, checksums, sampling), which
# both processes pay on a cold cache.
SMALL = ("--config.model.ch_mult=1", "--config.model.attn_resolutions=")
# 16x16 images: the eval's quick feature network is then the one the cascade test's 16x16 SR
# stage and pipeline are scored with (one cache entry, trained once for the module).
RES = 16
FLAGS = ("--config.train.num_steps=8", "--config.train.log_every=1",
         "--config.train.checkpoint_every=4", "--config.train.preview_every=0",
         "--config.train.eval_every=8", "--config.eval.feature_steps=20",
         "--config.optim.warmup_steps=1", "--config.mesh.data=4", "--config.mesh.fsdp=2",
         "--config.mesh.fsdp_min_size=64", "--config.sample.num=16",
         "--config.sample.batch_size=8", f"--config.data.resolution={RES}", *SMALL)


def env(**extra):
  """This environment without the 8-device flag (local.sh gives each process its devices)."""
  flags = os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", "")
  out = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=f"{HOOKS}:{REPO}", XLA_FLAGS=flags)
  out.update(extra)
  return out


def local_sh(n, config, workdir, *flags, timeout=600, **extra_env):
  proc = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), str(n), config,
                         str(workdir), *flags], cwd=REPO, env=env(**extra_env),
                        capture_output=True, text=True, timeout=timeout)
  logs = [open(os.path.join(workdir, "logs", f"process_{i}.log")).read() for i in range(n)]
  assert proc.returncode == 0, "\n".join(l[-3000:] for l in logs)
  return logs


def tiny_config():
  """FLAGS as a config, for runs in this (1-process, 8-device) test process."""
  c = load_config("ddpm_cifar10", "tiny")
  c.train.update(num_steps=8, log_every=1, checkpoint_every=4, preview_every=0, eval_every=8)
  c.eval.feature_steps = 20
  c.optim.warmup_steps = 1
  c.mesh.update(data=4, fsdp=2, fsdp_min_size=64)
  c.sample.update(num=16, batch_size=8)
  c.model.update(ch_mult=(1,), attn_resolutions=())
  c.data.resolution = RES
  return c


def restore(workdir, config=None):
  exp = experiment.setup(config or tiny_config(), str(workdir))
  state = jax.device_get(experiment.restore_or_init(exp)[0])
  exp.close()
  return state


def assert_trees_equal(a, b, exact=True):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    if exact:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def continue_on_one_device(workdir, one):
  """1 process x 1 device: the fsdp=2 checkpoint written by 2 x 4 restores, trains two more
  steps, samples (the preview at step 10) and writes a 1-device checkpoint. Started in the
  background (a 1-process job fills the waits of the 2-process jobs that run beside it)."""
  shutil.copytree(workdir / "checkpoints", one / "checkpoints")
  flags = [f for f in FLAGS if ".mesh." not in f and "num_steps" not in f]
  err = open(one.parent / "one_stderr.log", "w")
  return subprocess.Popen([sys.executable, "-m", "difflax.main", "--config=ddpm_cifar10:tiny",
                           f"--workdir={one}", *flags, "--config.train.num_steps=10",
                           "--config.train.preview_every=10", "--config.train.eval_every=0"],
                          cwd=REPO, env=env(XLA_FLAGS=env()["XLA_FLAGS"] +
                                            " --xla_force_host_platform_device_count=1"),
                          stdout=subprocess.DEVNULL, stderr=err)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """The 2-process run and its reference, the same command on 1 process x 8 devices with a
  preview at the end. The two jobs run side by side: each spends part of its time waiting (on
  the other process, barriers, file writes), which the other fills. Then the 1-device
  continuation of the 2-process checkpoint starts in the background (`continue_on_one_device`;
  the checkpoint test, last in this file, waits for it)."""
  workdir = tmp_path_factory.mktemp("mp") / "run"
  sp = workdir.parent / "sp"
  sp.mkdir()
  with open(sp / "stderr.log", "w") as err:
    ref = subprocess.Popen([sys.executable, "-m", "difflax.main", "--config=ddpm_cifar10:tiny",
                            f"--workdir={sp}", *FLAGS, "--config.train.preview_every=8"],
                           cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                           stdout=subprocess.DEVNULL, stderr=err)
    try:
      logs = local_sh(2, "ddpm_cifar10:tiny", workdir, *FLAGS)
      ref.wait(timeout=600)
    finally:
      ref.kill()
  stderr = open(sp / "stderr.log").read()
  assert ref.returncode == 0, stderr[-3000:]
  one = workdir.parent / "one"
  continuation = continue_on_one_device(workdir, one)
  yield workdir, logs, sp, stderr, (one, continuation)
  continuation.kill()


def test_two_processes_train_and_evaluate_like_one_process_and_the_cli_writes_its_outputs(
    two_process_run):
  workdir, logs, sp, stderr, _ = two_process_run
  assert "process 1 of 2, 4 local / 8 global devices" in logs[1]
  # What a CLI run leaves behind: checkpoints, TensorBoard events, the preview, its config, one
  # metric history (training metrics, steps_per_sec, compile seconds, evals), the plot,
  # and the best eval's state apart from the keep-N rotation of checkpoints/.
  assert os.path.isdir(sp / "checkpoints" / "8") and glob.glob(str(sp / "events.out.tfevents.*"))
  assert os.path.exists(sp / "samples" / "step_000008.png")
  assert json.load(open(sp / "config.json"))["train"]["num_steps"] == 8
  assert "loss=" in stderr and "compile_secs" in stderr
  history = writers.history(str(sp))
  assert [h["step"] for h in history if "quick_fd" in h] == [8]
  assert any("eval_bpd" in h for h in history) and any("compile_secs" in h for h in history)
  assert any("steps_per_sec" in h for h in history)
  assert os.path.exists(sp / "eval" / "metrics.png") and os.path.isdir(sp / "best" / "8")
  assert json.load(open(sp / "eval" / "best.json"))["is_best"]
  loss = lambda w: [r["loss"] for r in writers.history(str(w)) if "loss" in r]
  want, got = loss(sp), loss(workdir)
  assert len(got) == 8
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The 2-process checkpoint restores on this single process (another topology) and matches;
  # the params moved (warm-up 1), so the comparison is not between two initialisations.
  sp_state, mp = restore(sp), restore(workdir)
  assert int(mp.step) == 8
  assert_trees_equal(sp_state, mp, exact=False)
  init = experiment.init_state(experiment.setup(tiny_config(), str(workdir.parent / "init")))
  moved = [float(np.abs(a - b).max()) for a, b in
           zip(jax.tree_util.tree_leaves(mp.params), jax.tree_util.tree_leaves(init.params))]
  assert np.median(moved) > 1e-3
  # The eval (samples drawn sharded across processes, features extracted sharded and gathered)
  # gives the single-process quick FD.
  ev = lambda w: json.load(open(os.path.join(w, "eval", "eval_step000008.json")))
  for k in ("quick_fd", "eval_bpd"):  # Bits/dim: eval batches sharded across processes too.
    np.testing.assert_allclose(ev(workdir)[k], ev(sp)[k], rtol=1e-3)
  assert "quick_fd=" in logs[1]  # Every process computed it (and agreed, or FD would differ).


def test_sigterm_to_one_process_then_a_damaged_checkpoint_resume_bit_identically(
    two_process_run, tmp_path):
  """SIGTERM reaches process 1 only, at a random step k: JAX's preemption service (its SIGTERM
  notifier and the coordination service, no per-step collective) makes both processes stop at
  one step s >= k, checkpoint s and exit 0. Then s's array data are damaged on disk: the
  relaunch names the checkpoint, resumes from the one before and ends bit-identical to the
  uninterrupted run."""
  workdir = tmp_path / "run"
  signalled = random.choice([3, 4, 5])
  flags = (*FLAGS, "--config.train.eval_every=0",  # Evals are the first test's business.
           "--config.train.checkpoint_every=2")
  logs = local_sh(2, "ddpm_cifar10:tiny", workdir, *flags,
                  DIFFLAX_TEST_SIGTERM_STEP=str(signalled))
  stops = [re.findall(r"Preemption notice: every process stops at step (\d+)", log)
           for log in logs]
  assert stops[0] == stops[1] and len(stops[0]) == 1, (signalled, stops)
  k = int(stops[0][0])  # The step the service picked: after the notice, the same everywhere.
  assert signalled <= k < 8, (signalled, k)
  for log in logs:
    assert f"Stopped at step {k} after SIGTERM" in log, f"k={k}"
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps[-1] == k
  files = [f for f in glob.glob(str(workdir / "checkpoints" / str(k) / "**"), recursive=True)
           if os.path.isfile(f)]
  largest = max([f for f in files if "/d/" in f], key=os.path.getsize)  # An array file.
  data = bytearray(open(largest, "rb").read())
  for p in np.random.default_rng(k).choice(len(data), min(4000, len(data) // 2), replace=False):
    data[p] ^= 0xA5
  open(largest, "wb").write(bytes(data))
  logs = local_sh(2, "ddpm_cifar10:tiny", workdir, *flags)
  assert f"checkpoints/{k} is damaged" in logs[0]
  assert os.listdir(workdir / "checkpoints_damaged") == [str(k)]
  assert_trees_equal(restore(workdir), restore(two_process_run[0]))


def test_without_the_preemption_service_the_stop_flag_is_agreed_every_n_steps(tmp_path):
  """JAX's preemption service off: the Python SIGTERM handler's flag is all-gathered every
  `train.stop_check_every` steps (not after each step), so both processes stop at the first
  multiple of it at or after the signal, with one checkpoint."""
  workdir = tmp_path / "run"
  flags = (*FLAGS, "--config.train.eval_every=0", "--config.train.checkpoint_every=100",
           "--config.train.stop_check_every=3")
  logs = local_sh(2, "ddpm_cifar10:tiny", workdir, *flags, DIFFLAX_TEST_SIGTERM_STEP="4",
                  JAX_ENABLE_PREEMPTION_SERVICE="false")
  assert "SIGTERM received" in logs[1] and "SIGTERM received" not in logs[0]
  for log in logs:
    assert "Stopped at step 6 after SIGTERM" in log and "Preemption notice" not in log
  assert sorted(os.listdir(workdir / "checkpoints")) == ["6"]


# One launch trains both cascade stages, the base one progressively grown twice (2 -> 4 -> 8)
# with fsdp=2 spanning both processes, then samples the pipeline from the grown base (growth
# and cascades compose: any stage may carry `growth`). Abrupt fades
# keep the programs few (three architectures' steps, surgeries and checksums); each compiles on
# both processes on a cold cache.
BASE, SR = "--config.stages.base", "--config.stages.sr_64"
MESH = ("mesh.data=4", "mesh.fsdp=2", "mesh.fsdp_min_size=64")
CASCADE = (f"{BASE}.train.num_steps=6",
           f"{BASE}.model.ch_mult=1,1,1", f"{BASE}.model.attn_resolutions=",
           f"{BASE}.model.project_downsample=True", f"{BASE}.growth.resolutions=2,4,8",
           f"{BASE}.growth.stage_steps=2,2", f"{BASE}.growth.fade_kind=abrupt",
           f"{SR}.train.num_steps=2", f"{SR}.model.ch_mult=1",
           *(f"{stage}.{m}" for stage in (BASE, SR) for m in MESH),
           f"{SR}.eval.quality_line=true",  # Scored on 2 processes too,
           f"{SR}.eval.feature_steps=20",   # by a quick network (plumbing).
           f"{BASE}.train.preview_every=0", f"{SR}.train.preview_every=0",
           # Both modes in one launch (one start-up and one jax.distributed job, as a pod job).
           "--mode=train,sample")


def test_cascade_with_a_grown_base_trains_and_samples_the_pipeline_on_two_processes(tmp_path):
  workdir = tmp_path / "cdm"
  logs = local_sh(2, "cascade_32_64:tiny", workdir, *CASCADE)
  for log in logs:
    assert log.count("Cascade stage") == 2
    assert log.count("Growth at step") == 2 and log.count("Growth surgery: kept") == 2
    assert "'data': 4, 'fsdp': 2" in log
  # Every growth is checkpointed (the state changes shape there).
  assert sorted(os.listdir(workdir / "base" / "checkpoints"), key=int) == ["2", "4", "6"]
  assert sorted(os.listdir(workdir / "sr_64" / "checkpoints")) == ["2"]
  c = load_config("cascade_32_64", "tiny")
  c.stages.base.model.update(ch_mult=(1, 1, 1), attn_resolutions=(), project_downsample=True)
  c.stages.base.growth.update(resolutions=(2, 4, 8), stage_steps=(2, 2), fade_kind="abrupt")
  exp = experiment.setup(cascade.stage_config(c, "base"), str(workdir / "base"))
  meta = exp.checkpointer.read_meta()
  exp.close()
  assert meta["step"] == 6 and meta["resolution"] == 8 and meta["growth"]["stage"] == 2
  (out_dir,) = glob.glob(str(workdir / "pipeline" / "*"))
  assert {"final.png", "base.png", "sr_64.png", "final.npz"} <= set(os.listdir(out_dir))
  imgs = np.load(os.path.join(out_dir, "final.npz"))["images"]
  assert imgs.shape == (8, 16, 16, 3) and len({im.tobytes() for im in imgs}) == 8
  # The SR stage's train run and the pipeline end with the quality line on every process.
  for log in logs:
    assert "Quality of 16 samples at step 2" in log and "Quality of 8 pipeline samples" in log


def test_checkpoints_move_between_2x4_and_1x1_and_sample_shards_are_written_once(
    two_process_run):
  # The 2 x 4 checkpoint continued on 1 process x 1 device (see `continue_on_one_device`).
  one, proc = two_process_run[4]
  proc.wait(timeout=600)
  stderr = open(one.parent / "one_stderr.log").read()
  assert proc.returncode == 0, stderr[-3000:]
  assert "resumed at step 8" in stderr and "'data': 1, 'fsdp': 1" in stderr
  assert os.path.exists(one / "samples" / "step_000010.png")
  # 2 processes x 4 devices, fsdp=2: the 1-device checkpoint restores into fsdp shards spanning
  # both processes; each batch is sampled by both (one sharded computation), written once.
  logs = local_sh(2, "ddpm_cifar10:tiny", one, *FLAGS, "--mode=sample")
  for log in logs:
    assert "Sample batch 2/2" in log
  shards = sorted(glob.glob(str(one / "samples" / "sample_step000010_*" / "shard_*.npz")))
  assert [os.path.basename(s) for s in shards] == ["shard_00000.npz", "shard_00001.npz"]
  assert not glob.glob(str(one / "samples" / "**" / "*.tmp*"), recursive=True)
  imgs = np.load(glob.glob(str(one / "samples" / "sample_step000010_*.npz"))[0])["images"]
  assert imgs.shape == (16, RES, RES, 3) and len({im.tobytes() for im in imgs}) == 16
