"""Flow matching (rectified flow) on CIFAR-10; the default preset is a CPU-scale run on the
embedded data.

  python -m difflax.main --config=configs/flow_cifar10.py --workdir=runs/flow          # CPU, minutes
  python -m difflax.main --config=configs/flow_cifar10.py:paper --workdir=runs/flow    # TPU/GPU
  python -m difflax.main --config=configs/flow_cifar10.py:tiny --workdir=/tmp/t        # smoke test

Presets: paper | tiny, plus num_steps= batch= resolution= dataset= folder= tfds=.

The process (`difflax/processes/flow.py`): x_t = (1 - t) x0 + t eps, the network regresses the
velocity eps - x0, t logit-normal(0, 1) ("rf/lognorm(0.00, 1.00)", the best of Esser et al.
2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", Sec. 3.1 and
Table 1); samples by Euler (previews) or Heun (`--mode=sample`) integration from t = 1 to 0.
`:paper` is not a reproduction of a published flow run on CIFAR-10: it is DDPM's CIFAR-10 recipe
(network, optimiser, batch 128, 800k steps; Ho et al. 2020 App. B) with that objective, so the
two configs compare processes on one network.

On pods (`--mode=plan`, docs/plans/flow_cifar10): `:paper` (35.7 M params, batch 128, fp32) fits
a v5e:2x2 slice at 1.66 GiB per chip of 16, 14 ms per step at MFU 0.4 (DDPM's numbers: the
same network, another loss).
"""
from difflax import config as config_lib
from difflax import presets as preset_lib

PRESETS = ("paper", "tiny")


def get_config(arg=None):
  presets, kv = preset_lib.parse_arg(arg)
  preset_lib.check_presets(presets, PRESETS, __file__)
  c = config_lib.base_config()

  if "paper" in presets:
    preset_lib.apply_ddpm_cifar10(c)
    c.sample.update(sampler="heun", steps="50")
    c.train.preview_steps = "50"
  elif "tiny" in presets:
    preset_lib.apply_tiny(c)
  else:
    c.sample.update(steps="50")
  c.diffusion.update(type="flow", var_type="fixed_small", num_timesteps=50)
  c.loss.update(type="simple", timestep_sampler="logit_normal", logit_normal_mean=0.0,
                logit_normal_std=1.0)
  c.train.preview_sampler = "euler"
  c.sample.sampler = "heun"

  preset_lib.apply_shorthands(c, kv, __file__)
  return config_lib.finalize(c)
