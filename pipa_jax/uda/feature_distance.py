"""ImageNet feature distance on "thing" classes (DAFormer; docs/method.md §3.4).

Official behaviour (DAFormer ``calc_feat_dist`` / ``masked_feat_dist`` / ``downscale_label_ratio``):
on the last encoder stage, ``d = ||f_student - f_imagenet||_2`` per position (the frozen ImageNet
encoder's features are detached); the source label is downscaled to the feature grid by
average-pooling its one-hot (255 as an extra class) over ``scale x scale`` blocks, keeping the
majority class when its share is >= 0.75 and 255 otherwise (so a 255 majority also gives 255);
``L_FD = 0.005 * mean(d over positions whose downscaled label is a thing class)``.
Difference: officially an empty mask gives ``mean([]) = NaN``; here the loss is exactly 0 with
zero gradient (docs/method.md §3.4).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pipa_jax.labels import IGNORE_INDEX, NUM_CLASSES, THING_CLASSES


def downscale_label_ratio(
    labels,
    scale: int,
    *,
    min_ratio: float = 0.75,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
):
    """Majority-vote downscaling of a label map.

    Args:
      labels: [B, H, W] integer labels; values outside [0, num_classes) count as ignore.
      scale: static integer block size (H // h). Trailing rows/columns that do not fill a block
        are dropped, as PyTorch ``avg_pool2d`` does.
      min_ratio: minimum share of the winning class (0.75).

    Returns:
      [B, H // scale, W // scale] int32: the majority class (the ignore slot may win, giving
      ``ignore_index``), or ``ignore_index`` if its share is below ``min_ratio``. Ties go to the
      smaller class id.
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be [B, H, W], got shape {labels.shape}")
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    batch, height, width = labels.shape
    h, w = height // scale, width // scale
    labels = labels[:, : h * scale, : w * scale]
    in_range = (labels >= 0) & (labels < num_classes)
    slots = jnp.where(in_range, labels, num_classes).astype(jnp.int32)
    blocks = slots.reshape(batch, h, scale, w, scale)
    slot_ids = jnp.arange(num_classes + 1, dtype=jnp.int32)
    counts = jnp.sum(blocks[..., None] == slot_ids, axis=(2, 4), dtype=jnp.int32)  # [B,h,w,S]
    share = counts.astype(jnp.float32) / jnp.float32(scale * scale)
    best = jnp.argmax(share, axis=-1).astype(jnp.int32)
    best_share = jnp.max(share, axis=-1)
    out = jnp.where(best == num_classes, ignore_index, best)
    return jnp.where(best_share < min_ratio, ignore_index, out).astype(jnp.int32)


def _safe_norm(x, axis):
    """L2 norm whose gradient is 0 (not NaN) where the vector is exactly 0."""
    sq = jnp.sum(jnp.square(x), axis=axis)
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def feature_distance_loss(
    student_feat,
    imagenet_feat,
    labels,
    *,
    thing_classes=THING_CLASSES,
    min_ratio: float = 0.75,
    weight: float = 0.005,
    num_classes: int = NUM_CLASSES,
):
    """Weighted mean L2 distance to the frozen ImageNet features over thing-class positions.

    Args:
      student_feat: [B, h, w, C] student encoder features (last stage, stride 32).
      imagenet_feat: [B, h, w, C] frozen ImageNet encoder features (stop-gradient applied here).
      labels: [B, H, W] source labels; ``scale = W // w`` (DAFormer uses the width), and
        ``H // scale`` must equal h.
      thing_classes: class ids whose positions count.
      min_ratio: label downscaling threshold.
      weight: loss weight lambda_FD (0.005).

    Returns:
      (loss float32 scalar, num_positions int32 scalar). The mean runs over the positions of the
      whole batch; with no thing position the loss is exactly 0 and its gradient 0.
    """
    student_feat = jnp.asarray(student_feat)
    imagenet_feat = jnp.asarray(imagenet_feat)
    labels = jnp.asarray(labels)
    if student_feat.shape != imagenet_feat.shape or student_feat.ndim != 4:
        raise ValueError(
            "student_feat and imagenet_feat must both be [B, h, w, C] with equal shapes, got "
            f"{student_feat.shape} and {imagenet_feat.shape}"
        )
    batch, h, w, _ = student_feat.shape
    if labels.ndim != 3 or labels.shape[0] != batch:
        raise ValueError(f"labels must be [B={batch}, H, W], got shape {labels.shape}")
    scale = labels.shape[2] // w
    if scale < 1 or labels.shape[1] // scale != h or labels.shape[2] // scale != w:
        raise ValueError(
            f"labels of shape {labels.shape[1:]} do not downscale to the feature grid {(h, w)} "
            f"with one integer factor (W // w = {scale})"
        )
    down = downscale_label_ratio(labels, scale, min_ratio=min_ratio, num_classes=num_classes)
    things = jnp.asarray(tuple(thing_classes), jnp.int32)
    mask = jnp.any(down[..., None] == things, axis=-1)
    diff = student_feat.astype(jnp.float32) - jax.lax.stop_gradient(
        imagenet_feat.astype(jnp.float32)
    )
    dist = _safe_norm(diff, axis=-1)
    num_positions = jnp.sum(mask, dtype=jnp.int32)
    total = jnp.sum(jnp.where(mask, dist, 0.0))
    loss = weight * total / jnp.maximum(num_positions, 1).astype(jnp.float32)
    return loss.astype(jnp.float32), num_positions
