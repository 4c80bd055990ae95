"""The train step: schedule + loss + model apply + optimiser + EMA in one pure function.

Contract: `make_train_step(model, objective, optimizer, lr_schedule, config, base_key)` returns
`train_step(state, batch) -> (state, metrics)`, pure and unjitted; `train.py` jits it once per
architecture with shardings and donated state. `objective` is `losses.make_objective(config, ...)`
(discrete, continuous-time or score matching), so this one step serves every process. Per-step
randomness (timesteps / noise levels, noise, dropout, label dropout, a cascade SR stage's
conditioning augmentation of `batch["low_res"]`) is
`fold_in(base_key, state.step)`, so the step is a function of (state, batch)
alone. Metrics are batch means: loss, mse and/or vb (bits/dim), grad_norm, lr. A progressive
growth stage (`growth_state`) trains at its resolution through `growth.stage_view` and feeds the
fade weight of Eq. 13 at `state.step` while its new level fades in.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from difflax import cascade
from difflax import growth
from difflax import models
from difflax import state as state_lib


def make_train_step(model, objective, optimizer, lr_schedule, config, base_key,
                    growth_state=None):
  apply = models.make_apply(model, config)
  gs = growth_state or growth.GrowthState()
  view = growth.stage_view(config, gs)
  num_classes = config.data.num_classes if config.model.class_conditional else 0

  def train_step(state: state_lib.TrainState, batch: dict):
    x0 = batch["image"]
    obj_view = None
    if view is not None and view[0] == "average":  # growth.forward="stage_res"
      x0 = growth.apply_view(view, x0)
    elif view is not None:                        # growth.forward="full_res"
      obj_view = lambda a: growth.apply_view(view, a)
    fade = {"fade_weight": growth.current_fade(config, gs, state.step)} if gs.fading else {}
    key = jax.random.fold_in(base_key, state.step)
    k_obj, k_drop, k_label = jax.random.split(key, 3)
    labels = None
    if num_classes:
      # Classifier-free guidance training: replace labels by the null id with prob p.
      drop = jax.random.bernoulli(k_label, config.model.label_dropout, (x0.shape[0],))
      labels = jnp.where(drop, num_classes, batch["label"])
    cond = {}
    if "low_res" in batch:  # Cascade SR stage: augmented low-res input and its level (CDM).
      low_res, level = cascade.augment_condition(jax.random.fold_in(key, 3), batch["low_res"],
                                                 config)
      cond = {"low_res": low_res, "aug_level": level}

    def loss_fn(params):
      def denoise_fn(x_t, t_model):
        return apply(params, x_t, t_model, y=labels, train=True, rngs={"dropout": k_drop},
                     **cond, **fade)
      terms = objective(denoise_fn, x0, k_obj, view=obj_view)
      return terms["loss"].mean(), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = state_lib.ema_decay_at(state.step, config.optim.ema_decay, config.optim.ema_warmup)
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p,
                                 state.ema_params, params)
    metrics = {k: v.mean() for k, v in terms.items() if k != "loss"}
    metrics.update(loss=loss, grad_norm=optax.global_norm(grads), lr=lr_schedule(state.step))
    if gs.fading:
      metrics["fade_weight"] = fade["fade_weight"]
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step
