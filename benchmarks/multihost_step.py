"""Step time of a 2-process job (launch/local.sh: 2 processes x 4 CPU devices, gloo) with the
three ways processes agree on a SIGTERM stop, side by side, plus the same job on 1 process:

  per_step            an all-gather of the stop flag after every step (JAX's preemption service
                      off, train.stop_check_every=1): the host waits for each step to finish
                      before it can dispatch the next;
  sparse              the same all-gather every 20 steps (train.stop_check_every=20);
  preemption_service  JAX's preemption sync point (the default under jax.distributed).

  .venv/bin/python benchmarks/multihost_step.py [--steps 40 --config ddpm_cifar10:tiny]

Each variant trains 2 x --steps steps with metrics every --steps; the rate of the second window
(after compilation) is read from metrics.jsonl. Prints one JSON object with the seconds per step
of each variant and their ratios to per_step.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {  # name: (processes, environment, flags)
    "per_step": (2, {"JAX_ENABLE_PREEMPTION_SERVICE": "false"},
                 ["--config.train.stop_check_every=1"]),
    "sparse": (2, {"JAX_ENABLE_PREEMPTION_SERVICE": "false"},
               ["--config.train.stop_check_every=20"]),
    "preemption_service": (2, {}, []),
    "one_process": (1, {}, []),
}


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--steps", type=int, default=40, help="steps per timed window")
  p.add_argument("--config", default="ddpm_cifar10:tiny")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
  args = p.parse_args()
  names = args.variants.split(",")
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    p.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
  flags = [f"--config.train.num_steps={2 * args.steps}", f"--config.train.log_every={args.steps}",
           "--config.train.checkpoint_every=0", "--config.train.preview_every=0",
           "--config.train.eval_every=0", "--config.eval.quality_line=False",
           f"--config.data.batch_size={args.batch_size}", "--config.mesh.data=-1"]
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "")
  out = {}
  with tempfile.TemporaryDirectory() as root:
    for name in names:
      n, extra_env, extra = VARIANTS[name]
      workdir = os.path.join(root, name)
      proc = subprocess.run(
          ["bash", os.path.join(REPO, "launch", "local.sh"), str(n), args.config, workdir,
           *flags, *extra], env={**env, **extra_env, "DEVICES_PER_PROCESS": str(8 // n)},
          capture_output=True, text=True, cwd=REPO)
      if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}")
      rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
      rate = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r][-1]
      out[name] = 1.0 / rate
  print(json.dumps({
      "benchmark": "multihost_step", "config": args.config, "steps_timed": args.steps,
      "batch_size": args.batch_size, "devices": 8, "step_seconds": out,
      "ratio_to_per_step": ({k: v / out["per_step"] for k, v in out.items()}
                            if "per_step" in out else None)}))


if __name__ == "__main__":
  main()
