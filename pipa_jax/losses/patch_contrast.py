"""Patch-wise directional contrast between two overlapping crops (docs/method.md §5).

The crop geometry, the label-based negative set and the feature bank live with the training
step; this module only holds the loss, which streams over negatives so that memory grows
linearly with the number of anchors and negatives.
"""

import jax
import jax.numpy as jnp
from jax import lax

from pipa_jax.losses.cross_entropy import _at_least_f32, _check_rows
from pipa_jax.losses.pixel_contrast import _LOG_ZERO, _pad_rows


def directional_contrast_loss(
    anchors1: jax.Array,
    anchors2: jax.Array,
    anchor_labels: jax.Array,
    conf1: jax.Array,
    conf2: jax.Array,
    anchor_valid: jax.Array,
    negatives: jax.Array,
    negative_labels: jax.Array,
    negative_valid: jax.Array,
    *,
    temperature: float = 0.1,
    confidence_threshold: float = 0.9,
    chunk_size: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """Directional InfoNCE between the two views of each overlap cell (CAC's loss, used by PiPa).

    For cell k seen as anchors1[k] in crop 1 and anchors2[k] in crop 2, with sg = stop-gradient:
      p_k = exp(a1_k . sg(a2_k) / tau),
      l1_k = -log(p_k / (p_k + sum_{m valid, label_m != label_k} exp(a1_k . sg(f_m) / tau))),
    counted where anchor_valid_k and conf2_k > threshold and conf1_k < conf2_k: a view learns
    only from a more confident other view. l2_k swaps the crops. Only the anchor receives
    gradient (positives and negatives are detached, as in CAC).

    Anchors are processed in blocks of `chunk_size` rows and, inside each block, negatives in
    blocks of `chunk_size` with a running (max, sum) log-sum-exp; both loop bodies are under
    jax.checkpoint, so no [N, M] matrix exists in either pass (memory ~ chunk_size^2 floats plus
    per-block carries).

    Args:
      anchors1, anchors2: [N, D] L2-normalised features of the same image locations in crop 1
        and crop 2 (patch head, stride 8).
      anchor_labels: [N] integer label of each location (e.g. the mixed label at that cell).
      conf1, conf2: [N] confidence of each view (max softmax of the student's detached logits).
      anchor_valid: [N] bool; False rows (padding, outside the overlap) never count.
      negatives: [M, D] candidate negative features (other cells of both crops, bank entries).
      negative_labels: [M] integer labels; a negative counts only where it differs from the
        anchor's label.
      negative_valid: [M] bool.
      temperature: tau.
      confidence_threshold: the other view must be more confident than this.
      chunk_size: rows per anchor block and per negative block.

    Returns:
      (loss, num_counted): scalar mean over counted anchor terms of both directions (exactly 0,
      with zero gradient, when none counts) and the int32 number of counted terms.
    """
    if anchors1.ndim != 2 or negatives.ndim != 2 or negatives.shape[1] != anchors1.shape[1]:
        raise ValueError(
            "directional_contrast_loss expects anchors [N, D] and negatives [M, D] with the same "
            f"D, got anchors1 {anchors1.shape} and negatives {negatives.shape}"
        )
    name = "directional_contrast_loss"
    _check_rows(name, anchors1.shape, anchors2=anchors2)
    _check_rows(
        name,
        anchors1.shape[:1],
        anchor_labels=anchor_labels,
        conf1=conf1,
        conf2=conf2,
        anchor_valid=anchor_valid,
    )
    _check_rows(
        name, negatives.shape[:1], negative_labels=negative_labels, negative_valid=negative_valid
    )
    a1 = _at_least_f32(anchors1)
    a2 = _at_least_f32(anchors2)
    negatives = lax.stop_gradient(_at_least_f32(negatives))
    anchor_labels = anchor_labels.astype(jnp.int32)
    negative_labels = negative_labels.astype(jnp.int32)
    anchor_valid = anchor_valid.astype(bool)
    negative_valid = negative_valid.astype(bool)

    count1 = anchor_valid & (conf2 > confidence_threshold) & (conf1 < conf2)
    count2 = anchor_valid & (conf1 > confidence_threshold) & (conf2 < conf1)
    # Both directions share the negatives, so they run as one stacked set of 2N anchor rows.
    anchors = jnp.concatenate([a1, a2])
    positives = lax.stop_gradient(jnp.concatenate([a2, a1]))
    labels = jnp.concatenate([anchor_labels, anchor_labels])
    counted = jnp.concatenate([count1, count2])

    n, m = anchors.shape[0], negatives.shape[0]
    row_chunk = max(1, min(chunk_size, n))
    num_row_chunks = -(-n // row_chunk)
    rows = num_row_chunks * row_chunk
    anchor_blocks = (
        _pad_rows(anchors, rows).reshape(num_row_chunks, row_chunk, -1),
        _pad_rows(positives, rows).reshape(num_row_chunks, row_chunk, -1),
        _pad_rows(labels, rows).reshape(num_row_chunks, row_chunk),
        _pad_rows(counted, rows, False).reshape(num_row_chunks, row_chunk),
    )
    neg_chunk = max(1, min(chunk_size, m))
    num_neg_chunks = -(-m // neg_chunk)
    neg_rows = num_neg_chunks * neg_chunk
    negative_blocks = (
        _pad_rows(negatives, neg_rows).reshape(num_neg_chunks, neg_chunk, -1),
        _pad_rows(negative_labels, neg_rows).reshape(num_neg_chunks, neg_chunk),
        _pad_rows(negative_valid, neg_rows, False).reshape(num_neg_chunks, neg_chunk),
    )

    @jax.checkpoint
    def block_loss(block):
        a, p, y, counted_a = block
        pos = jnp.sum(a * p, axis=-1) / temperature

        @jax.checkpoint
        def accumulate(carry, neg_block):
            run_max, run_sum = carry
            f, y_f, valid_f = neg_block
            s = (a @ f.T) / temperature  # [row_chunk, neg_chunk]
            mask = valid_f[None, :] & (y_f[None, :] != y[:, None])
            # The running shift only stabilises exp and cancels exactly, so it carries no
            # gradient; masked entries reach exp as -inf (exp = 0, derivative 0), never as NaN.
            new_max = lax.stop_gradient(
                jnp.maximum(run_max, jnp.max(jnp.where(mask, s, -jnp.inf), axis=1))
            )
            block_sum = jnp.sum(jnp.exp(jnp.where(mask, s - new_max[:, None], -jnp.inf)), axis=1)
            return (new_max, run_sum * jnp.exp(run_max - new_max) + block_sum), None

        init = (
            jnp.full((row_chunk,), _LOG_ZERO, anchors.dtype),
            jnp.zeros((row_chunk,), anchors.dtype),
        )
        (run_max, run_sum), _ = lax.scan(accumulate, init, negative_blocks)
        nonempty = run_sum > 0
        log_neg = jnp.where(
            nonempty, run_max + jnp.log(jnp.where(nonempty, run_sum, 1.0)), _LOG_ZERO
        )
        per_anchor = jnp.logaddexp(pos, log_neg) - pos
        return (
            jnp.sum(jnp.where(counted_a, per_anchor, 0.0)),
            jnp.sum(counted_a, dtype=jnp.int32),
        )

    sums, counts = lax.map(block_loss, anchor_blocks)
    num_counted = jnp.sum(counts)
    loss = jnp.sum(sums) / jnp.maximum(num_counted, 1).astype(sums.dtype)
    return loss, num_counted
