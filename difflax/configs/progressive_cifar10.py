"""Pro-DDPM (Gandikota & Brown, paper 000): progressive growth of the UNet with sinusoidal fade-in.

  python -m difflax.main --config=configs/progressive_cifar10.py --workdir=runs/pro          # CPU
  python -m difflax.main --config=configs/progressive_cifar10.py:fade=linear --workdir=runs/pro_lin
  python -m difflax.main --config=configs/progressive_cifar10.py:static --workdir=runs/static
  python -m difflax.main --config=configs/progressive_cifar10.py:paper --workdir=gs://.../pro

Presets: paper | static | tiny, plus fade=sinusoidal|linear|abrupt and forward=full_res|stage_res.
`static` trains the final architecture from scratch at full resolution (the comparison of the
paper's Figure 2; benchmarks/growth_convergence.py runs both for the same wall-clock budget).

On pods (`--mode=plan`, measured with the TPU compiler, docs/plans/progressive_cifar10): `:paper`
(4 -> 32 px, 16.5 M -> 53.3 M params, batch 128, fp32, fsdp 1) fits a v5e:2x2 slice at every
level, the largest (32 px, fading) at 2.78 GiB per chip of 16; 20 ms per step at MFU 0.4.

Default (CPU, embedded data at 32x32): grows 8 -> 16 -> 32 after 400 steps per stage, each new
level faded in over 100 steps (Eq. 13, s = 0.7), 1400 steps in all.
"""
from difflax import config as config_lib
from difflax import presets as preset_lib

PRESETS = ("paper", "static", "tiny")


def get_config(arg=None):
  presets, kv = preset_lib.parse_arg(arg)
  preset_lib.check_presets(presets, PRESETS, __file__)
  c = config_lib.base_config()
  # Pro-DDPM builds on improved DDPM: hybrid loss with learned variances, T = 1000.
  c.diffusion.update(schedule="cosine", num_timesteps=1000, var_type="learned_range")
  c.loss.update(type="hybrid")
  c.model.update(project_downsample=True, use_scale_shift_norm=True)
  c.growth.update(fade_kind="sinusoidal", fade_steps=100, fade_offset=0.7, forward="full_res")

  if "paper" in presets:
    # The paper grows from 2x2 (here 4x4 with the UNet's 4x4 bottom level) on CIFAR-10 and
    # triggers each growth on an FID plateau with a 15-epoch buffer; the quick FD stands in for
    # FID and an "epoch" is 50000 / 128 steps. Its network details are in a supplement we do not
    # have; the UNet is improved-DDPM's CIFAR-10 one.
    c.data.update(name="cifar10", resolution=32, batch_size=128)
    c.model.update(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=3, attn_resolutions=(16, 8),
                   num_heads=4, dropout=0.3, num_groups=32)
    c.growth.update(resolutions=(4, 8, 16, 32), trigger="plateau", plateau_metric="quick_fd",
                    plateau_patience=15, plateau_every=390, min_stage_steps=390)
    c.optim.update(lr=1e-4, warmup_steps=0, grad_clip=0.0, ema_decay=0.9999, ema_warmup=False)
    c.train.update(num_steps=500_000, log_every=100, checkpoint_every=5_000,
                   preview_every=5_000, preview_num=64, preview_steps="100")
    c.eval.update(num_samples=1000, reference_examples=5000)
    c.sample.update(num=50_000, batch_size=256, sampler="ddpm", steps="100")
  elif "tiny" in presets:
    preset_lib.apply_tiny(c)
    c.data.resolution = 16
    c.model.update(ch_mult=(1, 2, 2), attn_resolutions=())
    c.growth.update(resolutions=(4, 8, 16), stage_steps=(2, 2), fade_steps=2)
    c.train.update(num_steps=8, checkpoint_every=2, preview_every=8)
    c.sample.sampler = "ddpm"
  else:
    c.data.update(resolution=32, batch_size=32)
    c.model.update(ch=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(8,), num_heads=2)
    c.growth.update(resolutions=(8, 16, 32), stage_steps=(400, 400))
    c.train.update(num_steps=1400, checkpoint_every=200, preview_every=200)
    c.sample.update(sampler="ddpm", steps="100")

  if "static" in presets:
    c.growth.resolutions = ()  # Same final UNet, trained from scratch at full resolution.
  for k, v in kv.items():
    if k == "fade":
      c.growth.fade_kind = v
    elif k == "forward":
      c.growth.forward = v
    else:
      preset_lib.apply_shorthands(c, {k: v}, __file__)
  return config_lib.finalize(c)
