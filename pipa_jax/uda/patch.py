"""Geometry and bookkeeping of PiPa's patch-wise contrast (docs/method.md §5).

Two equal-size crops of one image (the mixed image x_m by default) are cut so that their box
IoU lies in a range and their offsets are multiples of the feature stride (8, the patch head's
stride, §2.3). Each crop goes through the student separately; the patch-head features of the
same image location in the overlap are the positive pair, every other cell of both crops plus a
FIFO bank of detached features from earlier steps are the negatives (kept by the loss only where
their label differs from the anchor's). The loss itself is
`pipa_jax.losses.directional_contrast_loss`; this module builds its inputs.

Everything here is pure, jittable and shape-static: image, crop and stride sizes are Python
ints (static), boxes are int32 arrays, and variable-size sets (overlap cells, valid bank
entries) are fixed-size arrays with validity masks.

Conventions
- A box is the top-left corner (y, x) of a crop, int32 [2] (one pair for the whole batch) or
  [B, 2] (one pair per image). `sample_crop_pair` draws either (`batch_size=None` / `B`); every
  other function accepts both.
- Cells are row-major: cell (i, j) of an h x w feature map has index i * w + j, and covers the
  pixels [stride * i, stride * (i + 1)) x [stride * j, stride * (j + 1)) of its crop.
- Flips are horizontal (axis 2 of [B, H, W, ...]) and per image. A flipped crop's features are
  flipped back with `unflip` before they reach `patch_contrast_inputs`, which works in the
  unflipped crop frame. Because crop widths are multiples of the stride, flipping a crop maps
  whole cells to whole cells (cell j <-> w - 1 - j), so flipping back is exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pipa_jax.labels import IGNORE_INDEX
from pipa_jax.losses.patch_contrast import directional_contrast_loss

STRIDE = 8
"""Feature stride of the patch head (docs/method.md §2.3)."""
BANK_STEPS = 2
"""The bank holds the features of the last 2 steps (docs/method.md §5)."""
BANK_CELLS_PER_CROP = 1600
"""Random cells of each crop (pooled over the batch) pushed into the bank per step."""
DEFAULT_BANK_SIZE = BANK_STEPS * 2 * BANK_CELLS_PER_CROP
"""6400 = 2 steps x 2 crops x 1600 cells."""

LOSS_INPUT_KEYS = (
    "anchors1",
    "anchors2",
    "anchor_labels",
    "conf1",
    "conf2",
    "anchor_valid",
    "negatives",
    "negative_labels",
    "negative_valid",
)


def _pair(name, value):
    try:
        a, b = value
        return int(a), int(b)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of ints (height, width), got {value!r}") from None


def _check_crop(image_hw, crop_hw, stride):
    """Static checks shared by the sampler and the geometry functions."""
    crop_h, crop_w = _pair("crop_hw", crop_hw)
    if not isinstance(stride, int) or stride <= 0:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if crop_h <= 0 or crop_w <= 0 or crop_h % stride or crop_w % stride:
        raise ValueError(
            f"crop_hw must be positive multiples of the feature stride {stride}, got "
            f"{crop_h}x{crop_w}; choose e.g. {max(stride, crop_h // stride * stride)}x"
            f"{max(stride, crop_w // stride * stride)}"
        )
    if image_hw is not None:
        image_h, image_w = _pair("image_hw", image_hw)
        if crop_h > image_h or crop_w > image_w:
            raise ValueError(
                f"crop_hw {crop_h}x{crop_w} does not fit in the image {image_h}x{image_w}; "
                "use a crop no larger than the image"
            )
    return crop_h, crop_w


# ----------------------------------------------------------------------------- crop pairs


def sample_crop_pair(
    key: jax.Array,
    image_hw: tuple[int, int],
    crop_hw: tuple[int, int],
    *,
    stride: int = STRIDE,
    iou_range: tuple[float, float] = (0.1, 1.0),
    num_candidates: int = 64,
    batch_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Top-left corners (y, x) of two equal-size crops whose box IoU lies in iou_range.

    The first box is uniform over the stride grid of positions that keep the crop inside the
    image. `num_candidates` second boxes are drawn uniformly over the grid positions that
    overlap the first (|dy| < crop_h, |dx| < crop_w, inside the image) and the first one whose
    IoU is in [lo, hi] is taken, so the second box is uniform over the admissible positions. If
    none qualifies (rare with the defaults) the second box is the first (IoU 1; outside the
    range only when hi < 1). The two crops always overlap, even when lo = 0.

    Args:
      key: PRNG key.
      image_hw: static (H, W) of the image the crops are cut from.
      crop_hw: static (h, w) of both crops; multiples of `stride`, at most the image size.
      stride: feature stride; both offsets are multiples of it, so cells of the two crops align.
      iou_range: (lo, hi) with 0 <= lo <= hi <= 1.
      num_candidates: static number of candidate second boxes.
      batch_size: None for one pair shared by the batch (boxes int32 [2]); B for an independent
        pair per image (boxes int32 [B, 2]).

    Returns:
      (box1, box2): int32 [2] or [B, 2].
    """
    crop_h, crop_w = _check_crop(image_hw, crop_hw, stride)
    image_h, image_w = _pair("image_hw", image_hw)
    lo, hi = (float(v) for v in iou_range)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"iou_range must satisfy 0 <= lo <= hi <= 1, got {iou_range!r}")
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    sample = functools.partial(
        _sample_pair,
        image_hw=(image_h, image_w),
        crop_hw=(crop_h, crop_w),
        stride=stride,
        iou_range=(lo, hi),
        num_candidates=num_candidates,
    )
    if batch_size is None:
        return sample(key)
    return jax.vmap(sample)(jax.random.split(key, batch_size))


def _sample_pair(key, *, image_hw, crop_hw, stride, iou_range, num_candidates):
    # Positions are counted in cells (units of stride) until the very end.
    num_positions = jnp.array(
        [(image_hw[0] - crop_hw[0]) // stride + 1, (image_hw[1] - crop_hw[1]) // stride + 1],
        jnp.int32,
    )
    span = jnp.array([crop_hw[0] // stride, crop_hw[1] // stride], jnp.int32)
    key_first, key_second = jax.random.split(key)
    first = jax.random.randint(key_first, (2,), 0, num_positions, dtype=jnp.int32)
    low = jnp.maximum(first - span + 1, 0)
    high = jnp.minimum(first + span - 1, num_positions - 1)
    candidates = jax.random.randint(
        key_second, (num_candidates, 2), low, high + 1, dtype=jnp.int32
    )
    crop = jnp.array(crop_hw, jnp.int32)
    extent = jnp.maximum(crop - jnp.abs(candidates - first) * stride, 0)
    intersection = extent[:, 0] * extent[:, 1]
    union = 2 * crop_hw[0] * crop_hw[1] - intersection
    iou = intersection.astype(jnp.float32) / union.astype(jnp.float32)
    ok = (iou >= iou_range[0]) & (iou <= iou_range[1])
    second = jnp.where(jnp.any(ok), candidates[jnp.argmax(ok)], first)
    return first * stride, second * stride


def crop(x: jax.Array, box: jax.Array, crop_hw: tuple[int, int]) -> jax.Array:
    """x[b, y:y + h, x:x + w, ...] for images [B, H, W, C], labels [B, H, W] or feature maps.

    box: int32 [2] (the same crop for every image) or [B, 2] (one per image). Like
    lax.dynamic_slice, a box that would leave the image is clamped; boxes from
    `sample_crop_pair` never are.
    """
    crop_h, crop_w = _check_crop(None, crop_hw, 1)
    if x.ndim < 3:
        raise ValueError(f"crop expects [B, H, W, ...], got shape {x.shape}")
    if crop_h > x.shape[1] or crop_w > x.shape[2]:
        raise ValueError(f"crop_hw {crop_h}x{crop_w} does not fit in x of shape {x.shape}")
    box = jnp.asarray(box, jnp.int32)
    tail = x.shape[3:]
    zeros = (0,) * len(tail)
    if box.shape == (2,):
        return lax.dynamic_slice(x, (0, box[0], box[1]) + zeros, (x.shape[0], crop_h, crop_w) + tail)
    if box.shape == (x.shape[0], 2):
        return jax.vmap(
            lambda xi, bi: lax.dynamic_slice(xi, (bi[0], bi[1]) + zeros, (crop_h, crop_w) + tail)
        )(x, box)
    raise ValueError(f"box must be [2] or [B, 2] with B = {x.shape[0]}, got shape {box.shape}")


def overlap_correspondence(
    box1: jax.Array, box2: jax.Array, crop_hw: tuple[int, int], stride: int = STRIDE
) -> tuple[jax.Array, jax.Array]:
    """Cell of crop 2 at the image location of each cell of crop 1.

    Both boxes must be offset by multiples of `stride` from each other (as sampled), so cells
    align exactly. Boxes [2] or [B, 2] (broadcast against each other).

    Returns:
      index2: int32 [..., h * w] with h, w = crop_hw // stride: for cell (i, j) of crop 1
        (row-major), the row-major index of the crop-2 cell covering the same pixels; 0 where
        that location lies outside crop 2 (a safe gather index; mask with `valid`).
      valid: bool [..., h * w]: the location lies inside crop 2 (the overlap).
    """
    crop_h, crop_w = _check_crop(None, crop_hw, stride)
    h, w = crop_h // stride, crop_w // stride
    box1 = jnp.asarray(box1, jnp.int32)
    box2 = jnp.asarray(box2, jnp.int32)
    shift = (box1 - box2) // stride  # [..., 2]: crop 1's origin in crop 2's cells
    rows = shift[..., 0, None, None] + jnp.arange(h, dtype=jnp.int32)[:, None]
    cols = shift[..., 1, None, None] + jnp.arange(w, dtype=jnp.int32)[None, :]
    valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    index2 = jnp.where(valid, rows * w + cols, 0)
    batch = index2.shape[:-2]
    return index2.reshape(batch + (h * w,)), valid.reshape(batch + (h * w,))


# ----------------------------------------------------------------------------- flips


def _flip_where(x, flag, axis):
    flag = jnp.asarray(flag, bool)
    if flag.ndim == 1:
        if flag.shape[0] != x.shape[0]:
            raise ValueError(f"flip flags [B] must match the batch of x {x.shape}, got {flag.shape}")
        flag = flag.reshape((-1,) + (1,) * (x.ndim - 1))
    elif flag.ndim != 0:
        raise ValueError(f"flip flag must be a scalar or [B], got shape {flag.shape}")
    return jnp.where(flag, jnp.flip(x, axis=axis), x)


def maybe_flip(
    key: jax.Array, x: jax.Array, axis: int = 2, *, prob: float = 0.5
) -> tuple[jax.Array, jax.Array]:
    """Flip each image of x [B, H, W, ...] along `axis` (2 = horizontal) with probability prob.

    Returns (x with the chosen images flipped, flag bool [B]). Apply the same flag to the
    crop's labels with `unflip(labels, flag)` if they are needed in the flipped frame.
    """
    flag = jax.random.bernoulli(key, prob, (x.shape[0],))
    return _flip_where(x, flag, axis), flag


def unflip(feat: jax.Array, flag: jax.Array, axis: int = 2) -> jax.Array:
    """Undo `maybe_flip` on any [B, H', W', ...] map of the flipped crop (features, logits).

    Flipping is its own inverse; with crop widths a multiple of the stride, a flipped image
    gives a flipped cell grid, so this is exact at every resolution the network produces.
    """
    return _flip_where(feat, flag, axis)


# ----------------------------------------------------------------------------- cell labels


def cell_labels(labels: jax.Array, stride: int = STRIDE) -> jax.Array:
    """Label of each feature cell: labels [B, H, W] -> int32 [B, H / stride, W / stride].

    Nearest downsampling as PyTorch's F.interpolate(mode='nearest') does it: output cell i
    takes input index floor(i * H / (H / stride)) = i * stride, i.e. the cell's top-left pixel
    (docs/method.md §5 allows "majority / nearest"; nearest matches the pixel-contrast labels, §4, and
    never invents a label at class boundaries).
    """
    if labels.ndim != 3:
        raise ValueError(f"cell_labels expects labels [B, H, W], got shape {labels.shape}")
    if labels.shape[1] % stride or labels.shape[2] % stride:
        raise ValueError(
            f"cell_labels needs H and W divisible by the stride {stride}, got {labels.shape[1:]}"
        )
    return labels[:, ::stride, ::stride].astype(jnp.int32)


def _cells_nearest(x, h, w, name):
    """[B, k*h, k*w, C] -> [B, h, w, C] by taking each cell's top-left entry (as cell_labels)."""
    if x.ndim != 4 or x.shape[1] % h or x.shape[2] % w or x.shape[1] // h != x.shape[2] // w:
        raise ValueError(
            f"{name} must be [B, k*{h}, k*{w}, C] (the crop's cell grid or an integer multiple, "
            f"e.g. the decoder's stride-4 logits), got shape {x.shape}"
        )
    k = x.shape[1] // h
    return x[:, ::k, ::k]


# ----------------------------------------------------------------------------- feature bank


def init_bank(size: int = DEFAULT_BANK_SIZE, dim: int = 128) -> dict:
    """An empty FIFO bank: feats f32 [size, dim], labels int32 [size] (255), valid bool [size]."""
    return dict(
        feats=jnp.zeros((size, dim), jnp.float32),
        labels=jnp.full((size,), IGNORE_INDEX, jnp.int32),
        valid=jnp.zeros((size,), bool),
    )


def push_bank(
    bank: dict,
    key: jax.Array,
    feats: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    num: int = BANK_CELLS_PER_CROP,
    *,
    groups: int = 2,
) -> dict:
    """Insert `num` random valid rows of each group at the front of the bank; drop the oldest.

    The rows are split into `groups` equal consecutive groups (default 2: the crop-1 and crop-2
    cells returned by `patch_contrast_inputs`), and from each group `num` distinct valid rows
    are drawn uniformly without replacement. When a group has fewer than `num` valid rows the
    remaining slots are inserted as invalid (label 255), so every push occupies exactly
    groups * num slots and the bank always holds the last size / (groups * num) steps. With
    the defaults (6400 slots, 2 x 1600 per push) that is the last 2 steps. New entries come first
    (group 0, then group 1, ...), older entries shift back (a roll), and whatever passes the
    end is dropped. Features are stored detached, as float32.
    """
    feats, labels, valid = jnp.asarray(feats), jnp.asarray(labels), jnp.asarray(valid)
    size, dim = bank["feats"].shape
    if feats.ndim != 2 or feats.shape[1] != dim:
        raise ValueError(f"push_bank expects feats [N, {dim}] for this bank, got {feats.shape}")
    n = feats.shape[0]
    if labels.shape != (n,) or valid.shape != (n,):
        raise ValueError(
            f"push_bank expects labels and valid of shape ({n},), got {labels.shape} and {valid.shape}"
        )
    if groups < 1 or n % groups:
        raise ValueError(f"push_bank: {n} rows do not split into {groups} equal groups")
    per_group = n // groups
    take = min(num, per_group)
    scores = jax.random.uniform(key, (groups, per_group))
    # Invalid rows score -1, below every valid row, so they are picked only when the valid
    # rows run out, and are then marked invalid.
    scores = jnp.where(valid.reshape(groups, per_group), scores, -1.0)
    _, picked = lax.top_k(scores, take)  # [groups, take]
    rows = (picked + per_group * jnp.arange(groups)[:, None]).reshape(-1)

    def new_entries(values, fill):
        values = values[rows].reshape((groups, take) + values.shape[1:])
        if take < num:
            pad = jnp.full((groups, num - take) + values.shape[2:], fill, values.dtype)
            values = jnp.concatenate([values, pad], axis=1)
        return values.reshape((groups * num,) + values.shape[2:])

    new_valid = new_entries(valid.astype(bool), False)
    new_feats = new_entries(lax.stop_gradient(feats).astype(jnp.float32), 0.0)
    new_labels = jnp.where(new_valid, new_entries(labels.astype(jnp.int32), IGNORE_INDEX), IGNORE_INDEX)
    return dict(
        feats=jnp.concatenate([new_feats, bank["feats"]])[:size],
        labels=jnp.concatenate([new_labels, bank["labels"]])[:size],
        valid=jnp.concatenate([new_valid, bank["valid"]])[:size],
    )


# ----------------------------------------------------------------------------- loss inputs


def patch_contrast_inputs(
    f1: jax.Array,
    f2: jax.Array,
    logits1: jax.Array,
    logits2: jax.Array,
    labels1: jax.Array,
    box1: jax.Array,
    box2: jax.Array,
    crop_hw: tuple[int, int],
    stride: int,
    bank: dict,
    *,
    labels2: jax.Array | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[dict, tuple[jax.Array, jax.Array, jax.Array]]:
    """Anchors, confidences and negatives of the directional patch contrast (docs/method.md §5).

    All maps are in the unflipped frame of their crop (flip features and logits back with
    `unflip` first); h, w = crop_hw // stride.

    Args:
      f1, f2: [B, h, w, D] student patch-head features of crop 1 and crop 2.
      logits1, logits2: [B, k*h, k*w, C] the student's segmentation logits of each crop, on the
        cell grid or an integer multiple of it (e.g. the stride-4 decoder output, k = 2); the
        top-left entry of each cell is used, like `cell_labels`. Detached here.
      labels1: [B, h, w] cell labels of crop 1 (`cell_labels(crop(y_m, box1, crop_hw))`).
      box1, box2: int32 [2] or [B, 2] top-left corners of the crops in the image.
      crop_hw, stride: static crop size and feature stride.
      bank: the FIFO bank (`init_bank`) as it was before this step.
      labels2: [B, h, w] cell labels of crop 2. Pass them (recommended): then every cell of
        crop 2 is a labelled negative. If None, crop-2 cells take labels1 through the
        correspondence and the cells of crop 2 outside the overlap are left out (invalid).
      ignore_index: label of unlabelled cells; such cells are never anchors nor negatives.

    Returns:
      (inputs, push):
      inputs: dict with exactly the keyword arguments of directional_contrast_loss:
        anchors1, anchors2 [N, D] with N = B*h*w (crop-1 cells, batch-major, row-major, and the
        crop-2 cells at the same image location); anchor_labels int32 [N] (labels1);
        conf1, conf2 f32 [N] (max softmax of each crop's own detached logits at that cell);
        anchor_valid bool [N] (inside the overlap and labelled); negatives [M, D] with
        M = 2*N + bank size (all cells of crop 1, all cells of crop 2, then the bank; pooled over
        the batch), negative_labels int32 [M], negative_valid bool [M].
      push: (feats f32 [2N, D] detached, labels int32 [2N], valid bool [2N]) - the crop-1 cells
        then the crop-2 cells, for `push_bank(bank, key, *push)` after this step's loss.
    """
    f1, f2, logits1, logits2, labels1 = map(jnp.asarray, (f1, f2, logits1, logits2, labels1))
    labels2 = None if labels2 is None else jnp.asarray(labels2)
    crop_h, crop_w = _check_crop(None, crop_hw, stride)
    h, w = crop_h // stride, crop_w // stride
    if f1.ndim != 4 or f1.shape[1:3] != (h, w) or f2.shape != f1.shape:
        raise ValueError(
            f"patch_contrast_inputs expects f1 and f2 [B, {h}, {w}, D] (crop {crop_h}x{crop_w} at "
            f"stride {stride}), got {f1.shape} and {f2.shape}"
        )
    b, _, _, dim = f1.shape
    if labels1.shape != (b, h, w) or (labels2 is not None and labels2.shape != (b, h, w)):
        raise ValueError(
            f"patch_contrast_inputs expects cell labels [{b}, {h}, {w}], got labels1 "
            f"{labels1.shape} and labels2 {None if labels2 is None else labels2.shape}"
        )
    if bank["feats"].shape[1] != dim:
        raise ValueError(f"the bank holds {bank['feats'].shape[1]}-d features, f1 has {dim}")
    cells = h * w

    def confidence(logits, name):
        logits = _cells_nearest(logits, h, w, name).reshape(b, cells, -1)
        probs = jax.nn.softmax(lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
        return jnp.max(probs, axis=-1)

    conf1, conf2 = confidence(logits1, "logits1"), confidence(logits2, "logits2")
    index2, in_overlap = overlap_correspondence(box1, box2, crop_hw, stride)
    index2 = jnp.broadcast_to(index2, (b, cells))
    in_overlap = jnp.broadcast_to(in_overlap, (b, cells))

    cells1 = f1.reshape(b, cells, dim)
    cells2 = f2.reshape(b, cells, dim)
    y1 = labels1.reshape(b, cells).astype(jnp.int32)
    if labels2 is None:
        # The correspondence is one-to-one on the overlap; cells outside it scatter out of
        # bounds and are dropped, leaving crop-2 cells outside the overlap unlabelled.
        target = jnp.where(in_overlap, index2, cells)
        y2 = (
            jnp.full((b, cells), ignore_index, jnp.int32)
            .at[jnp.arange(b)[:, None], target]
            .set(y1, mode="drop")
        )
    else:
        y2 = labels2.reshape(b, cells).astype(jnp.int32)

    anchors2 = jnp.take_along_axis(cells2, index2[..., None], axis=1)
    conf2 = jnp.take_along_axis(conf2, index2, axis=1)

    crop_feats = jnp.concatenate([cells1.reshape(-1, dim), cells2.reshape(-1, dim)])
    crop_labels = jnp.concatenate([y1.reshape(-1), y2.reshape(-1)])
    crop_valid = crop_labels != ignore_index
    inputs = dict(
        anchors1=cells1.reshape(-1, dim),
        anchors2=anchors2.reshape(-1, dim),
        anchor_labels=y1.reshape(-1),
        conf1=conf1.reshape(-1),
        conf2=conf2.reshape(-1),
        anchor_valid=(in_overlap & (y1 != ignore_index)).reshape(-1),
        negatives=lax.stop_gradient(
            jnp.concatenate([crop_feats.astype(jnp.float32), bank["feats"]])
        ),
        negative_labels=jnp.concatenate([crop_labels, bank["labels"]]),
        negative_valid=jnp.concatenate([crop_valid, bank["valid"] & (bank["labels"] != ignore_index)]),
    )
    push = (lax.stop_gradient(crop_feats).astype(jnp.float32), crop_labels, crop_valid)
    return inputs, push


def patch_contrast_loss(
    f1: jax.Array,
    f2: jax.Array,
    logits1: jax.Array,
    logits2: jax.Array,
    labels1: jax.Array,
    box1: jax.Array,
    box2: jax.Array,
    crop_hw: tuple[int, int],
    stride: int,
    bank: dict,
    *,
    labels2: jax.Array | None = None,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 0.1,
    confidence_threshold: float = 0.9,
    chunk_size: int = 256,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """L_patch of docs/method.md §5: `patch_contrast_inputs` + `directional_contrast_loss`.

    Returns (loss, num_counted, push); push goes to `push_bank` after the step.
    """
    inputs, push = patch_contrast_inputs(
        f1, f2, logits1, logits2, labels1, box1, box2, crop_hw, stride, bank,
        labels2=labels2, ignore_index=ignore_index,
    )
    loss, num_counted = directional_contrast_loss(
        **inputs,
        temperature=temperature,
        confidence_threshold=confidence_threshold,
        chunk_size=chunk_size,
    )
    return loss, num_counted, push
