"""HRDA: the multi-resolution segmentor (docs/method.md §6).

One encoder and one decode head (`decode_head.head`, official name) serve two views of a crop:
- the context view, the whole crop resized by `context_scale` (0.5; bilinear, no antialias);
- the detail view, a `hr_crop_size` crop at full resolution whose top-left corner is a multiple
  of `crop_coord_divisible` (8), drawn from the forward's key, one box for the whole batch.
A second head on the context features, `decode_head.scale_attention` (the DAFormer head with a
single 1x1 ConvModule as fusion, one channel per class), gives `att = sigmoid(.)`, zero outside
the detail box in training. Fusion at the detail resolution (stride 4 of the input):
`fused = up(att) * hr_inserted + up((1 - att) * lr)`, where up is a bilinear x(1/context_scale)
resize and hr_inserted is the detail logits pasted at the box (zeros elsewhere).
Loss: `(1 - hr_w - lr_w) * CE(fused, y) + hr_w * CE(hr, crop(y)) + lr_w * CE((1 - att) * lr, y)`,
hr_w = 0.1, lr_w = 0 (the official defaults). Inference: the detail branch slides windows of
`hr_crop_size` every `hr_slide_stride` pixels (batched, logits averaged at stride 4) and there
is no box mask.

Module paths mirror the official names (`backbone.*`, `decode_head.head.*`,
`decode_head.scale_attention.*`, no `decode_head.conv_seg`), so official HRDA / MIC / PiPa-HRDA
checkpoints convert by rule (pipa_jax/convert.py).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pipa_jax.models import heads, layers, registry
from pipa_jax.models.segmentor import SegOutput, build_pipa_heads, dtype_of, upsampled_cross_entropy


class HRDAHead(nnx.Module):
    """`head` (the shared decode head) and `scale_attention` (official `decode_head.*`)."""

    def __init__(self, config: ml_collections.ConfigDict, dims, **kw):
        self.head = registry.build_head(config, dims, **kw)
        att_classes = config.num_classes if config.hrda.attention_classwise else 1
        self.scale_attention = heads.DAFormerHead(dims, att_classes, config.embed_dim, fusion="conv",
                                                  dropout=config.dropout, **kw)

    def attention(self, features, *, train: bool, use_running_average: bool, rng=None):
        logits = self.scale_attention(features, train=train, use_running_average=use_running_average, rng=rng)
        return jax.nn.sigmoid(logits.astype(jnp.float32))


def _pair(name, value):
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"config.model.hrda.{name} = {value!r}: expected (height, width) integers") from None
    return h, w


def sample_crop_box(key, image_hw, crop_hw, divisible: int) -> jax.Array:
    """Top-left (y, x) int32 [2] of a `crop_hw` box in an `image_hw` image: each coordinate
    `randint(0, (margin + 1) // divisible) * divisible` (the official rule: for a 1024 image and a
    512 crop the offsets are 0, 8, ..., 504). A crop as large as the image sits at (0, 0)."""
    out = []
    for k, n, c in zip(jax.random.split(key), image_hw, crop_hw):
        count = max((max(n - c, 0) + 1) // divisible, 1)
        out.append(jax.random.randint(k, (), 0, count) * divisible)
    return jnp.stack(out).astype(jnp.int32)


def box_mask(grid_hw, box, box_hw, stride: int) -> jax.Array:
    """float32 [1, h, w, 1]: 1 inside the box (pixels `box`, size `box_hw`) on a grid of `stride`."""
    rows = jnp.arange(grid_hw[0])[:, None]
    cols = jnp.arange(grid_hw[1])[None, :]
    y0, x0 = box[0] // stride, box[1] // stride
    inside = ((rows >= y0) & (rows < y0 + box_hw[0] // stride)
              & (cols >= x0) & (cols < x0 + box_hw[1] // stride))
    return inside.astype(jnp.float32)[None, :, :, None]


def slide_windows(image_hw, crop_hw, stride_hw):
    """HRDA's detail windows (mmseg layout: the last row / column moved back to end at the border):
    ((win_h, win_w), [(y, x), ...])."""
    from pipa_jax.inference import window_grid
    return window_grid(image_hw, crop_hw, stride_hw)


class HRDA(nnx.Module):
    """The HRDA segmentor (module docstring) with PiPa's heads; follows segmentor.Segmentor."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        h = config.hrda
        kw = dict(forms=layers.ComputeForms.from_config(config), dtype=dtype_of(config.dtype),
                  param_dtype=jnp.float32, rngs=rngs)
        scale = float(h.context_scale)
        factor = round(1.0 / scale) if scale > 0 else 0
        if factor < 2 or not math.isclose(factor * scale, 1.0):
            raise ValueError(f"config.model.hrda.context_scale = {h.context_scale!r}: expected 1/k for an "
                             "integer k >= 2 (HRDA: 0.5)")
        self.factor = factor
        self.head_stride = registry.head_stride(config.decode_head)
        self.decoder_stride = self.head_stride * factor     # the context logits' stride over the input
        self.hr_crop = _pair("hr_crop_size", h.hr_crop_size)
        self.divisible = int(h.crop_coord_divisible)
        self.slide_stride = _pair("hr_slide_stride", h.hr_slide_stride)
        self.hr_loss_weight = float(h.hr_loss_weight)
        self.lr_loss_weight = float(h.lr_loss_weight)
        s = self.decoder_stride
        if self.divisible <= 0 or self.divisible % s:
            raise ValueError(
                f"config.model.hrda.crop_coord_divisible = {h.crop_coord_divisible!r}: the detail box must start "
                f"on the context logits' grid (stride {s} = head stride {self.head_stride} x {factor}), so use a "
                f"multiple of {s} (HRDA: 8)")
        if min(self.hr_crop) <= 0 or self.hr_crop[0] % s or self.hr_crop[1] % s:
            raise ValueError(
                f"config.model.hrda.hr_crop_size = {tuple(h.hr_crop_size)}: the detail box must cover whole cells "
                f"of the context logits (stride {s}); use multiples of {s} (HRDA: 512x512)")
        if min(self.slide_stride) <= 0 or any(v % self.head_stride for v in self.slide_stride):
            raise ValueError(
                f"config.model.hrda.hr_slide_stride = {tuple(h.hr_slide_stride)}: expected positive multiples of "
                f"the head stride {self.head_stride} (HRDA: half the detail crop, 256x256)")
        if not 0 <= self.hr_loss_weight + self.lr_loss_weight <= 1:
            raise ValueError(f"config.model.hrda: hr_loss_weight + lr_loss_weight = "
                             f"{self.hr_loss_weight + self.lr_loss_weight}: expected a value in [0, 1]")
        self.backbone = registry.build_backbone(config, **kw)
        dims = self.backbone.embed_dims
        self.decode_head = HRDAHead(config, dims, **kw)
        build_pipa_heads(self, config, dims, kw)
        self.num_classes = config.num_classes

    # ------------------------------------------------------------------ helpers

    def _check_input(self, x):
        hh, hw = self.hr_crop
        h, w = x.shape[1:3]
        if hh > h or hw > w:
            raise ValueError(
                f"HRDA's detail crop {hh}x{hw} (model.hrda.hr_crop_size) is larger than the {h}x{w} input; use a "
                f"training crop (data.crop_size) of at least {hh}x{hw} or a smaller hr_crop_size")
        if h % self.decoder_stride or w % self.decoder_stride:
            raise ValueError(
                f"HRDA input {h}x{w}: expected multiples of {self.decoder_stride} (the context logits' stride: head "
                f"stride {self.head_stride} x {self.factor})")

    def _context(self, x):
        h, w = x.shape[1:3]
        return layers.resize_bilinear(x, (h // self.factor, w // self.factor))

    def _fuse(self, lr_logits, hr_full, att):
        """fused = up(att) * hr + up((1 - att) * lr) at the detail resolution; float32."""
        lr = lr_logits.astype(jnp.float32)
        size = (lr.shape[1] * self.factor, lr.shape[2] * self.factor)
        weighted = (1.0 - att) * lr
        return (layers.resize_bilinear(att, size) * hr_full + layers.resize_bilinear(weighted, size)), weighted

    # ------------------------------------------------------------------ protocol

    def forward_train(self, x, *, rng, use_running_average: bool = False) -> SegOutput:
        self._check_input(x)
        b, h, w, _ = x.shape
        hh, hw = self.hr_crop
        k_box, k_lr, k_hr, k_lrd, k_hrd, k_att = jax.random.split(rng, 6)
        box = sample_crop_box(k_box, (h, w), self.hr_crop, self.divisible)
        lr_x = self._context(x)
        hr_x = jax.lax.dynamic_slice(x, (0, box[0], box[1], 0), (b, hh, hw, x.shape[3]))
        lr_feats = self.backbone(lr_x, train=True, rng=k_lr)
        hr_feats = self.backbone(hr_x, train=True, rng=k_hr)
        kw = dict(train=True, use_running_average=use_running_average, return_fused=True)
        # The official order of BatchNorm updates: head on the context, head on the detail, attention.
        lr_logits, lr_fused = self.decode_head.head(lr_feats, rng=k_lrd, **kw)
        hr_logits, _ = self.decode_head.head(hr_feats, rng=k_hrd, **kw)
        att = self.decode_head.attention(lr_feats, train=True, use_running_average=use_running_average, rng=k_att)
        att = att * box_mask(att.shape[1:3], box, self.hr_crop, self.decoder_stride)
        s = self.head_stride
        full = jnp.zeros((b, h // s, w // s, hr_logits.shape[-1]), jnp.float32)
        hr_inserted = jax.lax.dynamic_update_slice(full, hr_logits.astype(jnp.float32), (0, box[0] // s, box[1] // s, 0))
        fused, lr_weighted = self._fuse(lr_logits, hr_inserted, att)
        return SegOutput(logits=fused, features=tuple(lr_feats), feature_input=lr_x, decoder_features=lr_fused,
                         extras={"hr_logits": hr_logits, "hr_features": tuple(hr_feats), "lr_logits": lr_logits,
                                 "lr_weighted": lr_weighted, "attention": att, "crop_box": box})

    def crop_to_box(self, out: SegOutput, maps):
        """`maps` [B, H, W, ...] at the input resolution cut to the training forward's detail box."""
        box = out.extras["crop_box"]
        start = (0, box[0], box[1]) + (0,) * (maps.ndim - 3)
        return jax.lax.dynamic_slice(maps, start, (maps.shape[0],) + self.hr_crop + maps.shape[3:])

    def supervised_loss(self, out: SegOutput, labels, weight=None, *, average: str = "all"):
        size = (out.logits.shape[1] * self.head_stride, out.logits.shape[2] * self.head_stride)
        if tuple(labels.shape[1:3]) != size:
            raise ValueError(f"HRDA's loss needs labels at the input resolution {size} (the detail box is in "
                             f"input pixels), got {tuple(labels.shape[1:3])}")
        hr_w, lr_w = self.hr_loss_weight, self.lr_loss_weight
        loss = (1.0 - hr_w - lr_w) * upsampled_cross_entropy(out.logits, labels, weight, average=average)
        if hr_w > 0:
            hr_weight = None if weight is None else self.crop_to_box(out, weight)
            loss = loss + hr_w * upsampled_cross_entropy(out.extras["hr_logits"], self.crop_to_box(out, labels),
                                                         hr_weight, average=average)
        if lr_w > 0:
            loss = loss + lr_w * upsampled_cross_entropy(out.extras["lr_weighted"], labels, weight, average=average)
        return loss

    def detail_logits(self, x, *, use_running_average: bool):
        """The detail branch over the whole input [B, H, W, 3]: windows of hr_crop_size every
        hr_slide_stride, batched through the encoder and head (one BatchNorm batch, as the
        official code), their stride-4 logits averaged where they overlap. float32 [B, H/4, W/4, K]."""
        b, h, w, c = x.shape
        s = self.head_stride
        (wh, ww), offsets = slide_windows((h, w), self.hr_crop, self.slide_stride)
        bad = [(y, x1) for y, x1 in offsets if y % s or x1 % s]
        if bad:
            raise ValueError(
                f"HRDA's detail windows ({wh}x{ww} every {self.slide_stride} over {h}x{w}) start at {bad[:3]}, "
                f"not on the head's stride-{s} grid; use an input whose size minus the window is a multiple of {s}")
        windows = jnp.concatenate([x[:, y:y + wh, x1:x1 + ww] for y, x1 in offsets], axis=0)
        logits = self.decode_head.head(self.backbone(windows, train=False), train=False,
                                       use_running_average=use_running_average).astype(jnp.float32)
        acc = jnp.zeros((b, h // s, w // s, logits.shape[-1]), jnp.float32)
        count = np.zeros((h // s, w // s), np.float32)
        for i, (y, x1) in enumerate(offsets):
            acc = acc.at[:, y // s:(y + wh) // s, x1 // s:(x1 + ww) // s].add(logits[i * b:(i + 1) * b])
            count[y // s:(y + wh) // s, x1 // s:(x1 + ww) // s] += 1
        return acc / jnp.asarray(count)[None, :, :, None]

    def infer_logits(self, x, *, use_running_average: bool = True):
        self._check_input(x)
        lr_feats = self.backbone(self._context(x), train=False)
        lr_logits = self.decode_head.head(lr_feats, train=False, use_running_average=use_running_average)
        hr_full = self.detail_logits(x, use_running_average=use_running_average)
        att = self.decode_head.attention(lr_feats, train=False, use_running_average=use_running_average)
        fused, _ = self._fuse(lr_logits, hr_full, att)
        return layers.resize_bilinear(fused, x.shape[1:3])

    def pixel_view(self, out: SegOutput, labels):
        """PiPa's pixel contrast on HRDA reads the detail crop, with the label cut by the same box."""
        return out.extras["hr_features"], self.crop_to_box(out, labels), out.extras["hr_logits"]

    def patch_view(self, out: SegOutput):
        """PiPa's patch contrast on HRDA reads the context view, which covers the whole crop."""
        return out.decoder_features, out.extras["lr_logits"]
