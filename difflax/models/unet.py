"""The DDPM / improved-DDPM UNet (Ho et al. 2020 App. B; Nichol & Dhariwal 2021).

Contract: `UNet(...)(x, t, y=None, low_res=None, aug_level=None, train=False)` maps
x: [B, H, W, C] and times t: [B] (int or continuous float) to [B, H, W, C] (or 2C with
`learn_sigma`: mean and variance-interpolation channels).

Parameter names carry the resolution they act at, so progressive growth can add an outer level by
tree surgery without renaming anything that exists: `in_32` (input conv), `down_32`, `down_16`,
..., `mid`, ..., `up_16`, `up_32`, `out_32` (norm + output conv) for a 32x32 input. Each up level
consumes only skips made at its own resolution (the input conv / previous downsample and its own
down level's blocks), so levels are self-contained.

`patch_size` p > 1 runs the whole UNet on p x p patches folded into channels (space-to-depth in,
depth-to-space out; Hoogeboom, Heek & Salimans 2023, "simple diffusion": downsample the input
before the first layer so no level works at the full resolution): x: [B, H, W, C] becomes
[B, H/p, W/p, p*p*C] after any `low_res` is concatenated, levels and names are at H/p, H/2p, ...

Conditioning for later stages, all optional and off by default:
  y          class labels [B] int; `num_classes` ids plus a null id `num_classes` (for
             classifier-free guidance dropout); y=None means the null id.
  low_res    [B, h, w, C'] image, resized to H x W and concatenated channel-wise (cascade SR).
  aug_level  [B] float, embedded like time and added to the time embedding (CDM augmentation s).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax import images
from difflax.models import layers

Dtype = Any


class DownLevel(nn.Module):
  out_ch: int
  num_res_blocks: int
  use_attn: bool
  downsample: bool
  block_kwargs: dict
  attn_kwargs: dict
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, emb, train):
    skips = []
    for i in range(self.num_res_blocks):
      h = layers.make_block(self.out_ch, dtype=self.dtype, name=f"res_{i}", **self.block_kwargs)(
          h, emb, train)
      if self.use_attn:
        h = layers.make_attention(dtype=self.dtype, name=f"attn_{i}", **self.attn_kwargs)(h)
      skips.append(h)
    return h, skips


class UpLevel(nn.Module):
  out_ch: int
  num_res_blocks: int
  use_attn: bool
  upsample: bool
  block_kwargs: dict
  attn_kwargs: dict
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, skips, emb, train):
    for i in range(self.num_res_blocks + 1):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = layers.make_block(self.out_ch, dtype=self.dtype, name=f"res_{i}", **self.block_kwargs)(
          h, emb, train)
      if self.use_attn:
        h = layers.make_attention(dtype=self.dtype, name=f"attn_{i}", **self.attn_kwargs)(h)
    pre = h
    if self.upsample:
      h = layers.Upsample(dtype=self.dtype, name="upsample")(h)
    return pre, h


class UNet(nn.Module):
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  num_heads: int = 1
  head_channels: int = -1
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  num_groups: int = 32
  block: str = "res"            # "res" (DDPM) | "mbconv" (MBConv + SE, paper 002 Sec. 4.4).
  mbconv_expansion: int = 4     # MBConv: 1x1 expansion of the block's output channels.
  se_ratio: float = 0.25        # MBConv: squeeze-excitation width / expanded channels.
  learn_sigma: bool = False
  out_channels: Optional[int] = None
  num_classes: int = 0
  aug_level_cond: bool = False
  # Progressive growth (Pro-DDPM): the `skip_levels` outermost levels of the full network are not
  # grown yet (x is at the full resolution / 2^skip_levels); with `fade` the outermost active
  # level is being faded in over the previous network's input / output convolutions.
  skip_levels: int = 0
  fade: bool = False
  # Downsamples project to the next level's channels, so a grown level feeds the next level what
  # its input convolution used to (needed by growth; off for the DDPM architecture).
  project_downsample: bool = False
  # >1: the UNet runs on p x p patches folded into channels (space-to-depth, "simple
  # diffusion"); levels start at the data resolution / p.
  patch_size: int = 1
  dtype: Dtype = jnp.float32    # Compute dtype (config: "float32" | "bfloat16"; params stay fp32).
  remat: str = "none"           # Per residual / attention block: layers.REMAT_POLICIES.

  @nn.compact
  def __call__(self, x, t, y=None, low_res=None, aug_level=None, train: bool = False,
               fade_weight=None):
    batch, res, _, channels = x.shape
    p = self.patch_size
    if p > 1 and (res % p or self.skip_levels or self.fade):
      raise ValueError(f"patch_size={p} needs a resolution divisible by it ({res}) and no "
                       "progressive growth.")
    levels = len(self.ch_mult)
    active = range(self.skip_levels, levels)
    full_res = res * 2 ** self.skip_levels
    if (full_res // p) % 2 ** (levels - 1):
      raise ValueError(f"Resolution {full_res // p} is not divisible by 2^{levels - 1} "
                       f"(ch_mult={tuple(self.ch_mult)}): pick a resolution or fewer levels.")
    if self.fade and (self.skip_levels >= levels - 1 or not self.project_downsample):
      raise ValueError("fade needs a previous (inner) level and project_downsample=True.")
    out_ch = self.out_channels or channels
    emb_dim = 4 * self.ch
    emb = layers.timestep_embedding(jnp.broadcast_to(t, (batch,)), self.ch)
    emb = nn.Dense(emb_dim, name="time_mlp_0")(emb)
    emb = nn.Dense(emb_dim, name="time_mlp_1")(nn.silu(emb))
    if self.num_classes:
      labels = (jnp.full((batch,), self.num_classes, jnp.int32) if y is None
                else jnp.asarray(y, jnp.int32))
      emb = emb + nn.Embed(self.num_classes + 1, emb_dim, name="label_emb")(labels)
    if self.aug_level_cond:
      level = jnp.zeros((batch,)) if aug_level is None else jnp.broadcast_to(aug_level, (batch,))
      aug = nn.Dense(emb_dim, name="aug_mlp_0")(layers.timestep_embedding(level, self.ch))
      emb = emb + nn.Dense(emb_dim, name="aug_mlp_1")(nn.silu(aug))
    if low_res is not None:
      up = jax.image.resize(low_res, (batch, res, res, low_res.shape[-1]), "bilinear")
      x = jnp.concatenate([x, up.astype(x.dtype)], axis=-1)
    if p > 1:
      x = einops.rearrange(x, "b (h p1) (w p2) c -> b h w (p1 p2 c)", p1=p, p2=p)
      res, full_res = res // p, full_res // p
    emb = emb.astype(self.dtype)

    block_kwargs = dict(kind=self.block, dropout=self.dropout, remat=self.remat,
                        use_scale_shift_norm=self.use_scale_shift_norm, num_groups=self.num_groups)
    if self.block == "mbconv":
      block_kwargs.update(expansion=self.mbconv_expansion, se_ratio=self.se_ratio)
    attn_kwargs = dict(num_heads=self.num_heads, head_channels=self.head_channels,
                       num_groups=self.num_groups, remat=self.remat)
    resolutions = [full_res // 2 ** i for i in range(levels)]
    top = self.skip_levels
    lam = None
    if self.fade:
      lam = jnp.asarray(1.0 if fade_weight is None else fade_weight, self.dtype)
      if lam.ndim == 1:  # Per example (sampling passes it with the batch).
        lam = lam[:, None, None, None]

    def in_conv(i, inp):
      return nn.Conv(self.ch * self.ch_mult[i], (3, 3), dtype=self.dtype,
                     name=f"in_{resolutions[i]}")(inp.astype(self.dtype))

    h = in_conv(top, x)
    skips = [h]
    for i in active:
      r = resolutions[i]
      h, level_skips = DownLevel(self.ch * self.ch_mult[i], self.num_res_blocks,
                                 r in self.attn_resolutions, downsample=False,
                                 block_kwargs=block_kwargs, attn_kwargs=attn_kwargs,
                                 dtype=self.dtype, name=f"down_{r}")(h, emb, train)
      skips += level_skips
      if i < levels - 1:
        # The downsample's output is the skip of the next level's resolution; it belongs to the
        # level it produces so that each level only sees skips at its own size.
        out = self.ch * self.ch_mult[i + 1] if self.project_downsample else None
        h = layers.Downsample(out, dtype=self.dtype, name=f"downsample_{r}")(h)
        if self.fade and i == top:
          # ProGAN-style fade-in (Pro-DDPM Sec. 3.3): blend the new level's output with the old
          # input conv applied to the downsampled input; lambda = 0 is exactly the old network.
          old = in_conv(top + 1, images.block_average(x, 2))
          h = lam * h + (1 - lam) * old
        skips.append(h)

    mid_ch = self.ch * self.ch_mult[-1]
    h = layers.make_block(mid_ch, dtype=self.dtype, name="mid_res_0", **block_kwargs)(h, emb,
                                                                                      train)
    h = layers.make_attention(dtype=self.dtype, name="mid_attn", **attn_kwargs)(h)
    h = layers.make_block(mid_ch, dtype=self.dtype, name="mid_res_1", **block_kwargs)(h, emb,
                                                                                      train)

    old_out = None
    for i in reversed(active):
      r = resolutions[i]
      pre, h = UpLevel(self.ch * self.ch_mult[i], self.num_res_blocks, r in self.attn_resolutions,
                       upsample=i > top, block_kwargs=block_kwargs, attn_kwargs=attn_kwargs,
                       dtype=self.dtype, name=f"up_{r}")(h, skips, emb, train)
      if self.fade and i == top + 1:
        old_out = self._head(pre, r, out_ch)
    assert not skips, "every skip must be consumed"
    out = self._head(h, res, out_ch * p * p)
    if p > 1:
      out = einops.rearrange(out, "b h w (p1 p2 c) -> b (h p1) (w p2) c", p1=p, p2=p)
    if old_out is not None:
      old_up = images.nearest_upsample(old_out, 2)
      out = lam * out + (1 - lam) * old_up
    return out.astype(jnp.float32)

  def _head(self, h, r, out_ch):
    """Output norm + zero-initialised conv of the level at resolution r."""
    h = nn.silu(layers.group_norm(h.shape[-1], self.num_groups, f"out_norm_{r}")(h))
    return nn.Conv(out_ch * (2 if self.learn_sigma else 1), (3, 3), dtype=self.dtype,
                   kernel_init=nn.initializers.zeros, name=f"out_{r}")(h)
