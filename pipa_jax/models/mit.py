"""Mix Transformer (MiT-b0..b5), SegFormer's encoder (docs/method.md §2.1).

Attribute paths mirror the official PyTorch names (`patch_embed1.proj`, `block1[0].attn.kv`,
`block3[5].mlp.dwconv.dwconv`, `norm4`), so pipa_jax.convert maps official keys by rule.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipa_jax.models import layers


@dataclasses.dataclass(frozen=True)
class MiTVariant:
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    mlp_ratio: int = 4
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)


# The one place where the variants are decoded.
MIT_VARIANTS = {
    "b0": MiTVariant((32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": MiTVariant((64, 128, 320, 512), (2, 2, 2, 2)),
    "b2": MiTVariant((64, 128, 320, 512), (3, 4, 6, 3)),
    "b3": MiTVariant((64, 128, 320, 512), (3, 4, 18, 3)),
    "b4": MiTVariant((64, 128, 320, 512), (3, 8, 27, 3)),
    "b5": MiTVariant((64, 128, 320, 512), (3, 6, 40, 3)),
}
# Not a published model (no weights exist): b0 with one block per stage, for the synthetic
# configs' `tiny` and the real configs' `smoke` variants that the tests train. One block instead
# of two per stage cut the tiny PiPa + MIC step's trace + lowering 21 -> 13 s, its compile
# 52-62 -> 40 s and a step 1.85 -> 1.45 s (2 CPU cores, one device); the code path is b0..b5's,
# whose parity with PyTorch is tested on those variants themselves.
MIT_VARIANTS["tiny"] = dataclasses.replace(MIT_VARIANTS["b0"], depths=(1, 1, 1, 1))


def get_variant(variant: str | MiTVariant) -> MiTVariant:
    if isinstance(variant, MiTVariant):
        return variant
    name = str(variant).lower().removeprefix("mit_").removeprefix("mit-")
    if name not in MIT_VARIANTS:
        raise ValueError(
            f"unknown MiT variant {variant!r}; expected one of "
            f"{', '.join('mit_' + k for k in MIT_VARIANTS)} (or b0..b5)"
        )
    return MIT_VARIANTS[name]


# Stages with at least this many blocks run as a lax.scan when scan_blocks is on.
SCAN_MIN_DEPTH = 4
resolve_scan_blocks = layers.resolve_scan_blocks


class OverlapPatchEmbed(nnx.Module):
    """Strided conv (k7 s4 p3 in stage 1, k3 s2 p1 after) + LayerNorm (eps 1e-5)."""

    def __init__(self, in_ch, dim, kernel_size, stride, *, forms, dtype, param_dtype, rngs):
        self.proj = layers.conv2d(in_ch, dim, kernel_size, stride=stride, padding=kernel_size // 2,
                                  impl=forms.conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = layers.layer_norm(dim, 1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.proj(x))  # [B, h, w, C]


class Attention(nnx.Module):
    """Efficient self-attention: keys/values from a spatially reduced map when sr_ratio > 1
    (`sr`: conv with kernel = stride = sr_ratio, no padding, a patch matmul on CPU, see
    layers.Conv2d). The softmax attention itself is layers.attention (`forms.attention`)."""

    def __init__(self, dim, num_heads, sr_ratio, *, forms, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = layers.linear(dim, dim, impl=forms.dense, **kw)
        self.kv = layers.linear(dim, 2 * dim, impl=forms.dense, **kw)  # output channels [k | v]
        self.proj = layers.linear(dim, dim, impl=forms.dense, **kw)
        if sr_ratio > 1:
            self.sr = layers.conv2d(dim, dim, sr_ratio, stride=sr_ratio, impl=forms.conv, **kw)
            self.norm = layers.layer_norm(dim, 1e-5, **kw)
        self.attention_impl = forms.attention
        self.dtype = dtype

    def __call__(self, x):  # x: [B, h, w, C]
        b, h, w, c = x.shape
        if self.sr_ratio > 1 and (h < self.sr_ratio or w < self.sr_ratio):
            raise ValueError(
                f"MiT attention with spatial reduction {self.sr_ratio} got a {h}x{w} map, which reduces to no "
                f"keys: the encoder input must be at least 29x29 pixels (stage 1 at stride 4 needs 8x8); HRDA's "
                f"context view is half the crop, so its crops (data.crop_size, pipa.patch.crop_size) need >= 64")
        heads, hd = self.num_heads, c // self.num_heads
        q = self.q(x).reshape(b, h * w, heads, hd)
        src = self.norm(self.sr(x)) if self.sr_ratio > 1 else x
        kv = self.kv(src).reshape(b, -1, 2, heads, hd)
        k, v = kv[:, :, 0], kv[:, :, 1]
        out = layers.attention(q, k, v, impl=self.attention_impl).reshape(b, h, w, c)
        return self.proj(out)


class DWConv(nnx.Module):
    """Holds the 3x3 depthwise conv under the official name `dwconv.dwconv`."""

    def __init__(self, dim, *, impl, dtype, param_dtype, rngs):
        self.dwconv = layers.DepthwiseConv2d(dim, impl=impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.dwconv(x)


class MixFFN(nnx.Module):
    """fc1 -> depthwise 3x3 -> GELU (exact erf form, as nn.GELU) -> fc2."""

    def __init__(self, dim, hidden, *, forms, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = layers.linear(dim, hidden, impl=forms.dense, **kw)
        self.dwconv = DWConv(hidden, impl=forms.dwconv, **kw)
        self.fc2 = layers.linear(hidden, dim, impl=forms.dense, **kw)

    def __call__(self, x):
        return self.fc2(layers.gelu_erf(self.dwconv(self.fc1(x))))


class Block(nnx.Module):
    """Pre-norm transformer block. The drop-path rate is a call argument (not an attribute) so
    all blocks of a stage share one graph definition and can be scanned."""

    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, *, forms, dtype, param_dtype, rngs):
        kw = dict(forms=forms, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layers.layer_norm(dim, 1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(dim, num_heads, sr_ratio, **kw)
        self.norm2 = layers.layer_norm(dim, 1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MixFFN(dim, dim * mlp_ratio, **kw)

    def __call__(self, x, drop_rate, rng, *, train: bool):
        k1, k2 = jax.random.split(rng) if rng is not None else (None, None)
        x = x + layers.drop_path(self.attn(self.norm1(x)), drop_rate, k1, train=train)
        return x + layers.drop_path(self.mlp(self.norm2(x)), drop_rate, k2, train=train)


class MixVisionTransformer(nnx.Module):
    """MiT encoder. `__call__(x [B, H, W, 3], *, train=False, rng=None)` returns the four stage
    outputs [B, H/4, W/4, C1], [B, H/8, W/8, C2], [B, H/16, W/16, C3], [B, H/32, W/32, C4]
    (ceil division, PyTorch's conv arithmetic for sizes not divisible by 32).

    Args:
      variant: 'b0'..'b5' (or 'mit_b5').
      drop_path_rate: stochastic depth, linearly spaced over all blocks (0.1 in all recipes);
        active only with train=True, which then needs `rng`.
      forms: layers.ComputeForms: the depthwise-conv, conv and attention forms, and
        - scan_blocks: run the blocks of each stage with >= SCAN_MIN_DEPTH blocks as one lax.scan
          over stacked parameters. The result is identical; compile time stops growing with depth
          (MiT-b5 has 40 blocks in stage 3). 'auto': unrolled on CPU (see resolve_scan_blocks).
        - remat: recompute each block's activations in the backward pass (jax.checkpoint; only the
          block inputs are kept). Same result, less memory, about one more forward of compute.
      dtype / param_dtype: compute and parameter dtypes.
    """

    def __init__(self, variant: str = "b5", *, drop_path_rate: float = 0.1,
                 forms: layers.ComputeForms = layers.ComputeForms(),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        v = get_variant(variant)
        self.variant = variant
        self.embed_dims = v.embed_dims
        self.depths = v.depths
        self.scan_blocks = forms.scan_blocks
        self.remat = forms.remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rates = np.linspace(0.0, drop_path_rate, sum(v.depths)).tolist()
        self.drop_path_rates = tuple(tuple(rates[sum(v.depths[:s]):sum(v.depths[:s + 1])]) for s in range(4))
        in_ch = 3
        for s in range(4):
            k, stride = (7, 4) if s == 0 else (3, 2)
            setattr(self, f"patch_embed{s + 1}", OverlapPatchEmbed(in_ch, v.embed_dims[s], k, stride,
                                                                   forms=forms, **kw))
            setattr(self, f"block{s + 1}", nnx.List([
                Block(v.embed_dims[s], v.num_heads[s], v.mlp_ratio, v.sr_ratios[s], forms=forms, **kw)
                for _ in range(v.depths[s])
            ]))
            setattr(self, f"norm{s + 1}", layers.layer_norm(v.embed_dims[s], 1e-6, **kw))
            in_ch = v.embed_dims[s]

    def _run_stage(self, s, x, rng, train):
        blocks = getattr(self, f"block{s + 1}")
        rates = self.drop_path_rates[s]
        train = train and rng is not None  # __call__ has checked that no rng means no stochastic depth
        keys = jax.random.split(rng, len(blocks)) if rng is not None else [None] * len(blocks)
        # Scanning a short stage compiles slower than unrolling it (measured: b0 step 41 s vs 26 s).
        if not resolve_scan_blocks(self.scan_blocks) or len(blocks) < SCAN_MIN_DEPTH:
            for blk, rate, key in zip(blocks, rates, keys):
                if self.remat:
                    # Functional form so jax.checkpoint sees the parameters as inputs; the rate
                    # stays a Python float (rate 0 skips drop path statically, as unrematted).
                    gd, st = nnx.split(blk)
                    fn = jax.checkpoint(lambda st, h, k, gd=gd, rate=rate: nnx.merge(gd, st)(h, rate, k, train=train))
                    x = fn(st, x, key)
                else:
                    x = blk(x, rate, key, train=train)
            return x
        graphdef, first = nnx.split(blocks[0])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), first, *[nnx.state(b) for b in blocks[1:]])
        rates_arr = jnp.asarray(rates, jnp.float32)

        def body(h, inp):
            state, rate, key = inp
            return nnx.merge(graphdef, state)(h, rate, key, train=train), None

        if self.remat:
            body = jax.checkpoint(body)

        x, _ = jax.lax.scan(body, x, (stacked, rates_arr, keys if rng is not None else None))
        return x

    def __call__(self, x, *, train: bool = False, rng=None, use_running_average: bool | None = None):
        del use_running_average                       # no BatchNorm in MiT (the backbone protocol has it)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"MiT expects NHWC images [B, H, W, 3], got shape {tuple(x.shape)}")
        if train and rng is None and max(max(r) for r in self.drop_path_rates) > 0:
            raise ValueError("train=True with stochastic depth needs rng=jax.random.key(...)")
        stage_keys = jax.random.split(rng, 4) if (train and rng is not None) else [None] * 4
        outs = []
        for s in range(4):
            x = getattr(self, f"patch_embed{s + 1}")(x)
            x = self._run_stage(s, x, stage_keys[s], train)
            x = getattr(self, f"norm{s + 1}")(x)
            outs.append(x)
        return outs


def param_group(names: list[str], config) -> str | None:
    """The optimizer group of a MiT parameter (path below `backbone`): its LayerNorms
    (patch_embed*.norm, block*.norm1 / norm2, attn.norm, norm1..4) are 'no_decay' (mmseg's
    paramwise_cfg for DAFormer), everything else the default group."""
    del config
    return "no_decay" if any(n.startswith("norm") for n in names[:-1]) else None
