"""Pixel-wise cross-entropy with an ignore index (docs/method.md §2.4)."""

import jax
import jax.numpy as jnp
import optax

from pipa_jax.labels import IGNORE_INDEX


def _check_rows(name: str, expected: tuple[int, ...], **arrays) -> None:
    """Raises a ValueError naming every array whose shape is not `expected`."""
    bad = {k: tuple(v.shape) for k, v in arrays.items() if tuple(v.shape) != tuple(expected)}
    if bad:
        raise ValueError(f"{name}: expected shape {tuple(expected)} for {sorted(bad)}, got {bad}")


def _at_least_f32(x: jax.Array) -> jax.Array:
    # bfloat16 activations are upcast so softmax / logsumexp run in float32; float64 (tests) stays.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weight: jax.Array | None = None,
    ignore_index: int = IGNORE_INDEX,
    average: str = "all",
) -> jax.Array:
    """Mean pixel-wise cross-entropy, mmseg style (or, average='valid', over non-ignored pixels).

    Args:
      logits: [B, H, W, C] unnormalised class scores (any float dtype; computed in >= float32).
      labels: [B, H, W] integer class ids in [0, C), or `ignore_index`.
      weight: optional [B, H, W] per-pixel weight (e.g. the pseudo-label weight of the mixed
        image); None means 1 everywhere.
      ignore_index: label value that contributes nothing.
      average: 'all' (below) or 'valid': divide by the number of non-ignored pixels instead (at
        least 1), as DACS's CrossEntropy2d for the source loss.

    Returns:
      Scalar: sum over non-ignored pixels of weight * CE, divided by the number of ALL pixels
      B*H*W. Dividing by all pixels (ignored ones count 0 in the numerator and 1 in the
      denominator) is the official mmseg `reduction='mean'` with `avg_non_ignore=False`, which
      DAFormer/PiPa train with; it also makes an all-ignored batch give exactly 0 with zero
      (finite) gradients.
    """
    if logits.ndim != 4 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"cross_entropy expects logits [B, H, W, C] and labels [B, H, W] of the same B, H, W; "
            f"got logits {logits.shape} and labels {labels.shape} (resize the logits to the "
            "label resolution first)"
        )
    if average not in ("all", "valid"):
        raise ValueError(f"cross_entropy average={average!r}: expected 'all' or 'valid'")
    if weight is not None and weight.shape != labels.shape:
        raise ValueError(f"weight must have the labels' shape {labels.shape}, got {weight.shape}")
    logits = _at_least_f32(logits)
    valid = labels != ignore_index
    # Ignored pixels get a harmless in-range label; their CE is masked out below.
    safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    if weight is None:
        w = valid.astype(ce.dtype)
    else:
        w = jnp.where(valid, weight.astype(ce.dtype), 0.0)
    if average == "valid":
        return jnp.sum(ce * w) / jnp.maximum(jnp.sum(valid), 1).astype(ce.dtype)
    return jnp.sum(ce * w) / labels.size
