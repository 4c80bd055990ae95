import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import config as config_lib
from difflax import models
from difflax import processes
from difflax.models.unet import UNet


def perturbed(params, scale=0.05):
  """Zero-initialised output layers make a fresh UNet output 0; perturb to see dependencies."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(9), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def tiny(**kw):
  base = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)
  return UNet(**{**base, **kw})


def test_shapes_names_and_learned_sigma():
  m = tiny(learn_sigma=True, num_heads=2)
  x = jnp.zeros((2, 8, 8, 3))
  params = m.init(jax.random.key(0), x, jnp.array([0, 5]))["params"]
  assert {"in_8", "down_8", "down_4", "up_4", "up_8", "out_8"} <= set(params)
  assert m.apply({"params": params}, x, jnp.array([0.5, 3.0])).shape == (2, 8, 8, 6)
  # Zero-initialised output: a fresh model predicts 0.
  assert float(jnp.abs(m.apply({"params": params}, x + 1, jnp.array([1, 2]))).max()) == 0.0


def test_conditioning_inputs_change_the_output():
  m = tiny(num_classes=10, aug_level_cond=True)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  t = jnp.array([3, 3])
  low = jax.random.normal(jax.random.key(2), (2, 4, 4, 3))
  params = m.init(jax.random.key(0), x, t, y=jnp.array([1, 2]), low_res=low,
                  aug_level=jnp.zeros(2))["params"]
  params = perturbed(params)
  f = lambda **kw: m.apply({"params": params}, x, t, **{"low_res": low, "y": jnp.array([1, 2]),
                                                        "aug_level": jnp.zeros(2), **kw})
  base = f()
  assert not np.allclose(base, f(y=jnp.array([3, 4])))          # class label
  assert not np.allclose(base, f(y=None))                        # null label (CFG)
  assert not np.allclose(base, f(aug_level=jnp.full(2, 0.5)))   # CDM augmentation level
  assert not np.allclose(base, f(low_res=low * 0.5))             # low-res conditioning
  assert not np.allclose(base, m.apply({"params": params}, x, t + 0.5, y=jnp.array([1, 2]),
                                       low_res=low, aug_level=jnp.zeros(2)))  # continuous t
  assert "label_emb" in params and "aug_mlp_0" in params


def test_dropout_only_in_training_and_bf16_compute():
  m = tiny(dropout=0.5, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  params = perturbed(m.init(jax.random.key(0), x, jnp.zeros(2))["params"])
  assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
  ev = m.apply({"params": params}, x, jnp.zeros(2))
  assert ev.dtype == jnp.float32
  tr1 = m.apply({"params": params}, x, jnp.zeros(2), train=True, rngs={"dropout": jax.random.key(1)})
  tr2 = m.apply({"params": params}, x, jnp.zeros(2), train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(tr1, tr2)
  np.testing.assert_array_equal(ev, m.apply({"params": params}, x, jnp.zeros(2)))


def test_registry_and_resolution_errors(tiny_config):
  tiny_config.model.name = "transformer"
  with pytest.raises(ValueError, match="unet"):
    models.build_model(tiny_config)
  with pytest.raises(ValueError, match="divisible"):
    tiny(ch_mult=(1, 2, 2, 2)).init(jax.random.key(0), jnp.zeros((1, 12, 12, 3)), jnp.zeros(1))


def test_input_normalisation_makes_the_network_scale_invariant(tiny_config):
  c = tiny_config
  c.diffusion.update(type="continuous", normalize_input=True, input_scale=0.5)
  m = models.build_model(c)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  params = perturbed(m.init(jax.random.key(0), x, jnp.zeros(2))["params"])
  apply = models.make_apply(m, processes.from_config(c))
  np.testing.assert_allclose(apply(params, x, jnp.ones(2)), apply(params, 3 * x, jnp.ones(2)),
                             atol=1e-4)


def test_table_4_3_presets_have_the_papers_parameter_counts_and_order():
  """Paper 002 Table 4.3 (CIFAR-10, millions): counted with `jax.eval_shape` (no allocation)."""
  from difflax import config as config_lib
  from difflax import state as state_lib
  table = {"default": 34.21, "deep_res1": 23.27, "shallow_res2": 24.76, "shallow_res1": 17.02,
           "mbconv64": 11.51, "mbconv96": 25.68}
  counts = {}
  for name, want in table.items():
    c = config_lib.load(f"dgm_cifar10:paper,{name}")
    m = models.build_model(c)
    shapes = jax.eval_shape(lambda k: m.init({"params": k}, **state_lib.dummy_inputs(c)),
                            jax.random.key(0))
    counts[name] = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) / 1e6
    assert abs(counts[name] / want - 1) < 0.1, (name, counts[name], want)
  assert sorted(counts, key=counts.get) == ["mbconv64", "shallow_res1", "deep_res1",
                                            "shallow_res2", "mbconv96", "default"]


def test_mbconv_unet_starts_as_identity_blocks_and_takes_a_training_step():
  """MBConv + SE blocks (expansion 4, SE 0.25, depthwise 3x3): zero-initialised projections
  make a fresh network output 0, like the residual UNet; one SGD step on an MSE lowers it."""
  m = tiny(block="mbconv", mbconv_expansion=4, se_ratio=0.25)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  t = jnp.array([1, 2, 3, 4])
  params = m.init(jax.random.key(0), x, t)["params"]
  block = params["down_8"]["res_0"]
  assert block["depthwise"]["kernel"].shape == (3, 3, 1, 32)   # 8 input channels x 4, per channel.
  assert block["se_reduce"]["kernel"].shape == (32, 2)         # 0.25 x the 8 input channels.
  target = 0.1 * x
  loss = jax.jit(jax.value_and_grad(lambda p: jnp.mean((m.apply({"params": p}, x, t) - target)
                                                       ** 2)))
  l0, g = loss(params)
  np.testing.assert_allclose(float(l0), float(jnp.mean(target ** 2)), rtol=1e-6)  # Output 0.
  params = jax.tree_util.tree_map(lambda p, d: p - 0.5 * d, params, g)
  assert float(loss(params)[0]) < float(l0)
  with pytest.raises(ValueError, match="Unknown block kind"):
    tiny(block="convnext").init(jax.random.key(0), x, t)


def test_patch_size_runs_the_unet_on_folded_patches():
  # "simple diffusion" input downsampling: levels at H/p, outputs back at H x W, and each output
  # pixel's channels come from its own patch position (depth-to-space inverts space-to-depth).
  m = tiny(learn_sigma=True, patch_size=2, attn_resolutions=(2,))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  low = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
  params = m.init(jax.random.key(0), x, jnp.array([0, 5]), low_res=low)["params"]
  assert {"in_4", "down_4", "down_2", "out_4"} <= set(params) and "in_8" not in params
  assert params["in_4"]["kernel"].shape[2] == 2 * 2 * 6  # p*p*(C + low-res C) channels.
  assert params["out_4"]["kernel"].shape[3] == 2 * 2 * 6  # p*p*2C (mean and variance).
  out = m.apply({"params": perturbed(params)}, x, jnp.array([1, 2]), low_res=low)
  assert out.shape == (2, 8, 8, 6)
  # The output head's channel block k lands at patch offset k: zero one block, one pixel of
  # every 2x2 patch goes to 0.
  p2 = perturbed(params)
  kern = p2["out_4"]["kernel"].at[..., 6:12].set(0.0)
  p2 = {**p2, "out_4": {"kernel": kern, "bias": p2["out_4"]["bias"].at[6:12].set(0.0)}}
  out2 = m.apply({"params": p2}, x, jnp.array([1, 2]), low_res=low)
  assert float(jnp.abs(out2[:, 0::2, 1::2]).max()) == 0.0
  assert float(jnp.abs(out2[:, 0::2, 0::2]).min()) > 0.0
  with pytest.raises(ValueError, match="patch_size"):
    m.init(jax.random.key(0), jnp.zeros((1, 7, 7, 3)), jnp.array([0]))


def test_every_model_key_reaches_the_module_and_a_stray_one_is_refused():
  """`build_model` passes `config.model` through (no hand-copied field list to forget)."""
  import ml_collections
  from conftest import load_config
  c = load_config("dgm_cifar10", "tiny")
  m = models.build_model(c)
  for k, v in c.model.items():
    if k not in models.TRAINING_KEYS and k != "dtype":
      assert getattr(m, k) == (tuple(v) if isinstance(v, (list, tuple)) else v), k
  assert m.dtype == jnp.float32
  unlocked = ml_collections.ConfigDict(c.to_dict())
  unlocked.model.widht = 3
  with pytest.raises(ValueError, match="config.model.widht is not a field of UNet"):
    models.build_model(unlocked)
  # The other way round: the config's model keys are the module's fields (a new hyper-parameter
  # is one field), at the module's defaults unless base_config sizes them for the CPU.
  fields = {f.name: f.default for f in dataclasses.fields(models.MODELS["unet"])}
  block = models.config_block("unet")
  assert set(block) == (set(fields) - set(models.DERIVED_FIELDS)) | set(models.TRAINING_KEYS)
  assert block["num_res_blocks"] == fields["num_res_blocks"] and block["dtype"] == "float32"
  assert set(config_lib.base_config().model) == set(block)
  with pytest.raises(ValueError, match="'widht' is not a config.model key"):
    models.config_block("unet", widht=3)


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 16), 4), ((3, 5, 5, 6), 3), ((2, 7, 12), 12)])
def test_group_norm_is_flax_group_norm_with_the_same_parameters(shape, groups):
  """layers.GroupNorm (per-channel sums first, for XLA:CPU) has flax nn.GroupNorm's parameter
  tree, values and gradients, so checkpoints and results do not depend on which one ran."""
  import flax.linen as nn
  from difflax.models import layers
  x = 3 * jax.random.normal(jax.random.key(0), shape) + 1
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=jnp.float32)
  ours = layers.GroupNorm(groups)
  params = ref.init(jax.random.key(1), x)
  assert (jax.tree.map(jnp.shape, params)
          == jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)))
  params = perturbed(params, 1.0)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)) * jnp.arange(shape[-1]))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
                  jax.tree.leaves(jax.grad(loss(ref), (0, 1))(params, x))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
