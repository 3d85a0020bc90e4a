"""Pixel-wise supervised contrast on source embeddings (docs/method.md §4).

Two parts: `sample_pixel_anchors` picks a fixed-size, masked set of anchor pixels per
(image, class) pair, half "hard" and half "easy" (ContrastiveSeg's sampler, which PiPa uses), and
`pixel_contrast_loss` is the supervised contrastive loss over those anchors, computed in row
blocks so memory grows linearly with the number of anchors.
"""

import jax
import jax.numpy as jnp
from jax import lax

from pipa_jax.labels import IGNORE_INDEX, NUM_CLASSES
from pipa_jax.losses.cross_entropy import _at_least_f32, _check_rows

# Finite stand-in for log(0): keeps logaddexp and its gradient free of inf - inf.
_LOG_ZERO = -1e30


def sample_pixel_anchors(
    key: jax.Array,
    labels: jax.Array,
    hard: jax.Array,
    *,
    num_classes: int = NUM_CLASSES,
    max_samples: int = 1024,
    max_views: int = 100,
    min_pixels: int = 100,
    include_ignore_class: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Samples anchor pixels per (image, class), half hard and half easy, with static shapes.

    A pair (image b, class c) takes part when it has more than `min_pixels` pixels. With n_pairs
    such pairs, every pair contributes n_view = min(max_samples // n_pairs, max_views) pixels,
    n_view // 2 hard and the rest easy, topped up from the other group when one is short
    (ContrastiveSeg's rule), drawn uniformly without replacement within each group. Pairs are
    ordered image-major, class ascending; output slot s belongs to pair s // n_view and slots
    from n_pairs * n_view on are invalid.

    Args:
      key: PRNG key.
      labels: [B, h, w] integer class ids at the embedding resolution; IGNORE_INDEX (255) and any
        other id outside [0, num_classes) never form a pair (except 255, see below).
      hard: [B, h, w] bool, True where the pixel is "hard" (the student's prediction differs from
        the label); False is "easy".
      num_classes: number of real classes.
      max_samples: static number of output slots (the anchor budget).
      max_views: upper bound on pixels per pair.
      min_pixels: a pair needs strictly more pixels than this.
      include_ignore_class: True reproduces the official PiPa quirk of treating 255 as one more
        class (returned with label 255); False (default, paper intent) drops ignored pixels.

    Returns:
      flat_indices: int32 [max_samples], indices into the flattened [B * h * w] pixel array
        (0 in invalid slots).
      anchor_labels: int32 [max_samples], the pair's class (-1 in invalid slots).
      valid: bool [max_samples].
    """
    if labels.ndim != 3:
        raise ValueError(f"sample_pixel_anchors expects labels [B, h, w], got shape {labels.shape}")
    _check_rows("sample_pixel_anchors", labels.shape, hard=hard)
    num_images = labels.shape[0]
    num_pixels = labels.size
    labels = labels.reshape(-1).astype(jnp.int32)
    is_easy = jnp.logical_not(hard.reshape(-1).astype(bool))

    # Class slot `num_classes` stands for 255 so the official quirk fits the same code path; it
    # sorts last, as 255 does in the official torch.unique order.
    classes_per_image = num_classes + 1
    in_range = (labels >= 0) & (labels < num_classes)
    usable = in_range | ((labels == IGNORE_INDEX) & include_ignore_class)
    class_slot = jnp.where(in_range, labels, num_classes)
    image = jnp.arange(num_pixels, dtype=jnp.int32) // (num_pixels // num_images)
    num_pairs_max = num_images * classes_per_image
    pair = image * classes_per_image + class_slot
    # Group = (pair, easy flag); unusable pixels go to a trailing sentinel group.
    num_groups = 2 * num_pairs_max
    group = jnp.where(usable, 2 * pair + is_easy, num_groups)

    group_count = jnp.bincount(group, length=num_groups + 1)[:num_groups].astype(jnp.int32)
    group_start = jnp.cumsum(group_count) - group_count
    # One sort by (group, random rank) lays each group out contiguously in uniformly random order,
    # so "first k of a group" is a uniform draw of k without replacement. A permutation gives
    # distinct ranks, hence no tie bias.
    rank = jax.random.permutation(key, num_pixels).astype(jnp.int32)
    _, _, order = lax.sort(
        (group, rank, jnp.arange(num_pixels, dtype=jnp.int32)), num_keys=2, is_stable=False
    )

    num_hard = group_count[0::2]
    num_easy = group_count[1::2]
    eligible = (num_hard + num_easy) > min_pixels
    num_pairs = jnp.sum(eligible, dtype=jnp.int32)
    n_view = jnp.where(
        num_pairs > 0, jnp.minimum(max_samples // jnp.maximum(num_pairs, 1), max_views), 0
    )

    # ContrastiveSeg's split; `2 * k >= n_view` is its `k >= n_view / 2` in exact integers.
    hard_ok = 2 * num_hard >= n_view
    easy_ok = 2 * num_easy >= n_view
    hard_keep = jnp.where(
        hard_ok & easy_ok, n_view // 2, jnp.where(hard_ok, n_view - num_easy, num_hard)
    )
    # Clipping only matters when a pair has fewer than n_view pixels (possible only with
    # min_pixels < max_views); the official code raises there, we leave the slots invalid.
    hard_keep = jnp.clip(hard_keep, 0, num_hard)
    easy_keep = jnp.clip(n_view - hard_keep, 0, num_easy)

    pair_of_rank = jnp.nonzero(eligible, size=num_pairs_max, fill_value=0)[0]
    slot = jnp.arange(max_samples, dtype=jnp.int32)
    views = jnp.maximum(n_view, 1)
    rank_of_slot, view = slot // views, slot % views
    p = pair_of_rank[jnp.minimum(rank_of_slot, num_pairs_max - 1)]
    hk, ek = hard_keep[p], easy_keep[p]
    position = jnp.where(view < hk, group_start[2 * p] + view, group_start[2 * p + 1] + (view - hk))
    valid = (n_view > 0) & (rank_of_slot < num_pairs) & (view < hk + ek)
    flat_indices = jnp.where(valid, order[jnp.clip(position, 0, num_pixels - 1)], 0)
    pair_class = p % classes_per_image
    anchor_labels = jnp.where(pair_class == num_classes, IGNORE_INDEX, pair_class)
    anchor_labels = jnp.where(valid, anchor_labels, -1).astype(jnp.int32)
    return flat_indices.astype(jnp.int32), anchor_labels, valid


def masked_logsumexp(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """log(sum_j mask_ij exp(scores_ij)) over the last axis; a finite -1e30 for empty rows.

    The shift is stop-gradient (it cancels exactly) and masked entries never reach exp as
    +-inf, so gradients stay finite even for rows with nothing in the mask.
    """
    shift = lax.stop_gradient(jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    total = jnp.sum(jnp.exp(jnp.where(mask, scores - shift[..., None], -jnp.inf)), axis=-1)
    nonempty = total > 0
    return jnp.where(nonempty, shift + jnp.log(jnp.where(nonempty, total, 1.0)), _LOG_ZERO)


def _pad_rows(x: jax.Array, rows: int, value=0) -> jax.Array:
    pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad, constant_values=value)


def pixel_contrast_loss(
    features: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    *,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
    chunk_size: int = 256,
) -> jax.Array:
    """Supervised contrastive loss in ContrastiveSeg's form over pooled anchors.

    With s_ij = z_i . z_j / temperature:
      log_prob_ij = s_ij - log(exp(s_ij) + sum_{k valid, y_k != y_i} exp(s_ik)),
      l_i = -(temperature / base_temperature) * mean_{j valid, j != i, y_j == y_i} log_prob_ij,
      L = mean of l_i over valid anchors with at least one positive (0 if there are none).
    Unlike SupCon, the denominator holds only the positive itself plus the negatives (the
    ContrastiveSeg/PiPa choice). Anchors without positives are skipped rather than giving NaN.

    Anchors are processed in blocks of `chunk_size` rows, each block forming its
    [chunk_size, N] similarity rows under jax.checkpoint, so neither pass holds the N x N matrix.

    Args:
      features: [N, D] L2-normalised embeddings (any float dtype; math in >= float32).
      labels: [N] integer class of each embedding.
      valid: [N] bool; invalid rows are neither anchors, positives nor negatives.
      temperature: tau.
      base_temperature: loss scale tau / base_tau (ContrastiveSeg's convention).
      chunk_size: anchor rows per block (memory ~ chunk_size * N floats).

    Returns:
      Scalar loss.
    """
    if features.ndim != 2:
        raise ValueError(f"pixel_contrast_loss expects features [N, D], got {features.shape}")
    _check_rows("pixel_contrast_loss", features.shape[:1], labels=labels, valid=valid)
    z = _at_least_f32(features)
    labels = labels.astype(jnp.int32)
    valid = valid.astype(bool)
    n = z.shape[0]
    chunk = max(1, min(chunk_size, n))
    num_chunks = -(-n // chunk)
    rows = num_chunks * chunk
    column = jnp.arange(n, dtype=jnp.int32)
    blocks = (
        _pad_rows(z, rows).reshape(num_chunks, chunk, -1),
        _pad_rows(labels, rows).reshape(num_chunks, chunk),
        _pad_rows(valid, rows, False).reshape(num_chunks, chunk),
        jnp.arange(rows, dtype=jnp.int32).reshape(num_chunks, chunk),
    )

    @jax.checkpoint
    def block_loss(block):
        z_a, y_a, valid_a, index_a = block
        s = (z_a @ z.T) / temperature  # [chunk, N]
        same = y_a[:, None] == labels[None, :]
        positive = valid[None, :] & same & (index_a[:, None] != column[None, :])
        negative = valid[None, :] & jnp.logical_not(same)
        log_neg = masked_logsumexp(s, negative)
        log_prob = s - jnp.logaddexp(s, log_neg[:, None])
        num_pos = jnp.sum(positive, axis=1)
        mean_log_prob = jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1) / jnp.maximum(
            num_pos, 1
        )
        per_anchor = -(temperature / base_temperature) * mean_log_prob
        counted = valid_a & (num_pos > 0)
        return jnp.sum(jnp.where(counted, per_anchor, 0.0)), jnp.sum(counted, dtype=jnp.int32)

    sums, counts = lax.map(block_loss, blocks)
    return jnp.sum(sums) / jnp.maximum(jnp.sum(counts), 1).astype(sums.dtype)


def pixel_contrast_from_maps(
    key: jax.Array,
    embeddings: jax.Array,
    labels: jax.Array,
    hard: jax.Array,
    *,
    num_classes: int = NUM_CLASSES,
    max_samples: int = 1024,
    max_views: int = 100,
    min_pixels: int = 100,
    include_ignore_class: bool = False,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
    chunk_size: int = 256,
) -> jax.Array:
    """Samples anchors from embedding maps and returns the pixel contrast loss.

    Args:
      key: PRNG key for the anchor draw.
      embeddings: [B, h, w, D] L2-normalised pixel-head embeddings (stride 4 in PiPa).
      labels: [B, h, w] labels at the same resolution (nearest-downsampled source labels).
      hard: [B, h, w] bool, prediction != label (stop-gradient; only used for sampling).
      Other arguments: see `sample_pixel_anchors` and `pixel_contrast_loss`.

    Returns:
      Scalar loss; samples of all images in the batch are pooled.
    """
    if embeddings.ndim != 4 or embeddings.shape[:-1] != labels.shape:
        raise ValueError(
            f"pixel_contrast_from_maps expects embeddings [B, h, w, D] and labels [B, h, w] at the "
            f"same resolution, got {embeddings.shape} and {labels.shape}"
        )
    flat_indices, anchor_labels, valid = sample_pixel_anchors(
        key,
        labels,
        hard,
        num_classes=num_classes,
        max_samples=max_samples,
        max_views=max_views,
        min_pixels=min_pixels,
        include_ignore_class=include_ignore_class,
    )
    # Indexing the map by (image, row, column) rather than its flattened [B*h*w, D] view gives the
    # same rows; under spatial partitioning (rows split over devices) XLA then gathers only the
    # sampled pixels (a masked local gather and a small all-reduce), where the flattened view
    # would all-gather the whole map first.
    features = embeddings[jnp.unravel_index(flat_indices, labels.shape)]
    return pixel_contrast_loss(
        features,
        anchor_labels,
        valid,
        temperature=temperature,
        base_temperature=base_temperature,
        chunk_size=chunk_size,
    )
