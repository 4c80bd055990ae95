"""CDM's full 256x256 pipeline (paper 001 Appendix B): 32x32 base -> 32->64 SR (Gaussian
conditioning augmentation, Sec. 3.2) -> 64->256 SR with Gaussian blur augmentation (Sec. 3.1:
3x3 kernel, sigma ~ U(0.4, 0.6) on 50% of the examples, none at sampling; Table 4a), a linear
schedule trained with continuous noise conditioning (2000 training steps' linear betas as the
continuous VP schedule `vp_linear`, the network sees log-SNR) and 100 inference steps.

  python -m difflax.main --config=configs/cascade_64_256.py --workdir=runs/c256        # CPU, small
  python -m difflax.main --config=configs/cascade_64_256.py:paper --workdir=gs://.../cdm256 \
      --config.cascade.stage=sr_256

Presets: paper | tiny. The CPU default keeps the structure at 16 -> 32 -> 64 on the embedded data.

On pods (`--mode=plan`, docs/plans/cascade_64_256, 2026-12-08): `:paper`'s sr_256 stage on
v5e:16x16 (256 chips, batch 1024 = 4 per chip, fsdp 16, bf16, 589 M params) needs 6.83 GiB of
a chip's 16 GiB with `model.remat=dots` (set below; without remat it is 10 MiB over), 19.5 TFLOP
per chip per step: 248 ms at MFU 0.4, 1.44 days to 500k steps. Its base and sr_64 stages are
cascade_32_64:paper's (that file's header).
"""
from difflax import cascade
from difflax import config as config_lib
from difflax import presets as preset_lib
from difflax.configs import cascade_32_64 as cdm

PRESETS = ("paper", "tiny")


def blur_stage(paper: bool, low_res: int, resolution: int):
  c = config_lib.base_config()
  c.cond.update(aug="blur", blur_sigma_min=0.4, blur_sigma_max=0.6, blur_prob=0.5, blur_kernel=3)
  # Continuous noise conditioning (SR3): t ~ U(0, 1) on the continuous limit of 2000 linear betas,
  # sampled on 100 steps of the same schedule.
  c.diffusion.update(type="continuous", gamma="vp_linear:beta_min=0.1,beta_max=20",
                     time_input="logsnr", num_timesteps=100)
  if paper:
    c.data.update(name="imagenet_resized/64x64", resolution=resolution, low_res=low_res,
                  num_classes=1000, batch_size=1024, random_flip=True)
    c.model.update(ch=128, ch_mult=(1, 2, 4, 4, 8, 8), num_res_blocks=3, attn_resolutions=(16,),
                   num_heads=1, dropout=0.0, num_groups=32, class_conditional=True,
                   use_scale_shift_norm=True, label_dropout=0.0, dtype="bfloat16",
                   # Planned on v5e:16x16 (4 per chip, fsdp 16, bf16): without remat the train
                   # step needs 10 MiB more than a chip's 16 GiB; with "dots" 6.83 GiB.
                   remat="dots")
    c.mesh.fsdp = 16  # 589M params: replicated state would take 8.8 GiB of every chip.
    c.optim.update(lr=1e-4, warmup_steps=0, grad_clip=0.0, ema_decay=0.9999, ema_warmup=False)
    c.train.update(num_steps=500_000, log_every=100, checkpoint_every=10_000,
                   preview_every=10_000, preview_num=16, preview_sampler="ddpm",
                   preview_steps="100")
    c.sample.update(sampler="ddpm", steps="100", batch_size=64)
  else:
    c.data.update(resolution=resolution, low_res=low_res, batch_size=8)
    c.model.update(ch=16, ch_mult=(1, 2, 2, 2), attn_resolutions=(), num_groups=4)
    c.train.update(num_steps=800, checkpoint_every=400, preview_every=400, preview_steps="50")
    c.sample.update(sampler="ddpm", steps="50")
  return c


def get_config(arg=None):
  presets, kv = preset_lib.parse_arg(arg)
  preset_lib.check_presets(presets, PRESETS, __file__)
  if kv:
    raise config_lib.ConfigError(f"Unknown ':key=value' {sorted(kv)} for {__file__}; use "
                                 "--config.<path>=value.")
  paper = "paper" in presets
  if paper:
    stages = {"base": cdm.base_stage(True), "sr_64": cdm.sr_stage(True),
              "sr_256": blur_stage(True, 64, 256)}
    # The 256 dataset: ImageNet at full size resized by TFDS; the lower stages box-downsample it.
    for st in stages.values():
      st.data.name = "imagenet2012"
  else:
    base = cdm.base_stage(False)
    base.data.resolution = 16
    stages = {"base": base, "sr_32": cdm.sr_stage(False, low_res=16, resolution=32),
              "sr_64": blur_stage(False, 32, 64)}
    stages["sr_64"].model.class_conditional = True  # As the 32_64 stages it builds on.
  c = cascade.cascade_config(stages)
  if "tiny" in presets:
    preset_lib.apply_tiny_cascade(c)
  return config_lib.finalize(c)
