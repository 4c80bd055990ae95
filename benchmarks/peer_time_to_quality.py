"""Time to quality, side by side with the peer: difflax vs PyTorch diffusers on the same UNet.

Both train the reference UNet (`_common.reference_config`: 32x32x3, channels 64/128/128, 2 res
blocks, one-head attention at 16x16 and in the middle, GroupNorm 32, fp32) on the same embedded
data (train split, random flips), batch 32, T=1000 linear betas, eps-MSE, Adam 2e-4, for the same
wall-clock budget of training (`--budget` seconds each, compile and first-step time included),
one after the other on this machine (the peer first). When difflax has not reached the peer's
final quick FD at the budget, it trains on, evaluating as before, until it does or until
`--max-seconds` of training (default: the budget, no extension), so the ratio is measured
rather than bounded. Every `--eval-every` seconds of training, each samples
`--num-samples` images with DDIM (`--ddim-steps`, eta 0) from its current weights (difflax: the
EMA params, as its samples are drawn; diffusers: its raw weights, as a plain training loop has
no EMA) and both are scored by the same quick feature network (`evaluation.quality.score`: quick
FD, KID, shape score against the eval split). Evaluation time is not counted.

Prints one JSON object: {"difflax": [{"seconds", "step", "quick_fd", "shape_score", ...}],
"peer": [...] or null, "seconds_to_peer_final_fd": difflax's training seconds to first reach
the peer's final quick FD (null if it did not within `--max-seconds`), "ratio": that divided by
the peer's seconds (< 1: difflax gets there faster), "ratio_lower_bound": when difflax did not
get there, its training seconds divided by the peer's (the ratio is above it),
"step_rate_ratio": difflax's training steps / the peer's in the same budget}.

The peer needs the optional extra: `pip install -e '.[peer]'` (torch 2.13.0 CPU, diffusers);
without it only the difflax side runs (`"peer": null`), which is what CI's smoke run does.

  .venv/bin/python benchmarks/peer_time_to_quality.py --budget=600 --eval-every=150 \
      --max-seconds=2400
"""
from __future__ import annotations

import json
import sys
import time

import _common


def difflax_run(args, config, target_fd: float | None = None) -> tuple[list[dict], int]:
  """Rows of the difflax side: evals every `eval_every` s up to the budget, then (with a
  `target_fd` not yet reached) on up to `max_seconds` until an eval reaches it."""
  import jax
  import numpy as np
  from difflax import data as data_lib
  from difflax import experiment, sampling
  from difflax.evaluation import quality
  s = experiment.setup(config, "/tmp/difflax_bench_unused")
  state = experiment.init_state(s)
  step_fn = experiment.jit_train_step(s)
  sample_fn = sampling.make_sample_fn(s, "ddim", f"ddim{args.ddim_steps}")
  it = data_lib.make_iterator(config.data, s.mesh, seed=config.seed)
  rows, spent, step, next_eval = [], 0.0, 0, args.eval_every
  budget_step = None  # difflax's step count at the budget (the step-rate ratio's).
  while True:
    t0 = time.perf_counter()
    batch = next(it)
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics["loss"])
    spent += time.perf_counter() - t0
    step += 1
    at_budget = spent >= args.budget and budget_step is None
    if spent >= next_eval or at_budget:
      imgs, _ = sampling.generate(s, sample_fn, state.ema_params, jax.random.key(step),
                                  args.num_samples, config.sample.batch_size, as_uint8=False)
      rows.append(_row(spent, step, quality.score(config, np.asarray(imgs), s.mesh)))
      rows[-1]["past_budget"] = budget_step is not None
      print(json.dumps({"difflax": rows[-1]}), file=sys.stderr, flush=True)
      next_eval += args.eval_every
      if at_budget:
        budget_step, next_eval = step, spent + args.eval_every
      if budget_step is not None and (target_fd is None or rows[-1]["quick_fd"] <= target_fd
                                      or spent >= args.max_seconds):
        return rows, budget_step


def peer_run(args, config) -> list[dict] | None:
  try:
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
  except ImportError:
    return None
  import numpy as np
  from difflax import data as data_lib
  from difflax.evaluation import quality
  torch.manual_seed(0)
  m, r = config.model, config.data.resolution
  chans = tuple(m.ch * k for k in m.ch_mult)
  levels = [r // 2 ** i for i in range(len(chans))]
  model = UNet2DModel(
      sample_size=r, in_channels=3, out_channels=3, block_out_channels=chans,
      layers_per_block=m.num_res_blocks,
      down_block_types=tuple("AttnDownBlock2D" if x in m.attn_resolutions else "DownBlock2D"
                             for x in levels),
      up_block_types=tuple("AttnUpBlock2D" if x in m.attn_resolutions else "UpBlock2D"
                           for x in reversed(levels)),
      attention_head_dim=None, norm_num_groups=m.num_groups, dropout=0.0)
  train_sched = DDPMScheduler(num_train_timesteps=config.diffusion.num_timesteps,
                              beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
  sample_sched = DDIMScheduler(num_train_timesteps=config.diffusion.num_timesteps,
                               beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                               clip_sample=True, set_alpha_to_one=False)
  opt = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
  it = data_lib.host_batches(config.data, seed=config.seed)  # The same batches as difflax.
  gen = torch.Generator().manual_seed(0)
  rows, spent, step, next_eval = [], 0.0, 0, args.eval_every
  while True:
    t0 = time.perf_counter()
    x0 = torch.from_numpy(np.ascontiguousarray(next(it)["image"].transpose(0, 3, 1, 2)))
    t = torch.randint(0, config.diffusion.num_timesteps, (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    loss = torch.nn.functional.mse_loss(model(train_sched.add_noise(x0, eps, t), t).sample, eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    spent += time.perf_counter() - t0
    step += 1
    if spent >= next_eval or spent >= args.budget:
      imgs = _peer_samples(model, sample_sched, args, r, torch)
      rows.append(_row(spent, step, quality.score(config, imgs)))
      print(json.dumps({"peer": rows[-1]}), file=sys.stderr, flush=True)
      next_eval += args.eval_every
    if spent >= args.budget:
      return rows


def _peer_samples(model, sched, args, r, torch):
  import numpy as np
  sched.set_timesteps(args.ddim_steps)
  out, gen = [], torch.Generator().manual_seed(1)
  with torch.no_grad():
    for lo in range(0, args.num_samples, 32):
      x = torch.randn((min(32, args.num_samples - lo), 3, r, r), generator=gen)
      for t in sched.timesteps:
        x = sched.step(model(x, t).sample, t, x, eta=0.0).prev_sample
      out.append(x.clamp(-1, 1).numpy().transpose(0, 2, 3, 1))
  return np.concatenate(out)


def _row(seconds, step, q) -> dict:
  return {"seconds": round(seconds, 1), "step": step,
          **{k: q[k] for k in ("quick_fd", "quick_kid", "shape_score", "confident",
                               "real_quick_fd", "features", "num")}}


def main():
  p = _common.parser(__doc__)
  p.add_argument("--budget", type=float, default=600.0, help="training seconds per framework")
  p.add_argument("--eval-every", type=float, default=150.0, help="training seconds per eval")
  p.add_argument("--max-seconds", type=float, default=0.0,
                 help="difflax trains on past the budget until it reaches the peer's final "
                      "quick FD or this many training seconds (0: the budget)")
  p.add_argument("--num-samples", type=int, default=128)
  p.add_argument("--ddim-steps", type=int, default=50)
  p.add_argument("--feature-steps", type=int, default=0,
                 help="quick network recipe length (0: the config's; smoke runs use fewer)")
  args = p.parse_args()
  args.max_seconds = max(args.max_seconds, args.budget)  # 0: no extension past the budget.
  config = _common.reference_config(args)
  config.data.name = "embedded"
  if args.feature_steps:
    config.eval.feature_steps = args.feature_steps
  config.sample.batch_size = min(32, args.num_samples)
  peer = peer_run(args, config)
  ours, budget_step = difflax_run(args, config, peer[-1]["quick_fd"] if peer else None)
  result = {"benchmark": "peer_time_to_quality", "budget_seconds": args.budget,
            "max_seconds": args.max_seconds,
            "resolution": config.data.resolution, "batch_size": config.data.batch_size,
            "ddim_steps": args.ddim_steps, "num_samples": args.num_samples,
            "difflax": ours, "peer": peer, "seconds_to_peer_final_fd": None, "ratio": None,
            "ratio_lower_bound": None, "step_rate_ratio": None}
  if peer:
    target = peer[-1]["quick_fd"]
    reached = [r["seconds"] for r in ours if r["quick_fd"] <= target]
    result["step_rate_ratio"] = budget_step / peer[-1]["step"]
    if reached:
      result["seconds_to_peer_final_fd"] = reached[0]
      result["ratio"] = reached[0] / peer[-1]["seconds"]
    else:
      result["ratio_lower_bound"] = ours[-1]["seconds"] / peer[-1]["seconds"]
  print(json.dumps(result))


if __name__ == "__main__":
  main()
