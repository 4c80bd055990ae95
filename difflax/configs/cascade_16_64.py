"""CDM's small ablation pipeline (paper 001 Sec. 4.3, Table 2b, Fig. 7): a 16x16 base model and a
16->64 super-resolution model trained with non-truncated Gaussian conditioning augmentation at one
fixed level s (the paper trains separate SR models at s=101 and s=1001; s=0 is the no-augmentation
baseline whose FID degrades from 2.35 to 6.02).

  python -m difflax.main --config=configs/cascade_16_64.py --workdir=runs/c16          # s=1001/4
  python -m difflax.main --config=configs/cascade_16_64.py:s=0 --workdir=runs/c16_noaug
  python -m difflax.main --config=configs/cascade_16_64.py --workdir=runs/c16 --mode=sample

Presets: paper | tiny, plus s= (the fixed level, trained and sampled; in the base's steps).
Appendix B does not list this ablation's architectures; `:paper` uses the 64x64 pipeline's
diffusion settings (4000 cosine steps, learned variances, hybrid loss, class-conditional) with the
32->64 models' UNets scaled to the resolutions.

On pods (`--mode=plan`, measured with the TPU compiler, docs/plans/cascade_16_64): `:paper`
(base 380 M params, SR 168 M; batch 2048, bf16, fsdp 16) fits a v5e:16x16 slice at 1.86 / 1.93
GiB per chip of 16 (9 / 34 ms per step at MFU 0.4) — 12 % of HBM, so a smaller slice would do
(not planned).
"""
from difflax import cascade
from difflax import config as config_lib
from difflax import presets as preset_lib
from difflax.configs import cascade_32_64 as cdm

PRESETS = ("paper", "tiny")


def get_config(arg=None):
  presets, kv = preset_lib.parse_arg(arg)
  preset_lib.check_presets(presets, PRESETS, __file__)
  paper = "paper" in presets
  base, sr = cdm.base_stage(paper), cdm.sr_stage(paper, low_res=16, resolution=64)
  base.data.resolution = 16
  if paper:
    base.model.update(ch_mult=(1, 2, 3), attn_resolutions=(8, 16))
    sr.model.update(ch=128, ch_mult=(1, 2, 3, 4), attn_resolutions=(16,))
    level = 1001
  else:
    # CPU: the DDPM default's model at 16x16; the base's T is 1000, so s scales to ~1001/4.
    base.model.update(ch=32, ch_mult=(1, 2, 2), attn_resolutions=(8,))
    base.data.batch_size = 32
    base.train.update(num_steps=1500, checkpoint_every=500, preview_every=500)
    level = 250
  for k, v in kv.items():
    if k != "s":
      raise config_lib.ConfigError(f"Unknown ':{k}=...' for {__file__}; valid: s.")
    level = int(v)
  sr.cond.update(train_level=level, sample_level=level)
  c = cascade.cascade_config({"base": base, "sr_64": sr})
  c.cascade.sweep_levels = (level,)
  if "tiny" in presets:
    preset_lib.apply_tiny_cascade(c)
    c.stages.sr_64.cond.update(train_level=min(level, 100), sample_level=min(level, 100))
  return config_lib.finalize(c)
