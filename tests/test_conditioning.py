"""The network's inputs besides (x_t, t), built by `difflax.conditioning` for training and
sampling alike."""
import jax
import jax.numpy as jnp
import numpy as np

from conftest import load_config

from difflax import cascade
from difflax import conditioning
from difflax import growth


def test_training_inputs_drop_labels_fade_and_augment_as_configured():
  c = load_config("ddpm_cifar10", "tiny")
  c.data.num_classes = 10
  c.model.update(class_conditional=True, label_dropout=0.3)
  n = 4000
  batch = {"image": jnp.zeros((n, 1, 1, 1)), "label": jnp.full((n,), 7, jnp.int32)}
  k1, k2 = jax.random.split(jax.random.key(0))
  plain = conditioning.for_training(c, growth.GrowthState(), batch, 5, k1, k2)
  labels = np.asarray(plain.labels)
  assert set(np.unique(labels)) == {7, 10}  # 10 = the null id of classifier-free guidance.
  assert abs(np.mean(labels == 10) - 0.3) < 0.03
  assert plain.fade_weight is None and plain.low_res is None
  c.growth.update(fade_steps=100, fade_offset=0.7, fade_kind="sinusoidal")
  fading = growth.GrowthState(stage=1, stage_start=10, fading=True)
  got = conditioning.for_training(c, fading, batch, 35, k1, k2).fade_weight
  assert got.shape == (n,)
  np.testing.assert_allclose(got, float(growth.fade_weight(25)), rtol=1e-6)


def test_sampling_inputs_augment_at_the_sample_level_or_keep_a_truncated_z_s():
  c = cascade.stage_config(load_config("cascade_32_64", "tiny"), "sr_64")
  low = jax.random.uniform(jax.random.key(1), (6, 8, 8, 3), minval=-1, maxval=1)
  key = jax.random.key(2)
  noised = conditioning.for_sampling(c, growth.GrowthState(), key, 6, low)
  want = cascade.sampling_condition(key, low, c.cond)
  np.testing.assert_array_equal(noised.low_res, want["low_res"])
  np.testing.assert_array_equal(noised.aug_level, want["aug_level"])
  assert not np.allclose(noised.low_res, low)  # sample_level 10 > 0 re-noises it.
  kept = conditioning.for_sampling(c, growth.GrowthState(), key, 6, low, already_at_level=True)
  np.testing.assert_array_equal(kept.low_res, low)
  np.testing.assert_array_equal(kept.aug_level, noised.aug_level)
  both = kept.tile(2)
  assert both.low_res.shape == (12, 8, 8, 3) and both.labels is None
  assert kept.rows(np.array([0, 5])).aug_level.shape == (2,)
  assert set(kept.kwargs()) == {"y", "low_res", "aug_level", "fade_weight"}  # The UNet's names.
