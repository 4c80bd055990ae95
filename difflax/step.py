"""The train step: schedule + loss + model apply + optimiser + EMA in one pure function.

Contract: `make_train_step(exp)` returns `train_step(state, batch) -> (state, metrics)`, pure and
unjitted, for an `experiment.Experiment` (its model, process and objective, optimiser and
learning-rate schedule, config, `keys["step"]` and growth state);
`experiment.jit_train_step(exp)` jits it once per architecture with shardings and donated state.
The objective is the process's (`difflax.processes`: DDPM, Chen's continuous time, NCSN score
matching, flow matching) and the network's other inputs are `conditioning.for_training`'s
(labels with classifier-free guidance's dropout, a cascade SR stage's augmented `low_res`, a
fading growth stage's lambda), so this one step serves every process and configuration.
Per-step randomness is `fold_in(base_key, state.step)`, so the step is a function of (state,
batch) alone. `objective.draw` draws the whole batch's timesteps and noise first
(importance-sampled from `state.resampler` when it holds a loss history, whose update with the
batch's losses happens inside the step), then the loss and gradient are taken in one pass or in
`optim.grad_accum` micro-batches (`_accumulate`, same result). Metrics are batch means: loss
(importance-weighted when sampling by importance; `loss_unweighted` beside it), mse and/or vb
(bits/dim), grad_norm, lr, IWDiff's `iwdiff_max_weight` and a fading stage's `fade_weight`. A
progressive growth stage trains at its resolution through `growth.stage_view`.
"""
from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import optax

from difflax import conditioning
from difflax import growth
from difflax import losses
from difflax import models
from difflax import state as state_lib


def make_train_step(exp):
  config, objective, optimizer = exp.config, exp.objective, exp.optimizer
  apply = models.make_apply(exp.model, exp.process)
  base_key, lr_schedule, gs = exp.keys["step"], exp.lr_schedule, exp.growth_state
  view = growth.stage_view(config, gs)
  accum = int(config.optim.grad_accum)
  extra_updates = (int(config.loss.resampler_extra_updates)
                   if config.loss.timestep_sampler == "importance" else 0)

  def train_step(state: state_lib.TrainState, batch: dict):
    x0 = view.data(batch["image"])
    key = jax.random.fold_in(base_key, state.step)
    k_obj, k_drop, k_label = jax.random.split(key, 3)
    inputs = conditioning.for_training(config, gs, batch, state.step, k_label,
                                       jax.random.fold_in(key, 3))

    draw = objective.draw(k_obj, x0, state.resampler)

    def loss_fn(params, x0, draw, inputs, k_drop):
      def denoise_fn(x_t, t_model):
        return apply(params, x_t, t_model, train=True, rngs={"dropout": k_drop},
                     **inputs.kwargs())
      terms = objective.terms(denoise_fn, x0, draw, view=view.objective)
      return jnp.mean(terms["loss"] * draw["weight"]), terms

    per_example = (x0, draw, inputs)
    if accum == 1:
      (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, *per_example, k_drop)
    else:
      (loss, terms), grads = _accumulate(loss_fn, state.params, per_example, k_drop, accum)
    resampler = state.resampler
    if resampler is not None:
      # improved-DDPM updates the history with the unweighted losses of the whole global batch.
      resampler = losses.resampler_update(resampler, draw["t"],
                                          jax.lax.stop_gradient(terms["loss"]))
      for j in range(extra_updates):
        # Table 4.4's "Importance Sampling +2": forward passes only. The paper does not say how
        # their t are drawn; uniform t refreshes the timesteps p_t rarely visits.
        extra = objective.draw(jax.random.fold_in(k_obj, j + 1), x0)
        extra_terms = loss_fn(state.params, x0, extra, inputs, k_drop)[1]
        resampler = losses.resampler_update(resampler, extra["t"], extra_terms["loss"])
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # After a growth the EMA restarts its warm-up from the growth step: an average that still
    # holds the pre-growth weights (and the new level's init) is no network this architecture
    # trained, and sampled as noise (README, Progressive growth).
    decay = state_lib.ema_decay_at(state.step - gs.stage_start, config.optim.ema_decay,
                                   config.optim.ema_warmup or gs.stage > 0)
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p,
                                 state.ema_params, params)
    metrics = {k: v.mean() for k, v in terms.items() if k != "loss"}
    metrics.update(loss=loss, grad_norm=optax.global_norm(grads), lr=lr_schedule(state.step))
    if resampler is not None:
      metrics["loss_unweighted"] = terms["loss"].mean()
    if gs.fading:
      metrics["fade_weight"] = inputs.fade_weight[0]
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state, resampler=resampler)
    return new_state, metrics

  return train_step


def _accumulate(loss_fn, params, inputs, k_drop, micro: int):
  """`value_and_grad(loss_fn)` of the whole batch, computed over `micro` micro-batches in a
  `lax.scan`: the same mean loss and gradient (to float rounding) with 1/micro of the
  activations. Micro-batch i holds examples i, i + micro, ... so each stays spread over every
  device of the batch axis. Randomness was drawn for the whole batch first (`Objective.draw`);
  only dropout masks differ from the one-pass step (key folded with i)."""
  split = lambda a: einops.rearrange(a, "(b m) ... -> m b ...", m=micro)
  parts = jax.tree_util.tree_map(split, inputs)

  def body(acc, xs):
    i, part = xs
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, *part, jax.random.fold_in(k_drop, i))
    return jax.tree_util.tree_map(jnp.add, acc, (loss, grads)), terms

  zero = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
  (loss, grads), terms = jax.lax.scan(body, zero, (jnp.arange(micro), parts))
  terms = jax.tree_util.tree_map(lambda a: einops.rearrange(a, "m b ... -> (b m) ..."), terms)
  return (loss / micro, terms), jax.tree_util.tree_map(lambda g: g / micro, grads)
