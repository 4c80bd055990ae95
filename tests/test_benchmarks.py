"""Every script in benchmarks/ runs at tiny size and prints its JSON, so an API change cannot
break one unnoticed. The numbers are not checked: speed is measured by running the scripts, never
by timed tests."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

TINY_UNET = ["--resolution=8", "--batch-size=8", "--channels=32,32", "--num-res-blocks=1",
             "--attn=", "--steps=1", "--warmup=1"]
SCRIPTS = {
    "train_throughput.py": TINY_UNET,
    "sample_throughput.py": TINY_UNET + ["--sample-steps=2"],
    "step_breakdown.py": TINY_UNET,
    "conv_breakdown.py": ["--resolution=8", "--batch-size=2", "--channels=8", "--steps=1",
                          "--warmup=1"],
    "folder_cache.py": ["--num=12", "--size=16", "--resolution=8"],
    "data_resume.py": ["--examples=40", "--batch-size=8", "--tfrecord-steps=2"],
    "growth_convergence.py": ["--tiny", "--budget=1", "--chunk=2", "--num-samples=8",
                              "--feature-steps=20"],
    "peer_time_to_quality.py": TINY_UNET + ["--budget=0.1", "--eval-every=1", "--num-samples=8",
                                            "--ddim-steps=2", "--feature-steps=20"],
    "objectives.py": ["--config=dgm_cifar10:tiny", "--steps=3", "--chunk=3", "--skip=0",
                      "--variants=simple,iwdiff_k2+importance"],
    "plan_papers.py": ["--tiny"],
    "checkpoint_stall.py": TINY_UNET + ["--saves=1", "--steps-after=1"],
    # One 1-process launch: the 2-process variants run the same code with other flags and
    # launch/local.sh's 2-process path is tests/test_multihost.py's.
    "multihost_step.py": ["--steps=2", "--batch-size=8", "--variants=one_process"],
}


def test_every_benchmark_script_has_a_smoke_run():
  scripts = sorted(f for f in os.listdir(os.path.join(REPO, "benchmarks"))
                   if f.endswith(".py") and not f.startswith("_"))
  assert scripts == sorted(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_runs_at_tiny_size_and_prints_json(script, tmp_path):
  args = list(SCRIPTS[script])
  if script in ("train_throughput.py", "sample_throughput.py", "step_breakdown.py"):
    args.append(f"--cache-dir={tmp_path / 'cache'}")
  if script == "growth_convergence.py":
    args.append(f"--out={tmp_path / 'growth.png'}")
  if script == "plan_papers.py":
    args.append(f"--out={tmp_path / 'plans'}")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args],
                        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout[proc.stdout.index("{"):])  # TFDS may print a line first.
  assert isinstance(out, dict) and out
