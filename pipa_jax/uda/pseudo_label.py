"""Teacher pseudo-labels and their confidence weight (docs/method.md §3.5).

Official behaviour (DAFormer ``DACS.forward_train``, from DACS "threshold_uniform"): softmax of
the EMA teacher's logits, ``(p_max, y_hat) = max(softmax)``, and ONE scalar weight for the whole
batch, ``q = #{pixels with p_max >= 0.968} / #{pixels}``, broadcast to a map; DAFormer then sets
the weight to 0 on the top 15 and bottom 120 rows of the target crop
(``pseudo_weight_ignore_top/bottom``). HRDA/MIC instead carry a validity mask of the full image;
both cases are expressed here by ``valid_mask``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pseudo_labels(teacher_logits, *, threshold: float = 0.968, valid_mask=None):
    """Pseudo-labels, their weight map and the confident share.

    Args:
      teacher_logits: [B, h, w, C] teacher logits (any float dtype; softmax runs in float32).
      threshold: confidence threshold on the max softmax probability (0.968).
      valid_mask: optional [B, h, w] bool; the weight is 0 where it is False (crop margins).

    Returns:
      labels: [B, h, w] int32 argmax classes.
      weight: [B, h, w] float32, ``q`` everywhere (0 where ``valid_mask`` is False).
      confident_share: float32 scalar ``q``, computed over every pixel of the batch (the mask
        does not change it, as in DAFormer). With a batch sharded over devices the sums are
        global, i.e. the same as on one device.
      All outputs are stop-gradient.
    """
    logits = jax.lax.stop_gradient(jnp.asarray(teacher_logits).astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    p_max = jnp.max(probs, axis=-1)
    labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    num_confident = jnp.sum(p_max >= threshold, dtype=jnp.int32)
    confident_share = num_confident.astype(jnp.float32) / jnp.float32(p_max.size)
    weight = jnp.broadcast_to(confident_share, p_max.shape)
    if valid_mask is not None:
        valid_mask = jnp.asarray(valid_mask, bool)
        if valid_mask.shape != p_max.shape:
            raise ValueError(
                f"valid_mask must have the logits' [B, h, w] shape {p_max.shape}, "
                f"got {valid_mask.shape}"
            )
        weight = jnp.where(valid_mask, weight, 0.0)
    return labels, weight.astype(jnp.float32), confident_share


def crop_margin_mask(batch: int, height: int, width: int, top: int = 15, bottom: int = 120):
    """[batch, height, width] bool, False on the top ``top`` and bottom ``bottom`` rows.

    DAFormer's ``psweight_ignore_top/bottom`` (15 / 120 on 512x512 target crops): rows near the
    image border hold rectification artefacts and the ego-car hood, whose pseudo-labels drift.
    """
    if top < 0 or bottom < 0:
        raise ValueError(f"crop margins must be >= 0, got top={top}, bottom={bottom}")
    rows = jnp.arange(height)
    valid_rows = (rows >= top) & (rows < height - bottom)
    return jnp.broadcast_to(valid_rows[None, :, None], (batch, height, width))
