"""The papers' runs on TPU slices: `--mode=plan` of every `:paper` config for its slice, and the
README's table ("The papers' runs on pods") built from the plan.json files.

  python benchmarks/plan_papers.py --out=docs/plans                  # every config (hours)
  python benchmarks/plan_papers.py --out=docs/plans --only=ddpm_cifar10,iddpm_cifar10
  python benchmarks/plan_papers.py --out=docs/plans --table          # table of what is there
  python benchmarks/plan_papers.py --tiny --out=/tmp/p               # smoke: :tiny, local CPU

Each config runs as its own `python -m difflax.main --mode=plan` process (a fresh libtpu), its
table saved beside its plan.json as plan.txt. Paper-size train steps take 10-50 minutes each to
compile on a 2-core CPU (the TPU compiler's code generation grows with the per-chip activation
size; `compile_secs` in each plan.json), so the slices below are chosen where each config's
global batch gives a few examples per chip; a config that does not fit gets its verdict's
lever search on top. Prints one JSON object: {config: {topology, programs: [...]}}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# config -> (topology, extra flags). The global batch splits over the slice's chips.
SLICES = {
    "ddpm_cifar10": ("v5e:2x2", []),          # batch 128: 32 per chip
    "iddpm_cifar10": ("v5e:2x2", []),         # batch 128
    "ncsnv2_cifar10": ("v5e:2x2", []),        # batch 128
    "dgm_cifar10": ("v5e:2x2", []),           # batch 128
    "progressive_cifar10": ("v5e:2x2", []),   # batch 128, four growth levels
    "flow_cifar10": ("v5e:2x2", []),          # batch 128, DDPM's UNet as a velocity model
    "chen_schedules": ("v5e:8x8", []),        # batch 1024 at 64x64: 16 per chip
    "cascade_32_64": ("v5e:16x16", []),       # batch 2048: 8 per chip
    "cascade_16_64": ("v5e:16x16", []),
    # batch 1024 at 64 -> 256: 4 per chip. Its base and sr_64 stages are cascade_32_64's.
    "cascade_64_256": ("v5e:16x16", ["--config.cascade.stage=sr_256"]),
}


def run(name: str, topology: str, flags: list, out: str, tiny: bool) -> dict:
  workdir = os.path.join(out, name)
  os.makedirs(workdir, exist_ok=True)
  cmd = [sys.executable, "-m", "difflax.main", "--mode=plan", f"--config={name}:"
         f"{'tiny' if tiny else 'paper'}", f"--topology={topology}", f"--workdir={workdir}",
         *flags]
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  with open(os.path.join(workdir, "plan.txt"), "w") as f:
    f.write(f"$ python {' '.join(cmd[1:])}\n{proc.stdout}")
  if proc.returncode:
    return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "secs": time.time() - t0}
  with open(os.path.join(workdir, "plan.json")) as f:
    return {**json.load(f), "secs": time.time() - t0}


def table(out: str) -> str:
  """Markdown rows: config, stage, slice, per-chip GiB / HBM, step, days, verdict."""
  rows = ["| config | stage | slice | settings | params | GiB per chip (of HBM) | step at MFU "
          "0.4 | days to the paper's steps | verdict |", "|---" * 9 + "|"]
  for name in SLICES:
    path = os.path.join(out, name, "plan.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      plan = json.load(f)
    for r in plan["programs"]:
      if r["program"] != "train":
        continue
      s = r["settings"]
      stage = r["stage"] if r["stage"] != "model" else ""
      stage += f" {r['resolution']}px" + (" (fading)" if r["fading"] else "")
      num = lambda v, fmt: format(v, fmt) if v is not None else "-"
      rows.append(
          f"| `{name}:paper` | {stage.strip()} | {plan['topology']} | fsdp {s['fsdp']}, "
          f"{s['dtype']}, remat {s['remat']}, accum {s['grad_accum']} | "
          f"{num(r['params'] and r['params'] / 1e6, '.1f')} M | "
          f"{r['bytes']['total'] / 2 ** 30:.2f} ({plan['hbm_bytes'] / 2 ** 30:.0f}) | "
          f"{num(r['step_secs'] and r['step_secs'] * 1e3, '.0f')} ms | {num(r['days'], '.2f')} "
          f"| {r['verdict']} |")
  return "\n".join(rows)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.path.join(REPO, "docs", "plans"))
  p.add_argument("--only", default="", help="comma-separated config names")
  p.add_argument("--table", action="store_true", help="print the markdown table and exit")
  p.add_argument("--tiny", action="store_true", help="smoke run: ddpm_cifar10:tiny, local")
  args = p.parse_args()
  if args.table:
    print(table(args.out))
    return
  if args.tiny:
    plans = {"ddpm_cifar10": run("ddpm_cifar10", "local", [], args.out, tiny=True)}
  else:
    names = args.only.split(",") if args.only else list(SLICES)
    plans = {n: run(n, *SLICES[n], args.out, tiny=False) for n in names}
  print(json.dumps({n: {"topology": p.get("topology"), "secs": round(p["secs"]),
                        "error": p.get("error"),
                        "programs": [{k: r.get(k) for k in ("stage", "program", "resolution",
                                                            "fits", "verdict", "compile_secs")}
                                     for r in p.get("programs", [])]}
                    for n, p in plans.items()}, indent=1))


if __name__ == "__main__":
  main()
