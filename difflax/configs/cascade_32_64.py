"""Cascaded diffusion (CDM, Ho, Saharia et al.): a 32x32 base model and a 32->64 super-resolution
stage with Gaussian conditioning augmentation amortized over s (paper 001 Sec. 3.2-3.3, Table 3).

  python -m difflax.main --config=configs/cascade_32_64.py --workdir=runs/cascade      # both stages
  python -m difflax.main --config=configs/cascade_32_64.py --workdir=runs/cascade --mode=sample
  python -m difflax.main --config=configs/cascade_32_64.py --workdir=runs/cascade --mode=sweep
  python -m difflax.main --config=configs/cascade_32_64.py:paper --workdir=gs://.../cdm64 \
      --config.cascade.stage=sr_64                                 # one stage per pod job

Presets: paper | tiny, plus s= (the SR stage's sampling level) and mode=truncated|non_truncated.
Stage fields are overridden as --config.stages.<stage>.<block>.<key>=value.

Default (CPU, embedded dataset): a class-conditional base 32x32 on 2x2 patches with FiLM
conditioning (~0.7M params, 3000 steps, v-prediction + min-SNR-5, cosine betas, sampled with
classifier-free guidance w=2) then SR 32->64 (~0.4M params, 300 steps); about 8 minutes of
training for both on 2 cores. The SR stage is amortized over s ~ U{0..400} of the base's
1000-step forward process and samples non-truncated at s=100.

On pods (`--mode=plan`, docs/plans/cascade_32_64, planned with mesh.fsdp=1 before the preset
moved to 16): `:paper` on v5e:16x16 (256 chips, batch 2048 = 8 per chip, bf16): the 792 M base
fits at 13.5 GiB per chip of 16, 40 ms per step at MFU 0.4, 0.32 days to 700k steps; the 718 M
sr_64 stage 13.6 GiB, 137 ms, 0.63 days to 400k steps.
"""
from difflax import cascade
from difflax import config as config_lib
from difflax import presets as preset_lib

PRESETS = ("paper", "tiny")


def cdm_64_stage(c, num_res_blocks: int, num_steps: int):
  """CDM Appendix B settings shared by the 32x32 base and the 32->64 SR model: ImageNet 64
  (class-conditional, random flips), ch 256, mult 1,2,3,4, attention at 8 and 16 with 4 heads,
  dropout 0.1, batch 2048, Adam 1e-4, EMA 0.9999, T=4000 cosine, learned variances."""
  c.data.update(name="imagenet_resized/64x64", num_classes=1000, batch_size=2048,
                random_flip=True)
  c.model.update(ch=256, ch_mult=(1, 2, 3, 4), num_res_blocks=num_res_blocks,
                 attn_resolutions=(8, 16), num_heads=4, dropout=0.1, num_groups=32,
                 class_conditional=True, use_scale_shift_norm=True, label_dropout=0.0,
                 dtype="bfloat16")  # TPU training (Google's CDM): bf16 compute, fp32 state.
  # Params, EMA and Adam sharded 16 ways: replicated, the base's took 11.8 of a v5e chip's 16 GiB
  # (--mode=plan on v5e:16x16); sharded they take 0.74 (README, "The papers' runs on pods").
  c.mesh.fsdp = 16
  c.diffusion.update(schedule="cosine", num_timesteps=4000, var_type="learned_range")
  c.loss.update(type="hybrid")
  c.optim.update(lr=1e-4, warmup_steps=0, grad_clip=0.0, ema_decay=0.9999, ema_warmup=False)
  c.train.update(num_steps=num_steps, log_every=100, checkpoint_every=10_000,
                 preview_every=10_000, preview_num=64, preview_steps="100")
  c.sample.update(sampler="ddpm", steps="", batch_size=256)


def base_stage(paper: bool):
  c = config_lib.base_config()
  if paper:
    cdm_64_stage(c, num_res_blocks=6, num_steps=700_000)  # "32x32 base model"
    c.data.resolution = 32  # The 64x64 images resized (antialiased) by the data pipeline.
  else:
    # Chosen by measurement (README, "Time to quality"): a UNet whose 32x32 level is thin (its
    # cost is the step's; the shapes are learned at 16x16 and 8x8), class-conditional (the
    # labels are free and the pipeline passes them on), v-prediction with min-SNR-5 weighting
    # (Hang et al. 2023), cosine betas and a 2e-3 learning rate.
    c.data.update(resolution=32, batch_size=16)
    # 2x2 patches (space-to-depth): the UNet runs at 16x16 inside, ~4x cheaper steps, so 3000
    # steps fit where 1000 did and draw the shapes (docs/results.md, the plain style).
    # FiLM scale-shift conditioning (improved DDPM's `use_scale_shift_norm`): better on each of
    # three seeds of this base, quick FD 6.45 / 3.04 / 5.48 -> 2.45 / 2.39 / 3.43, for ~10 % more
    # time (docs/results.md, the techniques on the plain data).
    c.model.update(ch=16, ch_mult=(1, 2, 4), attn_resolutions=(8,), num_heads=2,
                   class_conditional=True, patch_size=2, use_scale_shift_norm=True)
    c.diffusion.update(schedule="cosine", model_output="v")
    c.loss.min_snr_gamma = 5.0
    c.optim.lr = 2e-3
    c.train.update(num_steps=3000, checkpoint_every=1000, preview_every=1500)
    # Classifier-free guidance (Ho & Salimans 2022; the model trains with 10 % null labels): 64
    # pipeline samples of one trained run of this default, w = 0 / 1 / 2 / 4: shape score
    # 8.59 / 9.54 / 9.74 / 9.58 (real images 9.93), quick FD 4.3 / 3.5 / 3.8 / 4.3 [0.74]
    # (docs/results.md). CDM samples unguided (`:paper`).
    c.sample.update(sampler="ddpm", steps="100", guidance=2.0)
  return c


def sr_stage(paper: bool, low_res: int = 32, resolution: int = 64):
  c = config_lib.base_config()
  c.cond.update(aug="gaussian", sample_mode="non_truncated")
  if paper:
    # "32x32 -> 64x64 super-resolution", amortized over s (Sec. 4.3, Table 3).
    cdm_64_stage(c, num_res_blocks=5, num_steps=400_000)
    c.data.update(resolution=resolution, low_res=low_res)
    # Table 3a: non-truncated s=751 ties the best FID vs train (1.48); sweep with --mode=sweep.
    c.cond.update(sample_level=751)
  else:
    c.data.update(resolution=resolution, low_res=low_res, batch_size=16)
    c.model.update(ch=16, ch_mult=(1, 2, 2, 2), attn_resolutions=(), num_groups=4,
                   class_conditional=True)
    c.diffusion.model_output = "v"
    c.loss.min_snr_gamma = 5.0
    c.optim.lr = 2e-3
    c.cond.update(max_level=400, sample_level=100)
    c.train.update(num_steps=300, checkpoint_every=150, preview_every=300)
    c.eval.quality_samples = 64  # Conditioned on real low-res images; the pipeline's line counts.
    c.sample.update(sampler="ddpm", steps="50")
  return c


def get_config(arg=None):
  presets, kv = preset_lib.parse_arg(arg)
  preset_lib.check_presets(presets, PRESETS, __file__)
  paper = "paper" in presets
  c = cascade.cascade_config({"base": base_stage(paper), "sr_64": sr_stage(paper)})
  if paper:
    c.cascade.update(num=64, batch_size=64, sweep_levels=(0, 251, 501, 751, 1001, 1251, 1501),
                     sweep_num=10_000)
  if "tiny" in presets:
    preset_lib.apply_tiny_cascade(c)
  for k, v in kv.items():
    if k == "s":
      c.stages.sr_64.cond.sample_level = int(v)
    elif k == "mode":
      c.stages.sr_64.cond.sample_mode = v
    else:
      raise config_lib.ConfigError(f"Unknown ':{k}=...' for {__file__}; valid: s, mode.")
  return config_lib.finalize(c)
