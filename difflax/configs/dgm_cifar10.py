"""Paper 002 (Baryshnikov, "Diffusion Generative Models"): DDPM's CIFAR-10 setup with the paper's
objectives, architecture variants and short chains as presets of one config.

  python -m difflax.main --config=configs/dgm_cifar10.py:is --workdir=runs/dgm_is          # CPU
  python -m difflax.main --config=configs/dgm_cifar10.py:iwdiff,is --workdir=runs/dgm_iw   # CPU
  python -m difflax.main --config=configs/dgm_cifar10.py:paper,mbconv64 --workdir=runs/mb  # GPU
  python -m difflax.main --config=configs/dgm_cifar10.py:is --workdir=runs/dgm_is --mode=sample \
      --config.sample.surrogate=runs/ddpm16 --config.sample.surrogate_t_mid=500  # Algorithm 4

Presets (comma-separated after ':', combinable):
  objectives (Table 4.4)  is: importance-sampled timesteps (eq. 8-9); is2: the same with two
      extra no-grad history refreshes per step ("Importance Sampling +2"); iwdiff: IWDiff with
      k=2 (Algorithm 3; `--config.loss.iwdiff_k=K` for other k, `--config.optim.grad_accum=M`
      when k x batch does not fit); `is,iwdiff`: both.
  architectures (Table 4.3)  default | deep_res1 | shallow_res2 | shallow_res1 | mbconv64 |
      mbconv96: the paper's UNets (with `paper`: its CIFAR-10 sizes, 34.2M ... 11.5M params; at
      CPU scale the same structures with a quarter of the channels).
  short   T = 100 with betas 4e-4 -> 0.18 (Sec. 4.3: the signal ratios of T = 1000 at both ends).
  paper   CIFAR-10 32x32, DDPM's hyperparameters, 150k steps (Sec. 4.1-4.2). tiny: smoke test.
  Without `paper` / `tiny`: the embedded dataset at 16x16, a CPU-sized UNet, minutes on 2 cores.
Surrogate Diffusion (Algorithm 4) is a sampling option of any config: `sample.surrogate`.

On pods (`--mode=plan`, docs/plans/dgm_cifar10): `:paper` (35.7 M params, batch 128, fp32,
fsdp 1) fits a v5e:2x2 slice at 1.66 GiB per chip of 16; 14 ms per step at MFU 0.4, 0.02 days
to its 150k steps.
"""
from difflax import config as config_lib
from difflax import presets as preset_lib

OBJECTIVES = ("is", "is2", "iwdiff")
# Table 4.3: (block, channel multipliers, residual blocks, base channels at CIFAR-10 scale).
ARCHITECTURES = {
    "default": ("res", (1, 2, 2, 2), 2, 128),
    "deep_res1": ("res", (1, 2, 2, 2), 1, 128),
    "shallow_res2": ("res", (1, 2, 2), 2, 128),
    "shallow_res1": ("res", (1, 2, 2), 1, 128),
    "mbconv64": ("mbconv", (1, 2, 2, 2), 2, 64),
    "mbconv96": ("mbconv", (1, 2, 2, 2), 2, 96),
}
PRESETS = ("paper", "tiny", "short") + OBJECTIVES + tuple(ARCHITECTURES)


def get_config(arg=None):
  presets, kv = preset_lib.parse_arg(arg)
  preset_lib.check_presets(presets, PRESETS, __file__)
  archs = [p for p in presets if p in ARCHITECTURES]
  if len(archs) > 1:
    raise config_lib.ConfigError(f"Pick one architecture preset, got {archs}.")
  c = config_lib.base_config()
  c.diffusion.update(schedule="linear", num_timesteps=1000, var_type="fixed_large")
  c.loss.type = "simple"

  if "paper" in presets:
    preset_lib.apply_ddpm_cifar10(c)
    c.train.num_steps = 150_000  # Sec. 4.2: the paper's runs (FID 4.93 for the default UNet).
  elif "tiny" in presets:
    preset_lib.apply_tiny(c)
  else:
    c.sample.update(sampler="ddpm", steps="250")
  if archs:
    block, ch_mult, blocks, ch = ARCHITECTURES[archs[0]]
    if "paper" not in presets:
      ch //= 4  # CPU scale: the structure at a quarter of the width.
    c.model.update(block=block, ch_mult=ch_mult, num_res_blocks=blocks, ch=ch)
    if "paper" not in presets:
      c.model.attn_resolutions = (c.data.resolution // 2,)
  if "short" in presets:
    # Sec. 4.3: T = 100 with the end-point signal ratios of the T = 1000 chain.
    c.diffusion.update(num_timesteps=100, beta_start=4e-4, beta_end=0.18)
    if "tiny" not in presets:
      c.sample.steps = ""  # Every step of the short chain.
  if "is" in presets or "is2" in presets:
    c.loss.timestep_sampler = "importance"
    c.loss.resampler_extra_updates = 2 if "is2" in presets else 0
  if "iwdiff" in presets:
    c.loss.iwdiff_k = 2  # Table 4.4's k.

  preset_lib.apply_shorthands(c, kv, __file__)
  return config_lib.finalize(c)
