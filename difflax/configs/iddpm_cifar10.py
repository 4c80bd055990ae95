"""Improved DDPM (Nichol & Dhariwal 2021) on CIFAR-10: cosine schedule, learned variances, L_hybrid.

  python -m difflax.main --config=configs/iddpm_cifar10.py --workdir=runs/iddpm         # CPU, minutes
  python -m difflax.main --config=configs/iddpm_cifar10.py:paper --workdir=runs/iddpm   # paper scale
  python -m difflax.main --config=configs/iddpm_cifar10.py --workdir=runs/iddpm --mode=sample \
      --config.sample.steps=ddim50

Presets: paper | tiny, plus num_steps= batch= resolution= dataset=.

On pods (`--mode=plan`, docs/plans/iddpm_cifar10): `:paper` (52.5 M params, batch 128, fp32,
fsdp 1) fits a v5e:2x2 slice at 2.79 GiB per chip of 16; 19 ms per step at MFU 0.4, 0.11 days
to its steps.
"""
from difflax import config as config_lib
from difflax import presets as preset_lib

PRESETS = ("paper", "tiny")


def get_config(arg=None):
  presets, kv = preset_lib.parse_arg(arg)
  preset_lib.check_presets(presets, PRESETS, __file__)
  c = config_lib.base_config()
  c.diffusion.update(schedule="cosine", num_timesteps=4000, model_output="eps",
                     var_type="learned_range")
  c.loss.update(type="hybrid", vlb_weight=0.001)
  c.model.use_scale_shift_norm = True

  if "paper" in presets:
    # improved-diffusion's CIFAR-10 run: --num_channels 128 --num_res_blocks 3 --learn_sigma True
    # --dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine --lr 1e-4 --batch_size 128,
    # attention at 16 and 8 with 4 heads, EMA 0.9999, no warmup or clipping, 500k steps.
    c.data.update(name="cifar10", resolution=32, num_classes=10, batch_size=128)
    c.model.update(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=3, attn_resolutions=(16, 8),
                   num_heads=4, dropout=0.3, num_groups=32)
    c.optim.update(lr=1e-4, warmup_steps=0, grad_clip=0.0, ema_decay=0.9999, ema_warmup=False)
    c.train.update(num_steps=500_000, log_every=100, checkpoint_every=10_000,
                   preview_every=10_000, preview_num=64, preview_steps="100")
    c.sample.update(num=50_000, batch_size=256, sampler="ddpm", steps="100")
    c.eval.update(num_batches=10, batch_size=128)
  elif "tiny" in presets:
    preset_lib.apply_tiny(c)
    c.sample.sampler = "ddpm"
  else:
    # CPU scale on the embedded dataset; 1000 steps keep the bits/dim eval cheap on 2 cores.
    c.diffusion.num_timesteps = 1000
    c.model.num_heads = 2
    c.sample.update(sampler="ddpm", steps="50")

  preset_lib.apply_shorthands(c, kv, __file__)
  return config_lib.finalize(c)
