"""NCSNv2 (Song & Ermon 2020): noise-conditional score model trained by denoising score matching
and sampled with annealed Langevin dynamics, noise scales designed from the data.

  python -m difflax.main --config=configs/ncsnv2_cifar10.py --workdir=runs/ncsn        # CPU
  python -m difflax.main --config=configs/ncsnv2_cifar10.py:paper --workdir=runs/ncsn  # CIFAR-10
  python -m difflax.noise_design --config=configs/ncsnv2_cifar10.py    # print the noise design

The default preset computes sigma_1 (Technique 1), the number of scales (Technique 2) and the
Langevin step size (Technique 4) from the embedded training data at start-up; nothing is
hard-coded. `:paper` holds the paper's CIFAR-10 values (sigma 50 -> 0.01, L=232, T=5,
epsilon 6.2e-6, EMA 0.999, batch 128, lr 1e-4, 300k steps); the paper's RefineNet is replaced by
difflax's UNet as the unconditional inner network s(x) of s(x, sigma) = s(x) / sigma.

On pods (`--mode=plan`, docs/plans/ncsnv2_cifar10): `:paper` (35.7 M params, batch 128, fp32,
fsdp 1) fits a v5e:2x2 slice at 1.66 GiB per chip of 16; 14 ms per step at MFU 0.4, 0.05 days to
its steps.
"""
from difflax import config as config_lib
from difflax import presets as preset_lib

PRESETS = ("paper", "tiny")


def get_config(arg=None):
  presets, kv = preset_lib.parse_arg(arg)
  preset_lib.check_presets(presets, PRESETS, __file__)
  c = config_lib.base_config()
  c.diffusion.type = "ncsn"
  c.train.eval_every = 0

  if "paper" in presets:
    c.data.update(name="cifar10", resolution=32, batch_size=128)
    c.ncsn.update(sigma_first=50.0, sigma_last=0.01, num_scales=232, steps_per_scale=5,
                  step_size=6.2e-6)
    c.model.update(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                   num_groups=32)
    c.optim.update(lr=1e-4, warmup_steps=0, grad_clip=0.0, ema_decay=0.999, ema_warmup=False)
    c.train.update(num_steps=300_000, log_every=100, checkpoint_every=10_000,
                   preview_every=10_000, preview_num=64)
    c.sample.update(num=50_000, batch_size=256)
  elif "tiny" in presets:
    preset_lib.apply_tiny(c)
    c.ncsn.update(sigma_last=0.05, steps_per_scale=2, stat_examples=64)
  else:
    c.optim.ema_decay = 0.999

  preset_lib.apply_shorthands(c, kv, __file__)
  return config_lib.finalize(c)
