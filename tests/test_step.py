import jax
import numpy as np

from difflax import data
from difflax import diffusion as diff_lib
from difflax import losses
from difflax import models
from difflax import state as state_lib
from difflax import step as step_lib


def test_loss_on_a_fixed_batch_decreases(tiny_config):
  c = tiny_config
  c.optim.update(lr=3e-3, warmup_steps=1)
  c.loss.type = "hybrid"
  c.diffusion.var_type = "learned_range"
  model = models.build_model(c)
  opt, sched = state_lib.make_optimizer(c.optim)
  state = state_lib.init_state(model, opt, c, jax.random.key(0))
  objective = losses.make_objective(c, diff_lib.from_config(c.diffusion))
  step = jax.jit(step_lib.make_train_step(model, objective, opt, sched, c, jax.random.key(1)))
  images, labels = data.embedded_dataset(8, 8)
  batch = {"image": images.astype(np.float32) / 127.5 - 1, "label": labels}
  history = []
  for _ in range(80):
    state, m = step(state, batch)
    history.append(float(m["loss"]))
  assert int(state.step) == 80 and np.isfinite(history).all()
  assert np.mean(history[-10:]) < 0.6 * np.mean(history[:10]), history
  assert {"mse", "vb", "grad_norm", "lr"} <= set(m)
  # EMA moved towards the params but lags them.
  p, e = jax.tree_util.tree_leaves(state.params)[0], jax.tree_util.tree_leaves(state.ema_params)[0]
  assert not np.allclose(p, e)


def test_ema_decay_warmup():
  np.testing.assert_allclose(state_lib.ema_decay_at(0, 0.999, True), 0.1)
  np.testing.assert_allclose(state_lib.ema_decay_at(10**6, 0.999, True), 0.999)
  np.testing.assert_allclose(state_lib.ema_decay_at(0, 0.9999, False), 0.9999)
