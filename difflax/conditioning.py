"""What the network is fed besides (x_t, t), built in one place for training and for sampling
(pure).

Contract: `ModelInputs` is a pytree whose absent inputs are None: `labels` [B] int (class ids;
the null id `data.num_classes` is classifier-free guidance's unconditional input), `low_res`
[B, h, w, C] and `aug_level` [B] (a cascade SR stage's conditioning image and its augmentation
level, CDM Sec. 3), `fade_weight` [B] (a fading growth stage's lambda, Pro-DDPM Eq. 13).
`.kwargs()` is what `models.make_apply`'s `apply` takes; `.rows(idx)` and `.tile(n)` index and
repeat every per-sample array (sampling in batches; guidance's doubled batch).
  `for_training(config, gs, batch, step, label_key, cond_key)`: labels with classifier-free
    guidance's dropout (`model.label_dropout`), the training-time augmentation of
    `batch["low_res"]`, lambda at `step`;
  `for_sampling(config, gs, key, num, low_res=None, step=None, already_at_level=False)`: what
    a sampler feeds: `low_res` augmented at `cond.sample_level` (a truncated chain's z_s as it
    is), lambda at `step` (the stage start when None); labels are the sampler's own.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from difflax import cascade
from difflax import growth


@flax.struct.dataclass
class ModelInputs:
  labels: Optional[Any] = None
  low_res: Optional[Any] = None
  aug_level: Optional[Any] = None
  fade_weight: Optional[Any] = None

  def kwargs(self) -> dict:
    return {"y": self.labels, "low_res": self.low_res, "aug_level": self.aug_level,
            "fade_weight": self.fade_weight}

  def rows(self, idx) -> "ModelInputs":
    return jax.tree_util.tree_map(lambda v: v[idx], self)

  def tile(self, n: int) -> "ModelInputs":
    return self if n == 1 else jax.tree_util.tree_map(lambda v: jnp.concatenate([v] * n), self)


def _fade(config, gs: growth.GrowthState, step, num: int):
  if not gs.fading:
    return None
  return jnp.full((num,), growth.current_fade(config, gs, step), jnp.float32)


def for_training(config, gs: growth.GrowthState, batch: dict, step, label_key,
                 cond_key) -> ModelInputs:
  """The inputs of a training batch ({"image": [B, ...], "label": [B], "low_res"?}) at `step`;
  the keys draw the label dropout and the conditioning augmentation."""
  num = batch["image"].shape[0]
  labels = None
  if config.model.class_conditional:
    # Classifier-free guidance training: replace labels by the null id with prob p.
    drop = jax.random.bernoulli(label_key, config.model.label_dropout, (num,))
    labels = jnp.where(drop, config.data.num_classes, batch["label"])
  low_res = aug_level = None
  if "low_res" in batch:
    low_res, aug_level = cascade.augment_condition(cond_key, batch["low_res"], config)
  return ModelInputs(labels, low_res, aug_level, _fade(config, gs, step, num))


def for_sampling(config, gs: growth.GrowthState, key, num: int, low_res=None, step=None,
                 already_at_level: bool = False, cond=None) -> ModelInputs:
  """The per-sample inputs of `num` samples (see the module docstring); `cond` overrides
  `config.cond` (a sweep's level and mode)."""
  aug_level = None
  if low_res is not None:
    sr = cascade.sampling_condition(key, low_res, cond or config.cond, already_at_level)
    low_res, aug_level = sr["low_res"], sr["aug_level"]
  return ModelInputs(None, low_res, aug_level,
                     _fade(config, gs, gs.stage_start if step is None else step, num))
