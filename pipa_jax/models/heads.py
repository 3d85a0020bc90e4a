"""Decoders (DAFormer context-aware fusion, SegFormer all-MLP) and the PiPa projection heads.

Attribute paths mirror the official mmseg names (`embed_layers[0].proj`,
`fuse_layer.aspp_modules[1].depthwise_conv.conv`, `fuse_layer.bottleneck.bn`, `conv_seg`), so
official checkpoints convert by rule (pipa_jax/convert.py). All maps are NHWC.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pipa_jax.models import layers


def _l2_normalize(x, eps=1e-12):
    """F.normalize(p=2, dim=channels) semantics, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def channel_dropout(x, rate: float, rng, *, train: bool):
    """Dropout2d: zeroes whole channels per sample (the classifier dropout of mmseg heads)."""
    if not train or rate == 0.0:
        return x
    if rng is None:
        raise ValueError("train=True with classifier dropout needs rng=jax.random.key(...)")
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0], 1, 1, x.shape[-1]))
    return x * (mask.astype(x.dtype) / keep)


class MLPEmbed(nnx.Module):
    """Token-wise Linear(C_in -> C_out) on a map (official `MLP` with attribute `proj`)."""

    def __init__(self, in_ch, out_ch, *, impl="auto", dtype, param_dtype, rngs):
        self.proj = layers.linear(in_ch, out_ch, impl=impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


class ConvModule(nnx.Module):
    """conv (no bias) -> BatchNorm -> ReLU, mmcv's ConvModule with BN and ReLU.

    `depthwise=True` makes the conv a depthwise k x k (channels in == out)."""

    def __init__(self, in_ch, out_ch, kernel_size, *, dilation=1, depthwise=False,
                 forms: layers.ComputeForms = layers.ComputeForms(), dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if depthwise:
            if in_ch != out_ch:
                raise ValueError(f"a depthwise ConvModule needs in == out channels, got {in_ch}, {out_ch}")
            self.conv = layers.DepthwiseConv2d(in_ch, kernel_size=kernel_size, dilation=dilation,
                                               use_bias=False, impl=forms.dwconv, **kw)
        else:
            self.conv = layers.conv2d(in_ch, out_ch, kernel_size, padding=dilation * (kernel_size // 2),
                                      dilation=dilation, use_bias=False, impl=forms.conv, **kw)
        self.bn = layers.BatchNorm(out_ch, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, *, use_running_average: bool):
        return jax.nn.relu(self.bn(self.conv(x), use_running_average=use_running_average))


class DepthwiseSeparableConvModule(nnx.Module):
    """Depthwise dilated 3x3 ConvModule, then pointwise 1x1 ConvModule (each BN + ReLU)."""

    def __init__(self, in_ch, out_ch, dilation, *, forms, dtype, param_dtype, rngs):
        kw = dict(forms=forms, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.depthwise_conv = ConvModule(in_ch, in_ch, 3, dilation=dilation, depthwise=True, **kw)
        self.pointwise_conv = ConvModule(in_ch, out_ch, 1, **kw)

    def __call__(self, x, *, use_running_average: bool):
        x = self.depthwise_conv(x, use_running_average=use_running_average)
        return self.pointwise_conv(x, use_running_average=use_running_average)


class ASPPFusion(nnx.Module):
    """DAFormer's context-aware fusion: ASPP without image pooling, depthwise-separable dilated
    branches (1, 6, 12, 18), concatenation, 3x3 bottleneck (official `ASPPWrapper`, sep=True)."""

    def __init__(self, in_ch, channels, dilations=(1, 6, 12, 18), *, forms, dtype, param_dtype, rngs):
        kw = dict(forms=forms, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        mods = []
        for d in dilations:
            if d == 1:
                mods.append(ConvModule(in_ch, channels, 1, **kw))
            else:
                mods.append(DepthwiseSeparableConvModule(in_ch, channels, d, **kw))
        self.aspp_modules = nnx.List(mods)
        self.bottleneck = ConvModule(len(dilations) * channels, channels, 3, **kw)

    def __call__(self, x, *, use_running_average: bool):
        outs = [m(x, use_running_average=use_running_average) for m in self.aspp_modules]
        return self.bottleneck(jnp.concatenate(outs, axis=-1), use_running_average=use_running_average)


class DAFormerHead(nnx.Module):
    """DAFormer decoder (docs/method.md §2.2): per-level Linear embedding to `embed_dim`, bilinear
    upsampling to stride 4 (align_corners=False), concatenation, fusion, dropout 0.1, 1x1 classifier.

    `fusion='aspp'` is the DAFormer head; `fusion='conv'` (a single 1x1 ConvModule) is HRDA's
    scale-attention head. `__call__(features, *, train, use_running_average, rng, return_fused)`
    takes the 4 encoder maps and returns logits [B, H/4, W/4, num_classes] (and the fused
    [B, H/4, W/4, embed_dim] map, which PiPa's patch head reads, when `return_fused`).
    """

    def __init__(self, in_channels, num_classes, embed_dim=256, *, fusion="aspp", dilations=(1, 6, 12, 18),
                 dropout=0.1, forms: layers.ComputeForms = layers.ComputeForms(), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_layers = nnx.List([MLPEmbed(c, embed_dim, impl=forms.dense, **kw) for c in in_channels])
        cat = embed_dim * len(in_channels)
        if fusion == "aspp":
            self.fuse_layer = ASPPFusion(cat, embed_dim, dilations, forms=forms, **kw)
        elif fusion == "conv":
            self.fuse_layer = ConvModule(cat, embed_dim, 1, forms=forms, **kw)
        else:
            raise ValueError(f"DAFormerHead fusion must be 'aspp' or 'conv', got {fusion!r}")
        self.conv_seg = layers.Conv2d(embed_dim, num_classes, (1, 1), dtype=dtype, param_dtype=param_dtype,
                                      kernel_init=nnx.initializers.normal(0.01), impl=forms.conv, rngs=rngs)
        self.dropout = dropout
        self.num_classes = num_classes

    def fuse(self, features, *, use_running_average: bool):
        size = features[0].shape[1:3]
        embedded = [layers.resize_bilinear(m(f), size) for m, f in zip(self.embed_layers, features)]
        return self.fuse_layer(jnp.concatenate(embedded, axis=-1), use_running_average=use_running_average)

    def classify(self, fused, *, train: bool, rng=None):
        return self.conv_seg(channel_dropout(fused, self.dropout, rng, train=train))

    def __call__(self, features, *, train: bool = False, use_running_average: bool | None = None,
                 rng=None, return_fused: bool = False):
        if use_running_average is None:
            use_running_average = not train
        fused = self.fuse(features, use_running_average=use_running_average)
        logits = self.classify(fused, train=train, rng=rng)
        return (logits, fused) if return_fused else logits


class SegFormerHead(nnx.Module):
    """SegFormer's all-MLP decoder (the lighter alternative): per-level Linear to `embed_dim`,
    upsample to stride 4, concatenate (level order 1..4, as DAFormer's copy of it), 1x1
    ConvModule, dropout, classifier `linear_pred`. Same call signature as DAFormerHead."""

    def __init__(self, in_channels, num_classes, embed_dim=256, *, dropout=0.1,
                 forms: layers.ComputeForms = layers.ComputeForms(), dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_c = nnx.List([MLPEmbed(c, embed_dim, impl=forms.dense, **kw) for c in in_channels])
        self.linear_fuse = ConvModule(embed_dim * len(in_channels), embed_dim, 1, forms=forms, **kw)
        self.linear_pred = layers.Conv2d(embed_dim, num_classes, (1, 1), dtype=dtype, param_dtype=param_dtype,
                                         kernel_init=nnx.initializers.normal(0.01), impl=forms.conv, rngs=rngs)
        self.dropout = dropout
        self.num_classes = num_classes

    def __call__(self, features, *, train: bool = False, use_running_average: bool | None = None,
                 rng=None, return_fused: bool = False):
        if use_running_average is None:
            use_running_average = not train
        size = features[0].shape[1:3]
        embedded = [layers.resize_bilinear(m(f), size) for m, f in zip(self.linear_c, features)]
        fused = self.linear_fuse(jnp.concatenate(embedded, axis=-1), use_running_average=use_running_average)
        logits = self.linear_pred(channel_dropout(fused, self.dropout, rng, train=train))
        return (logits, fused) if return_fused else logits


class PixelProjectionHead(nnx.Module):
    """PiPa's pixel head (docs/method.md §2.3): the 4 encoder maps, stages 2-4 upsampled to stride 4
    with align_corners=True (as the official code), concatenated -> 1x1 conv + BN + ReLU ->
    1x1 conv -> L2-normalised embeddings [B, H/4, W/4, proj_dim] in float32.

    Official names: proj_head.proj.0 (conv1), proj_head.proj.1.0 (bn), proj_head.proj.2 (conv2);
    pipa_jax.convert carries that rename."""

    def __init__(self, in_channels, proj_dim=256, *, forms: layers.ComputeForms = layers.ComputeForms(),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(impl=forms.conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        cat = sum(in_channels)
        self.conv1 = layers.conv2d(cat, cat, 1, **kw)
        self.bn = layers.BatchNorm(cat, dtype=dtype, param_dtype=param_dtype)
        self.conv2 = layers.conv2d(cat, proj_dim, 1, **kw)

    def __call__(self, features, *, use_running_average: bool):
        size = features[0].shape[1:3]
        x = jnp.concatenate([layers.resize_bilinear(f, size, align_corners=True) for f in features], axis=-1)
        x = jax.nn.relu(self.bn(self.conv1(x), use_running_average=use_running_average))
        return _l2_normalize(self.conv2(x))


class PatchProjectionHead(nnx.Module):
    """PiPa's patch head (docs/method.md §2.3): the decoder's fused map (stride 4), 2x2 average-pooled
    to stride 8 -> 1x1 conv + ReLU -> 1x1 conv -> L2-normalised [B, H/8, W/8, proj_dim].

    Official names: project.0 (conv1), project.2 (conv2), stored beside `model.` in the UDA module."""

    def __init__(self, in_ch=256, proj_dim=128, *, forms: layers.ComputeForms = layers.ComputeForms(),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(impl=forms.conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = layers.conv2d(in_ch, in_ch, 1, **kw)
        self.conv2 = layers.conv2d(in_ch, proj_dim, 1, **kw)

    def __call__(self, fused):
        b, h, w, c = fused.shape
        if h % 2 or w % 2:
            raise ValueError(f"the patch head pools 2x2: the fused map must have even size, got {h}x{w}")
        x = fused.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        return _l2_normalize(self.conv2(jax.nn.relu(self.conv1(x))))
