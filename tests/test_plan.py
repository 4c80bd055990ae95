"""--mode=plan (plan.py): every stage compiled ahead of time for a TPU slice (libtpu's
compile-only devices: the [tpu] extra, which the test extra installs on x86-64 Linux) or for this
process's devices, with per-device memory, FLOPs, projections and a verdict; the memory levers
measured by the compiler."""
import importlib.util
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from difflax import experiment
from difflax import growth
from difflax import plan

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu (pip install -e '.[tpu]')")


def cli(*args):
  return subprocess.run([sys.executable, "-m", "difflax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=900)


def by_program(result):
  return {(r["stage"], r["program"]): r for r in result["programs"]}


def assert_measured(row):
  b = row["bytes"]
  assert b["arguments"] > 0 and b["outputs"] > 0 and b["total"] >= b["arguments"], b
  assert row["flops"] > 0 and row["step_secs"] > 0 and row["images_per_sec"] > 0, row
  assert row["fits"] and row["verdict"].startswith("fits"), row["verdict"]


@needs_libtpu
def test_cli_plans_ddpm_tiny_in_bf16_for_a_v5e_slice(tmp_path):
  r = cli("--mode=plan", "--config=ddpm_cifar10:tiny", "--config.model.dtype=bfloat16",
          "--topology=v5e:2x2", f"--workdir={tmp_path}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Plan for v5e:2x2: 4 x TPU v5 lite" in r.stdout and "Every program fits" in r.stdout
  result = json.loads((tmp_path / "plan.json").read_text())
  assert (result["devices"], result["hbm_bytes"], result["peak_flops"]) == (4, 16 * 2 ** 30,
                                                                           197e12)
  rows = by_program(result)
  assert set(rows) == {("model", "train"), ("model", "sample")}
  for row in rows.values():
    assert_measured(row)
  train, sample = rows["model", "train"], rows["model", "sample"]
  assert train["per_device_batch"] == 2 and train["settings"]["dtype"] == "bfloat16"
  # FLOPs are per device and count the backward pass: a train step costs about 3 forward
  # passes per example (forward, input and weight gradients) plus the optimizer's elementwise
  # work; the sampler's call is one forward at the same per-device batch here.
  ratio = (train["flops"] / train["global_batch"]) / (sample["flops"] / sample["global_batch"])
  assert 2.5 < ratio < 4.5, ratio
  np.testing.assert_allclose(train["days"], train["step_secs"] * 4 / 86400)  # 4 tiny steps
  # bf16 compute on the TPU compile: the convolutions are bf16 ...
  conv = train["hlo_dtypes"]["convolution"]
  assert conv.get("bf16", 0) > 10 * conv.get("f32", 0), conv
  # ... while params (and so Adam's moments and the EMA) stay float32.
  c = load_config("ddpm_cifar10", "tiny")
  c.model.dtype = "bfloat16"
  exp = experiment.setup(c, str(tmp_path))
  assert {a.dtype for a in jax.tree_util.tree_leaves(exp.abstract_state)} == {
      np.dtype(np.float32), np.dtype(np.int32)}
  assert not (tmp_path / "checkpoints").exists()  # Planning leaves no run behind.


@needs_libtpu
def test_plan_compiles_every_cascade_stage_for_v5e_and_counts_v4_tensorcores(tmp_path):
  result = plan.plan(load_config("cascade_32_64", "tiny"), str(tmp_path / "c"), "v5e:2x2")
  assert [(r["stage"], r["program"], r["resolution"]) for r in result["programs"]] == [
      ("base", "train", 8), ("base", "sample", 8), ("sr_64", "train", 16),
      ("sr_64", "sample", 16)]
  for row in result["programs"]:
    assert_measured(row)
  assert json.loads((tmp_path / "c" / "plan.json").read_text())["programs"][2]["stage"] == "sr_64"
  # v4's compile-only devices are TensorCores, two per chip: each gets half a chip.
  v4 = plan.plan(load_config("ddpm_cifar10", "tiny"), str(tmp_path / "v4"), "v4:2x2x1")
  assert (v4["devices"], v4["devices_per_chip"]) == (8, 2)
  assert (v4["hbm_bytes"], v4["peak_flops"]) == (16 * 2 ** 30, 275e12 / 2)
  assert by_program(v4)["model", "train"]["per_device_batch"] == 1
  assert_measured(by_program(v4)["model", "train"])
  assert "per TensorCore" in plan.format_table(v4)


def test_a_cascade_stage_set_in_the_config_is_planned_alone():
  c = load_config("cascade_32_64", "tiny")
  assert [(s, p) for s, p, _, _ in plan.programs(c)] == [
      ("base", "train"), ("base", "sample"), ("sr_64", "train"), ("sr_64", "sample")]
  c.cascade.stage = "sr_64"
  assert [(s, p, sc.data.resolution) for s, p, sc, _ in plan.programs(c)] == [
      ("sr_64", "train", 16), ("sr_64", "sample", 16)]


def test_topology_and_batch_mistakes_are_one_line_with_status_2(tmp_path, monkeypatch):
  r = cli("--mode=plan", "--config=ddpm_cifar10:tiny", "--topology=v9:2x2",
          f"--workdir={tmp_path}")
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  if importlib.util.find_spec("libtpu") is None:
    assert "pip install -e '.[tpu]'" in r.stderr
  else:
    assert "--topology=v9:2x2 is not a TPU topology" in r.stderr and "v5e:16x16" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  # Without libtpu the fix is named.
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(plan.PlanError, match=r"pip install -e '.\[tpu\]'"):
    plan.target("v5e:2x2")
  monkeypatch.undo()
  # A global batch that does not split over the devices.
  c = load_config("ddpm_cifar10", "tiny")
  c.data.batch_size = 12
  with pytest.raises(plan.PlanError, match="does not split over the 8 devices"):
    plan.plan(c, str(tmp_path), "local")


# ------------------------------------------------------------------------------ known answers
def probe(**changes):
  """A one-level UNet whose activations, not its parameters, fill memory (64 channels at
  16x16, 64 examples): the memory levers act on what they should."""
  c = load_config("ddpm_cifar10", "tiny")
  c.model.update(ch=64, ch_mult=(1,), attn_resolutions=(), num_groups=8)
  c.data.update(resolution=16, batch_size=64)
  c.mesh.fsdp_min_size = 1
  for k, v in changes.items():
    block, key = k.split("__")
    c[block][key] = v
  return c


@pytest.fixture(scope="module")
def local():
  return plan.target("local")


def measure(c, target, tmp_path):
  return plan.measure(c, growth.GrowthState(), "train", target, str(tmp_path))["bytes"]


def test_memory_known_answers_on_the_local_devices(local, tmp_path):
  """Compiled by XLA:CPU for the 8 test devices: doubling the batch doubles the temporaries,
  gradient accumulation halves them, FSDP over 4 devices quarters the state's bytes (norms and
  biases stay replicated)."""
  base = measure(probe(), local, tmp_path)
  double = measure(probe(data__batch_size=128), local, tmp_path)
  accum = measure(probe(optim__grad_accum=2), local, tmp_path)
  fsdp = measure(probe(mesh__fsdp=4), local, tmp_path)
  assert 1.7 < double["temporaries"] / base["temporaries"] < 2.3, (base, double)
  assert accum["temporaries"] < 0.65 * base["temporaries"], (base, accum)
  state = lambda b: b["outputs"]  # The new state (and scalar metrics): params, EMA, Adam.
  assert 0.24 < state(fsdp) / state(base) < 0.32, (base, fsdp)
  assert fsdp["arguments"] < 0.35 * base["arguments"]


def test_a_program_over_memory_gets_a_verdict_and_the_lever_that_fits(tmp_path, local):
  """The search compiles the levers in order; a lever is kept only where it measured a saving
  (FSDP of a state too small to shard and remat save nothing on XLA:CPU here and are dropped
  again; bf16 saves a little or nothing, depending on the model code), and accumulation fits."""
  c = probe(mesh__fsdp_min_size=2 ** 30)
  base = measure(c, local, tmp_path)["total"]
  accum = measure(probe(mesh__fsdp_min_size=2 ** 30, optim__grad_accum=2), local, tmp_path)
  hbm_gib = (base + accum["total"]) / 2 / 2 ** 30  # Between the two.
  result = plan.plan(c, str(tmp_path), "local", hbm_gib=hbm_gib)
  row = by_program(result)["model", "train"]
  assert not row["fits"] and row["verdict"].startswith("over by"), row["verdict"]
  tried = [t["changes"] for t in row["tried"]]
  assert [list(t)[-1] for t in tried] == ["mesh.fsdp", "model.dtype", "model.remat",
                                          "model.remat", "optim.grad_accum"], tried
  assert tried[-1]["optim.grad_accum"] == 2 and row["tried"][-1]["fits"]
  assert "mesh.fsdp" not in tried[-1] and "model.remat" not in tried[-1], tried
  best = row["bytes"]["total"] / 2 ** 30  # The program as configured, as the search starts.
  for t in row["tried"][:-1]:  # Kept in the end only if it lowered the best total so far.
    lever = list(t["changes"])[-1]
    assert (lever in tried[-1]) == (t["total_gib"] < best), (lever, t, best)
    best = min(best, t["total_gib"])
  if tried[-1] == {"optim.grad_accum": 2}:
    assert row["tried"][-1]["total_gib"] == pytest.approx(accum["total"] / 2 ** 30)
  kept = ", ".join(f"{k}={v}" for k, v in tried[-1].items())
  assert row["verdict"].endswith(f"fits with {kept} "
                                 f"({row['tried'][-1]['total_gib'] * 2 ** 10:.3g} MiB)"), row["verdict"]
  assert "do not fit as configured" in plan.describe(result)
  # When no lever fits, the verdict names the lowest setting tried and a larger slice (the
  # search's end state, built from this row: a second search would only repeat the compiles).
  spent = dict(row, tried=[dict(t, fits=False) for t in row["tried"]])
  verdict = plan._verdict(spent, None)
  low = min(spent["tried"], key=lambda t: t["total_gib"])
  assert verdict.endswith("use a larger slice") and f"tried {len(tried)} lever" in verdict
  assert ", ".join(f"{k}={v}" for k, v in low["changes"].items()) in verdict, verdict
  assert plan._verdict(dict(row, tried=[]), None).endswith("no lever left to try: use a "
                                                           "larger slice")


def test_a_compile_refused_for_memory_is_an_over_verdict(tmp_path, local, monkeypatch):
  """XLA:TPU refuses to compile a program over HBM (RESOURCE_EXHAUSTED); the plan reads the
  bytes from libtpu's message instead of crashing."""
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
             "space hbm. Used 35.20G of 15.75G hbm. Exceeded hbm capacity by 19.45G.")

  def refuse(*args):
    raise RuntimeError(message)
  monkeypatch.setattr(plan, "_compile", refuse)
  m = plan.measure(probe(), growth.GrowthState(), "train", local, str(tmp_path))
  assert m["compiler_oom"] and m["bytes"]["total"] == pytest.approx(35.20 * 2 ** 30)
