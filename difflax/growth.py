"""Progressive growth (Pro-DDPM, paper 000): fade weights, the growth schedule, state surgery.

Contract (pure functions):
  `fade_weight(steps_since_growth, period=100, offset=0.7, kind="sinusoidal")`: Eq. 13,
    lambda = sin(((t / T) + s) / (1 + s) * pi / 2), for "sinusoidal"; t / T for "linear" (ProGAN);
    1 for "abrupt"; clipped to 1 after the period. Note: Eq. 13 with s = 0.7 starts at
    sin(0.7 / 1.7 * pi / 2) = 0.60, not at the 0.1 the paper's text mentions; we implement the
    equation and expose `period` and `offset`.
  `grow_params(old_params, new_params)`: tree surgery keeping every path present in both trees
    (old value), the fresh init for new paths, dropping old-only paths; a shape mismatch on a
    shared path raises with the path named. `grow_state(old_state, new_state)` applies it to
    params, EMA params (kept params keep their EMA; new ones start at their init) and the
    optimiser state (Adam moments of kept params kept, new ones from the fresh init, i.e. zero),
    and logs what was kept, added and dropped.
  `GrowthState` (stage index, step the stage started, fading or not) is what checkpoints record;
    `model_kwargs(config, gs)` turns it into the UNet's `skip_levels` / `fade`, `resolution(config,
    gs)` into the stage's resolution, `next_state(config, gs, step, plateau)` decides boundaries.
  `PlateauTracker`: the paper's trigger, stop a stage when the metric has not improved for
    `patience` evaluations (15 in the paper).

The train loop (`train.py`) asks `next_state` after every step; when it changes, it builds the
new architecture, runs `grow_state`, re-jits and continues. Forward process (Sec. 3.1):
`stage_view(config, gs)` maps full-resolution arrays to the stage's resolution (`StageView`): with
`growth.forward="full_res"` the noisy sample and the noise target are made at full resolution and
sub-sampled (strided, so the noise stays i.i.d. unit-variance and the stage sees a valid DDPM);
with "stage_res" the clean image is area-downsampled and noised at the stage resolution.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from difflax import images
from difflax import trees

FADE_KINDS = ("sinusoidal", "linear", "abrupt")
FORWARDS = ("full_res", "stage_res")
TRIGGERS = ("steps", "plateau")
PLATEAU_METRICS = ("train_loss", "quick_fd")


def fade_weight(steps_since_growth, period: int = 100, offset: float = 0.7,
                kind: str = "sinusoidal"):
  """lambda(t) in (0, 1] for t = steps since the new level was added (jnp or python numbers)."""
  if kind not in FADE_KINDS:
    raise ValueError(f"Unknown fade kind {kind!r}; valid: {FADE_KINDS}.")
  t = jnp.clip(jnp.asarray(steps_since_growth, jnp.float32) / period, 0.0, 1.0)
  if kind == "abrupt":
    return jnp.ones_like(t)
  if kind == "linear":
    return t
  return jnp.sin((t + offset) / (1.0 + offset) * (math.pi / 2))


# ------------------------------------------------------------------------------ surgery
def _flat(tree) -> dict:
  return {trees.path_str(p): (p, v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _surgery(old, new, what: str) -> tuple[Any, dict]:
  old_flat = _flat(old)
  kept, added = [], []

  def pick(path, new_leaf):
    key = trees.path_str(path)
    if key in old_flat:
      old_leaf = old_flat[key][1]
      if np.shape(old_leaf) != np.shape(new_leaf):
        raise ValueError(f"Growth surgery on {what}: {key} has shape {np.shape(old_leaf)} in "
                         f"the old tree but {np.shape(new_leaf)} in the new one; only new paths "
                         "may appear, existing ones must keep their shapes.")
      kept.append(key)
      return old_leaf
    added.append(key)
    return new_leaf

  out = jax.tree_util.tree_map_with_path(pick, new)
  new_keys = set(_flat(new))
  dropped = [k for k in old_flat if k not in new_keys]
  return out, {"kept": kept, "added": added, "dropped": dropped}


def grow_params(old_params, new_params):
  """Every path in both trees keeps the old value; new paths keep the fresh init."""
  return _surgery(old_params, new_params, "params")[0]


def _modules(keys) -> list[str]:
  """['down_16', 'in_16', ...]: the top-level modules touched, for a readable report."""
  return sorted({k.split("/")[0] for k in keys})


def grow_state(old_state, new_state):
  """Surgery on a whole TrainState: params, EMA params and optimiser state (see module doc)."""
  params, report = _surgery(old_state.params, new_state.params, "params")
  ema, _ = _surgery(old_state.ema_params, new_state.ema_params, "EMA params")
  opt, opt_report = _surgery(old_state.opt_state, new_state.opt_state, "optimizer state")
  logging.info("Growth surgery: kept %d leaves, added %d (%s), dropped %d (%s); optimizer state "
               "kept %d, added %d, dropped %d.", len(report["kept"]), len(report["added"]),
               ", ".join(_modules(report["added"])), len(report["dropped"]),
               ", ".join(_modules(report["dropped"])), len(opt_report["kept"]),
               len(opt_report["added"]), len(opt_report["dropped"]))
  state = new_state.replace(step=old_state.step, params=params, ema_params=ema, opt_state=opt,
                            resampler=old_state.resampler)  # Per-t losses: T is unchanged.
  return state, report


# ------------------------------------------------------------------------------ schedule
@dataclasses.dataclass(frozen=True)
class GrowthState:
  stage: int = 0          # Index into growth.resolutions.
  stage_start: int = 0    # Step at which the current stage's level was added.
  fading: bool = False    # The outermost level is still being faded in.

  def to_meta(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_meta(cls, meta: Optional[dict]) -> "GrowthState":
    return cls(**meta) if meta else cls()


def enabled(config) -> bool:
  return "growth" in config and bool(config.growth.resolutions)


def resolution(config, gs: GrowthState) -> int:
  return int(config.growth.resolutions[gs.stage]) if enabled(config) else config.data.resolution


def model_kwargs(config, gs: GrowthState) -> dict:
  """UNet arguments of the stage: outer levels not grown yet, fading or not."""
  if not enabled(config):
    return {}
  skip = int(round(math.log2(config.data.resolution / resolution(config, gs))))
  return {"skip_levels": skip, "fade": gs.fading}


@dataclasses.dataclass(frozen=True)
class StageView:
  """How a growth stage sees full-resolution arrays (Pro-DDPM Sec. 3.1), as functions of
  x: [B, H, W, C] -> [B, H/f, W/f, C] (identities at full resolution):
    data: applied to the clean batch before the objective (area averages for
      `growth.forward="stage_res"`: the stage noises its own low-resolution images);
    objective: None, or applied by the objective to x0 and to the noise drawn at full resolution
      (strided sub-sampling for "full_res": x_t and the target, linear in both, follow);
    to_stage: the stage's view of a clean image (its bits/dim are at its resolution)."""
  data: Callable
  objective: Optional[Callable]
  to_stage: Callable


def subsample(x, f: int):
  """Every f-th pixel, offset f // 2: i.i.d. unit noise stays i.i.d. unit noise."""
  return x[:, f // 2::f, f // 2::f]


def stage_view(config, gs: GrowthState) -> StageView:
  """The `StageView` of growth stage `gs` (full resolution: identities)."""
  f = config.data.resolution // resolution(config, gs)
  if f == 1:
    return StageView(lambda x: x, None, lambda x: x)
  if config.growth.forward == "full_res":
    sub = lambda x: subsample(x, f)
    return StageView(lambda x: x, sub, sub)
  area = lambda x: images.block_average(x, f)
  return StageView(area, None, area)


def current_fade(config, gs: GrowthState, step):
  """The fade weight at `step` (1 when not fading)."""
  if not gs.fading:
    return jnp.float32(1.0)
  g = config.growth
  return fade_weight(step - gs.stage_start, g.fade_steps, g.fade_offset, g.fade_kind)


def next_state(config, gs: GrowthState, step: int, plateaued: bool = False) -> GrowthState:
  """The growth state after `step` steps: ends the fade after `fade_steps`, and grows when the
  stage's budget (trigger "steps") is spent or its metric plateaued (trigger "plateau")."""
  g = config.growth
  if gs.fading and step - gs.stage_start >= g.fade_steps:
    return dataclasses.replace(gs, fading=False)
  last = gs.stage == len(g.resolutions) - 1
  if last or gs.fading:
    return gs
  if g.trigger == "steps":
    done = step - gs.stage_start >= int(g.stage_steps[gs.stage])
  else:
    done = plateaued and step - gs.stage_start >= g.min_stage_steps
  if not done:
    return gs
  return GrowthState(stage=gs.stage + 1, stage_start=step, fading=g.fade_kind != "abrupt")


@dataclasses.dataclass
class PlateauTracker:
  """Stop when the metric (lower is better) has not improved for `patience` evaluations."""
  patience: int = 15
  best: float = float("inf")
  bad: int = 0

  def update(self, value: float) -> bool:
    if value < self.best:
      self.best, self.bad = float(value), 0
    else:
      self.bad += 1
    return self.bad >= self.patience

  def reset(self) -> None:
    self.best, self.bad = float("inf"), 0


def validate(config) -> None:
  g = config.growth
  if not enabled(config):
    return
  res = [int(r) for r in g.resolutions]
  if res != sorted(res) or len(set(res)) != len(res):
    raise ValueError(f"config.growth.resolutions={tuple(res)} must increase strictly.")
  if res[-1] != config.data.resolution:
    raise ValueError(f"config.growth.resolutions ends at {res[-1]} but data.resolution is "
                     f"{config.data.resolution}; the last stage trains at full resolution.")
  for a, b in zip(res, res[1:]):
    if b != 2 * a:
      raise ValueError(f"Growth doubles the resolution per stage (one UNet level each); "
                       f"{a} -> {b} in config.growth.resolutions is not a doubling.")
  levels = len(config.model.ch_mult)
  if len(res) > levels:
    raise ValueError(f"{len(res)} growth stages need at least as many UNet levels; "
                     f"model.ch_mult={tuple(config.model.ch_mult)} has {levels}.")
  if not config.model.project_downsample:
    raise ValueError("Progressive growth needs config.model.project_downsample=True (a grown "
                     "level must feed the next level what its input convolution did).")
  if g.fade_kind not in FADE_KINDS:
    raise ValueError(f"config.growth.fade_kind={g.fade_kind!r}; valid: {FADE_KINDS}.")
  if g.forward not in FORWARDS:
    raise ValueError(f"config.growth.forward={g.forward!r}; valid: {FORWARDS}.")
  if g.trigger not in TRIGGERS:
    raise ValueError(f"config.growth.trigger={g.trigger!r}; valid: {TRIGGERS}.")
  if g.trigger == "steps" and len(g.stage_steps) < len(res) - 1:
    raise ValueError(f"config.growth.stage_steps={tuple(g.stage_steps)} needs a budget for each "
                     f"of the {len(res) - 1} stages before the last.")
  if g.trigger == "plateau" and g.plateau_metric not in PLATEAU_METRICS:
    raise ValueError(f"config.growth.plateau_metric={g.plateau_metric!r}; valid: "
                     f"{PLATEAU_METRICS}.")
  if g.trigger == "plateau" and g.plateau_metric == "quick_fd" and not config.eval.quick_fd:
    raise ValueError("config.growth.plateau_metric='quick_fd' needs the quick FD eval: set "
                     "config.eval.quick_fd=True or growth.plateau_metric='train_loss'.")
  if config.data.low_res:
    raise ValueError("Progressive growth and cascade SR stages cannot be combined.")
