"""UNet building blocks (Flax linen): time embedding, residual blocks (`ResBlock`, or
`MBConvBlock` with squeeze-excitation, chosen by `make_block(kind=...)`), self-attention,
resampling.

Contract: blocks take NHWC activations `h: [B, H, W, C]` and the conditioning embedding
`emb: [B, E]`; `dtype` is the compute dtype. Layout and initialisation follow improved-DDPM's
UNet: GroupNorm + SiLU before each conv, the last conv of every residual branch and the attention
output projection zero-initialised so each block starts as the identity.

Mixed precision (`dtype=bfloat16`): convolutions, dense layers and the attention matmuls run in
bf16; parameters (flax's `param_dtype`), and so gradients, Adam moments and the EMA, stay
float32. Kept float32 on purpose: GroupNorm (mean and variance of bf16 activations over a group
lose most of their 8-bit mantissa, and the normalised output feeds every conv), the attention
logits and softmax (exp of bf16 logits saturates; the weights are cast back for the value
matmul), the sinusoidal time embedding (t * freq up to 1000 rad needs float32 phase), and the
network's output (cast to float32, so the loss and its reduction are float32).

Rematerialisation (`make_block(..., remat=)`, `make_attention(remat=)`, `REMAT_POLICIES`): with
"full" a residual / attention block keeps only its inputs for the backward pass and recomputes
everything inside it; with "dots" it also keeps the outputs of its convolutions and of matmuls
without batch dimensions (dense projections), and recomputes norms, nonlinearities and the
attention logits (whose [B, heads, N, N] size is what dominates at high resolution). Parameter
paths are the same with and without remat, so checkpoints move between the settings.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax import images

Dtype = Any


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of (possibly continuous) times t: [B] -> [B, dim] float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class GroupNorm(nn.Module):
  """GroupNorm over [B, ..., C] (statistics per example and group over all other axes), float32,
  with flax `nn.GroupNorm`'s parameters ("scale", "bias": [C]) and math (variance as
  E[x^2] - E[x]^2, clipped at 0). The statistics are summed per channel first and then per
  group, and the normalisation is one per-channel affine map x * a + b: the reductions run
  along the contiguous channel axis instead of over [..., G, C/G] blocks of 1-4 channels. On
  XLA:CPU that made the reference UNet's forward ~18 % faster (docs/benchmarks.md); the
  parameters are flax's, so checkpoints load either way."""
  num_groups: int
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    x = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    n = math.prod(x.shape[1:-1]) * (c // self.num_groups)
    group = lambda s: einops.repeat(  # [B, C] per-channel sums -> [B, C] group means
        einops.reduce(s, "b (g k) -> b g", "sum", g=self.num_groups) / n, "b g -> b (g k)",
        k=c // self.num_groups)
    mean = group(jnp.sum(x, axes))
    var = jnp.maximum(group(jnp.sum(jnp.square(x), axes)) - jnp.square(mean), 0.0)
    a = scale * jax.lax.rsqrt(var + self.epsilon)  # [B, C]
    b = bias - mean * a
    expand = (slice(None),) + (None,) * len(axes) + (slice(None),)
    return x * a[expand] + b[expand]


def group_norm(channels: int, num_groups: int, name: str | None = None):
  return GroupNorm(math.gcd(num_groups, channels), name=name)


def embed(h, emb, norm, scale_shift: bool, dtype):
  """norm(h + W emb), or FiLM norm(h) * (1 + scale) + shift with [scale, shift] = W emb
  (improved-DDPM Sec. 3). Called inside a block's compact `__call__` (its `emb_proj`)."""
  channels = h.shape[-1]
  out = nn.Dense(2 * channels if scale_shift else channels, dtype=dtype,
                 name="emb_proj")(nn.silu(emb))[:, None, None, :]
  if scale_shift:
    scale, shift = jnp.split(out, 2, axis=-1)
    return norm(h) * (1 + scale) + shift
  return norm(h + out)


class ResBlock(nn.Module):
  """Residual block with the embedding added (or FiLM scale-shift, improved-DDPM Sec. 3) between
  its two convolutions."""
  out_ch: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    h = nn.silu(group_norm(x.shape[-1], self.num_groups, "norm_0")(x))
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, name="conv_0")(h)
    h = embed(h, emb, group_norm(self.out_ch, self.num_groups, "norm_1"),
              self.use_scale_shift_norm, self.dtype)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                name="conv_1")(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="skip")(x)
    return (x + h).astype(self.dtype)


class MBConvBlock(nn.Module):
  """MBConv with squeeze-excitation (MobileNetV2 / EfficientNet / CoAtNet; paper 002 Sec. 4.4,
  expansion 4 and SE 0.25) in place of `ResBlock`: pre-norm 1x1 expansion to `expansion` x the
  block's input channels, depthwise 3x3, the embedding added (or FiLM scale-shift) on the
  expanded features, squeeze-excitation to `se_ratio` x the input channels (EfficientNet's
  convention), zero-initialised 1x1 projection to `out_ch`, residual. With these conventions the
  paper's MBConv64 / MBConv96 UNets have its Table 4.3 parameter counts (within 5%)."""
  out_ch: int
  expansion: int = 4
  se_ratio: float = 0.25
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    mid = x.shape[-1] * self.expansion
    h = group_norm(x.shape[-1], self.num_groups, "norm_0")(x)
    h = nn.silu(group_norm(mid, self.num_groups, "norm_1")(
        nn.Conv(mid, (1, 1), dtype=self.dtype, name="expand")(h)))
    h = nn.Conv(mid, (3, 3), feature_group_count=mid, dtype=self.dtype, name="depthwise")(h)
    h = nn.silu(embed(h, emb, group_norm(mid, self.num_groups, "norm_2"),
                      self.use_scale_shift_norm, self.dtype))
    se = max(1, int(x.shape[-1] * self.se_ratio))
    s = nn.silu(nn.Dense(se, dtype=self.dtype, name="se_reduce")(h.mean(axis=(1, 2))))
    s = nn.sigmoid(nn.Dense(mid, dtype=self.dtype, name="se_expand")(s))
    h = h * s[:, None, None, :]
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                name="project")(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="skip")(x)
    return (x + h).astype(self.dtype)


BLOCKS = {"res": ResBlock, "mbconv": MBConvBlock}


def _save_dots_and_convs(prim, *args, **params) -> bool:
  return (jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)
          or prim.name == "conv_general_dilated")


# `config.model.remat` -> the `jax.checkpoint` policy of each block (None: no remat).
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": _save_dots_and_convs}


def _remat(cls, remat: str, static_argnums=()):
  if remat not in REMAT_POLICIES:
    raise ValueError(f"Unknown model.remat {remat!r}; valid: {sorted(REMAT_POLICIES)}.")
  if remat == "none":
    return cls
  return nn.remat(cls, policy=REMAT_POLICIES[remat], static_argnums=static_argnums)


def make_block(out_ch: int, *, kind: str = "res", remat: str = "none", **kwargs) -> nn.Module:
  """The residual block registered as `kind` ("res" or "mbconv"; `config.model.block`), under
  the `remat` policy."""
  if kind not in BLOCKS:
    raise ValueError(f"Unknown block kind {kind!r}; valid: {sorted(BLOCKS)}.")
  # `train` (argument 3, counting self) selects dropout: a Python bool, static under remat.
  return _remat(BLOCKS[kind], remat, static_argnums=(3,))(out_ch, **kwargs)


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all spatial positions with a residual connection."""
  num_heads: int = 1
  head_channels: int = -1
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    heads = c // self.head_channels if self.head_channels > 0 else self.num_heads
    if c % heads:
      raise ValueError(f"{c} channels do not split into {heads} attention heads.")
    h = group_norm(c, self.num_groups, "norm")(x)
    qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(h)
    # Split on the channel axis (whose gradient is one concatenate) rather than rearranging a
    # "(three n d)" axis: the gradient of that was three zero-padded [3, ...] buffers summed and
    # transposed twice (178 ms of XLA:CPU thread time in the reference UNet's train step).
    q, k, v = (einops.rearrange(a, "b h w (n d) -> b n (h w) d", n=heads)
               for a in jnp.split(qkv, 3, axis=-1))
    scale = 1.0 / math.sqrt(c // heads)
    logits = jnp.einsum("bnqd,bnkd->bnqk", q, k).astype(jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bnqk,bnkd->bnqd", weights, v)
    out = einops.rearrange(out, "b n (h w) d -> b h w (n d)", h=hgt, w=wid)
    out = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj_out")(out)
    return (x + out).astype(self.dtype)


def make_attention(*, remat: str = "none", **kwargs) -> nn.Module:
  """`AttentionBlock(**kwargs)` under the `remat` policy."""
  return _remat(AttentionBlock, remat)(**kwargs)


class Downsample(nn.Module):
  """Stride-2 3x3 convolution: [B, H, W, C] -> [B, H/2, W/2, out_ch or C]."""
  out_ch: Optional[int] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.out_ch or x.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype,
                   name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling then a 3x3 convolution."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = images.nearest_upsample(x, 2)
    return nn.Conv(x.shape[-1], (3, 3), dtype=self.dtype, name="conv")(x)
