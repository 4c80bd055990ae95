"""Flow matching (`difflax/processes/flow.py`): the path, the loss and the ODE samplers against
the closed forms of a Gaussian dataset, and the process end to end in a cascade with growth."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config

from difflax import processes
from difflax import train
from difflax.processes import flow

MU, S = 0.3, 0.5  # Data N(MU, S^2) per dimension.


def optimal_velocity(x, model_time):
  """E[eps - x0 | x_t = x] for x0 ~ N(MU, S^2), eps ~ N(0, 1), x_t = (1 - t) x0 + t eps: the
  minimiser of the flow-matching loss, in closed form (Gaussian conditioning)."""
  t = (model_time / flow.TIME_SCALE).reshape((-1,) + (1,) * (x.ndim - 1))
  a, var = 1.0 - t, (1.0 - t) ** 2 * S ** 2 + t ** 2
  centred = x - a * MU
  return t * centred / var - (MU + a * S ** 2 * centred / var)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_the_optimal_velocity_integrates_to_the_data_distribution(sampler):
  """The ODE of the exact velocity field carries N(0, I) to N(MU, S^2): sample moments converge
  as steps grow; Heun (second order) at 8 steps beats Euler at 8."""
  shape, key = (20_000, 1, 1, 2), jax.random.key(0)
  run = jax.jit(lambda n: flow.SAMPLERS[sampler](optimal_velocity, shape, key, n),
                static_argnums=0)
  err = {}
  for n in (2, 8, 64):
    x = np.asarray(run(n))
    err[n] = abs(x.mean() - MU) + abs(x.std() / S - 1)
  assert err[64] < err[8] < err[2], err
  assert err[64] < 0.03, err  # Monte Carlo noise of 40k draws is ~0.01.
  x8 = np.asarray(flow.SAMPLERS["euler"](optimal_velocity, shape, key, 8))
  if sampler == "heun":
    assert err[8] < 0.5 * (abs(x8.mean() - MU) + abs(x8.std() / S - 1))


def test_the_loss_at_the_optimal_velocity_is_the_conditional_variance():
  """E||v*(x_t) - (eps - x0)||^2 = Var(eps - x0 | x_t) = 1 + S^2 - (t - (1 - t) S^2)^2 /
  ((1 - t)^2 S^2 + t^2) per dimension; any other field (here v* + 0.1) costs more."""
  n = 50_000
  k0, k1 = jax.random.split(jax.random.key(1))
  x0 = MU + S * jax.random.normal(k0, (n, 1, 1, 1))
  noise = jax.random.normal(k1, (n, 1, 1, 1))
  for t in (0.1, 0.5, 0.9):
    ts = jnp.full((n,), t)
    got = float(flow.flow_loss(optimal_velocity, x0, ts, noise)["loss"].mean())
    want = 1 + S ** 2 - (t - (1 - t) * S ** 2) ** 2 / ((1 - t) ** 2 * S ** 2 + t ** 2)
    assert got == pytest.approx(want, rel=0.02)
    worse = flow.flow_loss(lambda x, m: optimal_velocity(x, m) + 0.1, x0, ts, noise)["loss"]
    assert float(worse.mean()) == pytest.approx(want + 0.01, rel=0.02)


def test_flow_process_config_checks():
  """Each mistake names the setting to change (`config.load` raises ConfigError, a ValueError)."""
  for change, says in [({"sample.sampler": "ddim"}, "euler, heun"),
                       ({"loss.type": "hybrid"}, "loss.type='simple'"),
                       ({"sample.steps": "ddim50"}, "number of"),
                       ({"loss.timestep_sampler": "importance"}, "discrete")]:
    c = load_config("flow_cifar10", "tiny")
    for k, v in change.items():
      block, field = k.split(".")
      c[block][field] = v
    with pytest.raises(ValueError, match=says):
      processes.validate(c)


def test_a_grown_flow_base_and_a_flow_sr_stage_train_and_sample_the_pipeline(tmp_path):
  """Flow matching composes with the rest: a cascade whose base is flow, progressively grown
  4 -> 8, and whose 16x16 SR stage is flow too (Gaussian conditioning augmentation on the
  base's output), trains both stages and samples the pipeline."""
  c = load_config("cascade_32_64", "tiny")
  for name in ("base", "sr_64"):
    st = c.stages[name]
    st.diffusion.update(type="flow", var_type="fixed_small")
    st.loss.update(type="simple", timestep_sampler="logit_normal", min_snr_gamma=0.0)
    st.train.update(preview_sampler="euler", preview_every=0, num_steps=4)
    st.sample.update(sampler="heun", steps="3")
  c.stages.base.model.update(ch_mult=(1, 1), attn_resolutions=(), project_downsample=True)
  c.stages.base.growth.update(resolutions=(4, 8), stage_steps=(2,), fade_kind="abrupt")
  c.stages.sr_64.model.update(ch_mult=(1,))
  out = train.run(c, str(tmp_path), mode="train,sample")["train"]
  assert out["base"]["step"] == 4 and out["sr_64"]["step"] == 4
  (out_dir,) = glob.glob(str(tmp_path / "pipeline" / "*"))
  # The directory names what decides the samples: each stage's step, sampler and guidance.
  assert os.path.basename(out_dir).startswith("base4_heun3_w0_sr_644_heun3_w0_seed0_n8")
  imgs = np.load(os.path.join(out_dir, "final.npz"))["images"]
  assert imgs.shape == (8, 16, 16, 3) and len({im.tobytes() for im in imgs}) == 8
