"""Paper 002's objectives side by side (Table 4.4, Fig. 4.3): the same model, data and steps
trained with L_simple, importance-sampled timesteps (+2 refreshes), IWDiff (k=2) and IWDiff with
importance sampling. Prints one JSON object on the last line.

  .venv/bin/python benchmarks/objectives.py [--config=dgm_cifar10:short --steps=400]

Every variant trains from the same initialisation on the same embedded-data batches with the
jitted train step `difflax.train` runs; the variants take turns in chunks of --chunk steps, so
their wall-clock is measured side by side. Per variant: the variance of the per-step training
loss (the objective each one optimises, importance-weighted where it samples by importance)
around its 25-step moving average after --skip steps (the importance sampler is uniform until
every t holds its loss history), the same for the unweighted loss, median seconds per step,
ratios of both to L_simple's ("train time to DDPM ratio"), and where each got to: L_simple of
its final params on held-out data (the eval split, t uniform, the same noise for every
variant), the objectives' common yardstick (their training losses weight t differently).
"""
import argparse
import json
import sys
import time

import _common  # noqa: F401  (puts the repository on sys.path)

VARIANTS = {
    "simple": {},
    "importance": {"loss.timestep_sampler": "importance"},
    "importance+2": {"loss.timestep_sampler": "importance", "loss.resampler_extra_updates": 2},
    "iwdiff_k2": {"loss.iwdiff_k": 2},
    "iwdiff_k2+importance": {"loss.iwdiff_k": 2, "loss.timestep_sampler": "importance"},
}


def detrended_variance(xs, window: int = 25) -> float:
  import numpy as np
  xs = np.asarray(xs, np.float64)
  window = max(1, min(window, len(xs) // 3))  # Smoke runs: a few steps.
  trend = np.convolve(xs, np.ones(window) / window, mode="same")
  half = window // 2
  return float(np.var((xs - trend)[half:len(xs) - half]))


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--config", default="dgm_cifar10:short")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--chunk", type=int, default=50)
  p.add_argument("--skip", type=int, default=100, help="steps left out of the variances")
  p.add_argument("--variants", default=",".join(VARIANTS))
  args = p.parse_args()
  import jax
  import numpy as np
  from difflax import config as config_lib, data, experiment, losses, models

  runs = {}
  for name in args.variants.split(","):
    overrides = [("train.num_steps", str(args.steps))]
    overrides += [(k, str(v)) for k, v in VARIANTS[name].items()]
    c = config_lib.load(args.config, overrides)
    s = experiment.setup(c, f"/tmp/difflax_bench_objectives_{name}")
    state = experiment.init_state(s)  # The same seed: the same initial params for every variant.
    step = experiment.jit_train_step(s)
    it = data.make_iterator(c.data, s.mesh, seed=c.seed)
    batch = next(it)
    t0 = time.perf_counter()
    step = step.lower(state, batch).compile()
    runs[name] = {"state": state, "step": step, "it": it, "loss": [], "unweighted": [],
                  "seconds": [], "compile_seconds": time.perf_counter() - t0}
  for done in range(0, args.steps, args.chunk):  # Variants take turns: timings side by side.
    print(f"steps {done}-{done + args.chunk} of {args.steps}", file=sys.stderr, flush=True)
    for run in runs.values():
      for _ in range(args.chunk):
        batch = next(run["it"])
        t0 = time.perf_counter()
        run["state"], m = run["step"](run["state"], batch)
        m = jax.device_get(m)
        run["seconds"].append(time.perf_counter() - t0)
        run["loss"].append(float(m["loss"]))
        run["unweighted"].append(float(m.get("loss_unweighted", m["loss"])))
  # The yardstick: L_simple at uniform t on held-out images, the same draws for every variant.
  c = config_lib.load(args.config)
  s = experiment.setup(c, "/tmp/difflax_bench_objectives_eval")
  simple = s.objective  # The config's own (uniform t, k = 1) objective.
  apply = models.make_apply(s.model, s.process)
  held_out = data.sample_array(c.data, 256, c.seed, c.data.eval_split).astype(np.float32)

  @jax.jit
  def held_out_loss(params, key):
    return simple(lambda x, t: apply(params, x, t), held_out, key)["loss"].mean()
  out = {}
  base = runs.get("simple")
  for name, run in runs.items():
    loss = run["loss"][args.skip:]
    row = {"loss_variance": detrended_variance(loss),
           "unweighted_loss_variance": detrended_variance(run["unweighted"][args.skip:]),
           "held_out_l_simple": float(np.mean([
               held_out_loss(run["state"].params, jax.random.key(i)) for i in range(8)])),
           "step_seconds_median": _common.median(run["seconds"]),
           "compile_seconds": run["compile_seconds"]}
    if not np.all(np.isfinite(run["loss"])):
      raise FloatingPointError(f"{name}: non-finite loss")
    out[name] = row
  if base is not None:
    ref = out["simple"]
    for row in out.values():
      row["loss_variance_ratio"] = (row["loss_variance"] / ref["loss_variance"]
                                    if ref["loss_variance"] else float("nan"))
      row["train_time_ratio"] = row["step_seconds_median"] / ref["step_seconds_median"]
  print(json.dumps({"benchmark": "objectives", "config": args.config, "steps": args.steps,
                    "backend": jax.default_backend(), "variants": out}))


if __name__ == "__main__":
  main()
