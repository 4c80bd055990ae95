"""DDPM (Ho et al. 2020) on CIFAR-10; the default preset is a CPU-scale run on the embedded data.

  python -m difflax.main --config=configs/ddpm_cifar10.py --workdir=runs/ddpm         # CPU, minutes
  python -m difflax.main --config=configs/ddpm_cifar10.py:paper --workdir=runs/ddpm   # paper, TPU/GPU
  python -m difflax.main --config=configs/ddpm_cifar10.py:tiny --workdir=/tmp/t       # smoke test

Presets (comma-separated after ':'): paper | tiny, plus num_steps= batch= resolution= dataset=.

On pods (`--mode=plan`, measured with the TPU compiler, docs/plans/ddpm_cifar10): `:paper`
(35.7 M params, batch 128, fp32, fsdp 1) fits a v5e:2x2 slice at 1.66 GiB per chip of 16; 14 ms
per step at MFU 0.4, 0.13 days to its 800k steps.
"""
from difflax import config as config_lib
from difflax import presets as preset_lib

PRESETS = ("paper", "tiny")


def get_config(arg=None):
  presets, kv = preset_lib.parse_arg(arg)
  preset_lib.check_presets(presets, PRESETS, __file__)
  c = config_lib.base_config()
  c.diffusion.schedule = "linear"
  c.diffusion.num_timesteps = 1000
  c.diffusion.var_type = "fixed_large"  # DDPM's CIFAR-10 model samples with sigma_t^2 = beta_t.
  c.loss.type = "simple"

  if "paper" in presets:
    preset_lib.apply_ddpm_cifar10(c)
  elif "tiny" in presets:
    preset_lib.apply_tiny(c)
  else:
    # CPU scale on the embedded dataset: visibly learns shapes and colours in a few minutes.
    c.sample.update(sampler="ddpm", steps="250")

  preset_lib.apply_shorthands(c, kv, __file__)
  return config_lib.finalize(c)
