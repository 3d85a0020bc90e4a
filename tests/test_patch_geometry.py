"""Crop geometry, cell correspondence, flips, cell labels and the FIFO bank of PiPa's patch
contrast (docs/method.md §5), against NumPy references.

The end-to-end tests cut crops from a synthetic image whose pixels carry the code
(batch index, global cell row, global cell column) of the stride-8 cell they lie in, plus
logits that are constant on stride-4 blocks. A toy "network" reads each crop cell's code, so a
feature names the image location it came from and every pairing can be checked exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipa_jax.labels import IGNORE_INDEX
from pipa_jax.uda import patch

S = patch.STRIDE
IMAGE_HW = (64, 96)
CROP_HW = (32, 48)
H_CELLS, W_CELLS = CROP_HW[0] // S, CROP_HW[1] // S
B = 3
NUM_CLASSES = 5
BANK_SIZE = 10


def _iou_np(box1, box2, crop_hw):
    dy = np.abs(box1[..., 0] - box2[..., 0])
    dx = np.abs(box1[..., 1] - box2[..., 1])
    inter = np.maximum(crop_hw[0] - dy, 0) * np.maximum(crop_hw[1] - dx, 0)
    return inter / (2.0 * crop_hw[0] * crop_hw[1] - inter)


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "image_hw, crop_hw, iou_range",
    [((64, 96), (32, 48), (0.1, 1.0)), ((128, 128), (64, 64), (0.4, 0.6)), ((40, 40), (32, 24), (0.1, 1.0))],
)
def test_sampled_pairs_are_on_grid_inside_and_in_iou_range(image_hw, crop_hw, iou_range):
    sample = jax.jit(
        jax.vmap(lambda k: patch.sample_crop_pair(k, image_hw, crop_hw, iou_range=iou_range))
    )
    box1, box2 = map(np.asarray, sample(jax.random.split(jax.random.key(0), 2000)))
    assert box1.shape == box2.shape == (2000, 2) and box1.dtype == box2.dtype == np.int32
    for box in (box1, box2):
        assert np.all(box % S == 0)
        assert np.all(box >= 0)
        assert np.all(box[:, 0] + crop_hw[0] <= image_hw[0])
        assert np.all(box[:, 1] + crop_hw[1] <= image_hw[1])
    iou = _iou_np(box1, box2, crop_hw)
    moved = np.any(box1 != box2, axis=1)  # box2 = box1 is the fallback when hi < 1
    assert np.all(iou[moved] >= iou_range[0] - 1e-6) and np.all(iou[moved] <= iou_range[1] + 1e-6)
    # The first box covers the whole grid; given it, the second is uniform over the admissible
    # grid positions (so box2 == box1 only as often as 1 / #admissible, not via the fallback).
    grid = np.stack(
        np.meshgrid(
            np.arange(0, image_hw[0] - crop_hw[0] + 1, S),
            np.arange(0, image_hw[1] - crop_hw[1] + 1, S),
            indexing="ij",
        ),
        -1,
    ).reshape(-1, 2)
    assert {tuple(b) for b in box1} == {tuple(g) for g in grid}
    admissible = {}
    for g in grid:
        ious = _iou_np(g[None], grid, crop_hw)
        admissible[tuple(g)] = {tuple(p) for p in grid[(ious >= iou_range[0]) & (ious <= iou_range[1])]}
    stay = np.mean([(tuple(b) in admissible[tuple(b)]) / len(admissible[tuple(b)]) for b in box1])
    assert abs(np.mean(~moved) - stay) < 0.03
    assert iou.min() < iou_range[0] + 0.1 and np.quantile(iou, 0.5) < 0.9
    if len(grid) <= 8:  # enough draws per first box for a frequency check
        for g in map(tuple, grid):
            seconds = [tuple(b2) for b1, b2 in zip(box1, box2) if tuple(b1) == g]
            assert set(seconds) == admissible[g]
            counts = np.array([seconds.count(p) for p in admissible[g]])
            assert np.all(np.abs(counts - counts.mean()) < 0.4 * counts.mean())


def test_sampled_pairs_per_image_and_full_size_crop():
    # Per image; and a crop as large as the image has one position: both boxes the origin.
    (b1, b2), (c1, c2) = jax.jit(
        lambda k: (
            patch.sample_crop_pair(k, (128, 128), (64, 64), batch_size=6),
            patch.sample_crop_pair(k, (64, 64), (64, 64)),
        )
    )(jax.random.key(2))
    assert b1.shape == b2.shape == (6, 2)
    assert len({tuple(b) for b in np.asarray(b1)}) > 1  # independent pairs per image
    assert np.all(_iou_np(np.asarray(b1), np.asarray(b2), (64, 64)) >= 0.1 - 1e-6)
    np.testing.assert_array_equal(c1, [0, 0])
    np.testing.assert_array_equal(c2, [0, 0])


@pytest.mark.parametrize(
    "image_hw, crop_hw, iou_range, match",
    [
        ((64, 64), (30, 32), (0.1, 1.0), "multiples of the feature stride 8, got 30x32"),
        ((64, 64), (72, 32), (0.1, 1.0), "72x32 does not fit in the image 64x64"),
        ((64, 64), (32, 32), (0.5, 0.2), "iou_range"),
        ((64, 64), (32, 32), (0.1, 1.5), "iou_range"),
    ],
)
def test_sample_crop_pair_rejects_bad_arguments(image_hw, crop_hw, iou_range, match):
    with pytest.raises(ValueError, match=match):
        patch.sample_crop_pair(jax.random.key(0), image_hw, crop_hw, iou_range=iou_range)


# ----------------------------------------------------------------------------- crop / flip / labels


def test_crop_matches_numpy_slicing():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, 40, 56, 2)).astype(np.float32)
    labels = rng.integers(0, 256, (3, 40, 56)).astype(np.uint8)
    crop = jax.jit(patch.crop, static_argnums=2)
    shared = np.array([8, 16], np.int32)
    per_image = np.array([[0, 0], [16, 8], [24, 40]], np.int32)
    for x in (images, labels):
        out = np.asarray(crop(x, shared, (16, 16)))
        np.testing.assert_array_equal(out, x[:, 8:24, 16:32])
        out = np.asarray(crop(x, per_image, (16, 16)))
        assert out.dtype == x.dtype
        for b, (y0, x0) in enumerate(per_image):
            np.testing.assert_array_equal(out[b], x[b, y0 : y0 + 16, x0 : x0 + 16])
    with pytest.raises(ValueError, match="box must be"):
        patch.crop(images, np.zeros((2, 2), np.int32), (16, 16))


def test_cell_labels_are_pytorch_nearest():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 20, (2, 24, 40)).astype(np.uint8)
    out = np.asarray(jax.jit(patch.cell_labels)(labels))
    assert out.shape == (2, 3, 5) and out.dtype == np.int32
    # F.interpolate(mode='nearest'): source index floor(dst * in / out).
    rows = np.floor(np.arange(3) * (24 / 3)).astype(int)
    cols = np.floor(np.arange(5) * (40 / 5)).astype(int)
    np.testing.assert_array_equal(out, labels[:, rows][:, :, cols])
    with pytest.raises(ValueError, match="divisible by the stride 8"):
        patch.cell_labels(labels[:, :20])


def test_maybe_flip_and_unflip():
    x = np.arange(64 * 4 * 6 * 2, dtype=np.float32).reshape(64, 4, 6, 2)
    flipped, flag = jax.jit(patch.maybe_flip)(jax.random.key(0), x)
    flipped, flag = np.asarray(flipped), np.asarray(flag)
    assert flag.shape == (64,) and 10 < flag.sum() < 54
    np.testing.assert_array_equal(flipped[flag], x[flag][:, :, ::-1])
    np.testing.assert_array_equal(flipped[~flag], x[~flag])
    np.testing.assert_array_equal(patch.unflip(flipped, flag), x)


def test_overlap_correspondence_against_brute_force():
    rng = np.random.default_rng(2)
    crop_hw = (24, 40)
    h, w = 3, 5
    corr = jax.jit(patch.overlap_correspondence, static_argnums=(2, 3))
    for _ in range(20):
        box1, box2 = (rng.integers(0, 6, 2) * S).astype(np.int32), (rng.integers(0, 6, 2) * S).astype(np.int32)
        index2, valid = map(np.asarray, corr(box1, box2, crop_hw, S))
        assert index2.shape == valid.shape == (h * w,)
        # Pixel (top-left of each cell) positions in the image, matched by brute force.
        cells2 = {(box2[0] + S * i, box2[1] + S * j): i * w + j for i in range(h) for j in range(w)}
        for i in range(h):
            for j in range(w):
                where = (box1[0] + S * i, box1[1] + S * j)
                assert valid[i * w + j] == (where in cells2)
                if where in cells2:
                    assert index2[i * w + j] == cells2[where]
                else:
                    assert index2[i * w + j] == 0
    # Batched boxes broadcast.
    index2, valid = corr(np.zeros((4, 2), np.int32), np.array([0, 8], np.int32), crop_hw, S)
    assert index2.shape == valid.shape == (4, h * w) and np.asarray(valid).sum() == 4 * h * (w - 1)


# ----------------------------------------------------------------------------- end to end


def _scene(seed=0):
    """Image [B, H, W, 3 + C]: channels (b, cell row, cell col) then stride-4-constant logits."""
    rng = np.random.default_rng(seed)
    height, width = IMAGE_HW
    yy, xx = np.meshgrid(np.arange(height) // S, np.arange(width) // S, indexing="ij")
    code = np.stack(
        [np.broadcast_to(b, (height, width)) for b in range(B)], axis=0
    ).astype(np.float32)
    code = np.stack([code, np.broadcast_to(yy, code.shape), np.broadcast_to(xx, code.shape)], -1)
    logits4 = (3.0 * rng.standard_normal((B, height // 4, width // 4, NUM_CLASSES))).astype(np.float32)
    logits_px = logits4.repeat(4, axis=1).repeat(4, axis=2)
    image = np.concatenate([code, logits_px], axis=-1).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (B, height, width))
    labels[rng.random(labels.shape) < 0.2] = IGNORE_INDEX
    bank = dict(
        feats=rng.standard_normal((BANK_SIZE, 3)).astype(np.float32),
        labels=rng.integers(0, NUM_CLASSES + 1, BANK_SIZE).astype(np.int32),
        valid=rng.random(BANK_SIZE) < 0.6,
    )
    bank["labels"][bank["labels"] == NUM_CLASSES] = IGNORE_INDEX
    return image, labels.astype(np.uint8), logits4, bank


TRACES = {}


def _toy_net(x):
    """Features: the cell code at stride 8; logits: the stride-4 logits (image is block-constant,
    so top-left subsampling commutes with flips, like a real network's equivariance would)."""
    return x[:, ::S, ::S, :3], x[:, ::4, ::4, 3:]


def _pipeline(key, image, labels, bank, *, per_image, pass_labels2):
    TRACES[(per_image, pass_labels2)] = TRACES.get((per_image, pass_labels2), 0) + 1
    k_box, k_flip1, k_flip2 = jax.random.split(key, 3)
    box1, box2 = patch.sample_crop_pair(
        k_box, IMAGE_HW, CROP_HW, batch_size=B if per_image else None
    )
    x1, flip1 = patch.maybe_flip(k_flip1, patch.crop(image, box1, CROP_HW))
    x2, flip2 = patch.maybe_flip(k_flip2, patch.crop(image, box2, CROP_HW))
    f1, logits1 = (patch.unflip(t, flip1) for t in _toy_net(x1))
    f2, logits2 = (patch.unflip(t, flip2) for t in _toy_net(x2))
    labels1 = patch.cell_labels(patch.crop(labels, box1, CROP_HW))
    labels2 = patch.cell_labels(patch.crop(labels, box2, CROP_HW)) if pass_labels2 else None
    inputs, push = patch.patch_contrast_inputs(
        f1, f2, logits1, logits2, labels1, box1, box2, CROP_HW, S, bank, labels2=labels2
    )
    index2, in_overlap = patch.overlap_correspondence(box1, box2, CROP_HW, S)
    return dict(inputs, box1=box1, box2=box2, flip1=flip1, flip2=flip2, push=push,
                index2=index2, in_overlap=in_overlap)


_PIPELINE = jax.jit(_pipeline, static_argnames=("per_image", "pass_labels2"))


def _max_softmax(z):
    z = z.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).max(-1)


@pytest.mark.parametrize("per_image, pass_labels2", [(False, False), (True, True)])
def test_patch_inputs_pair_the_same_image_location(per_image, pass_labels2):
    image, labels, logits4, bank = _scene()
    conf_ref = _max_softmax(logits4)
    n = B * H_CELLS * W_CELLS
    seen = dict(flips=set(), valid=0, invalid_outside=0, invalid_ignored=0)
    for seed in range(6):
        r = jax.tree.map(np.asarray, _PIPELINE(
            jax.random.key(seed), image, labels, bank, per_image=per_image, pass_labels2=pass_labels2
        ))
        assert r["anchors1"].shape == r["anchors2"].shape == (n, 3)
        assert r["negatives"].shape == (2 * n + BANK_SIZE, 3)
        for name in ("anchor_labels", "conf1", "conf2", "anchor_valid"):
            assert r[name].shape == (n,), name
        for name in ("negative_labels", "negative_valid"):
            assert r[name].shape == (2 * n + BANK_SIZE,), name
        assert r["conf1"].dtype == np.float32 and r["anchor_labels"].dtype == np.int32
        assert set(r).issuperset(patch.LOSS_INPUT_KEYS)

        box1 = np.broadcast_to(r["box1"], (B, 2)) // S
        box2 = np.broadcast_to(r["box2"], (B, 2)) // S
        in_overlap = np.broadcast_to(r["in_overlap"], (B, H_CELLS * W_CELLS)).reshape(-1)
        seen["flips"].update(zip(r["flip1"].tolist(), r["flip2"].tolist()))
        # Expected values, cell by cell in plain Python (k = crop-1 cell, batch-major, row-major).
        code1, code2, inside2, label1, label2, conf1 = [], [], [], [], [], []
        for b in range(B):
            for i in range(H_CELLS):
                for j in range(W_CELLS):
                    gy, gx = box1[b, 0] + i, box1[b, 1] + j  # image cell of crop-1 cell (i, j)
                    code1.append((b, gy, gx))
                    inside2.append(
                        box2[b, 0] <= gy < box2[b, 0] + H_CELLS and box2[b, 1] <= gx < box2[b, 1] + W_CELLS
                    )
                    label1.append(labels[b, gy * S, gx * S])
                    conf1.append(conf_ref[b, 2 * gy, 2 * gx])
                    g2y, g2x = box2[b, 0] + i, box2[b, 1] + j  # image cell of crop-2 cell (i, j)
                    code2.append((b, g2y, g2x))
                    inside1 = box1[b, 0] <= g2y < box1[b, 0] + H_CELLS and box1[b, 1] <= g2x < box1[b, 1] + W_CELLS
                    label2.append(labels[b, g2y * S, g2x * S] if pass_labels2 or inside1 else IGNORE_INDEX)
        inside2, label1 = np.array(inside2), np.array(label1)
        valid = inside2 & (label1 != IGNORE_INDEX)
        np.testing.assert_array_equal(r["anchors1"], code1)
        np.testing.assert_array_equal(in_overlap, inside2)
        np.testing.assert_array_equal(r["anchors2"][inside2], r["anchors1"][inside2])
        np.testing.assert_array_equal(r["anchor_labels"], label1)
        np.testing.assert_array_equal(r["anchor_valid"], valid)
        np.testing.assert_allclose(r["conf1"], conf1, rtol=1e-5)
        np.testing.assert_allclose(r["conf2"][inside2], r["conf1"][inside2], rtol=1e-6)
        np.testing.assert_array_equal(r["negatives"][n : 2 * n], code2)
        np.testing.assert_array_equal(r["negative_labels"][n : 2 * n], label2)
        seen["valid"] += valid.sum()
        seen["invalid_outside"] += (~inside2).sum()
        seen["invalid_ignored"] += (inside2 & ~valid).sum()
        # Crop-1 negatives are the anchors; validity follows the labels; the bank comes last.
        np.testing.assert_array_equal(r["negatives"][:n], r["anchors1"])
        np.testing.assert_array_equal(r["negative_labels"][:n], r["anchor_labels"])
        np.testing.assert_array_equal(
            r["negative_valid"][: 2 * n], r["negative_labels"][: 2 * n] != IGNORE_INDEX
        )
        np.testing.assert_array_equal(r["negatives"][2 * n :], bank["feats"])
        np.testing.assert_array_equal(r["negative_labels"][2 * n :], bank["labels"])
        np.testing.assert_array_equal(
            r["negative_valid"][2 * n :], bank["valid"] & (bank["labels"] != IGNORE_INDEX)
        )
        push_feats, push_labels, push_valid = r["push"]
        np.testing.assert_array_equal(push_feats, r["negatives"][: 2 * n])
        np.testing.assert_array_equal(push_labels, r["negative_labels"][: 2 * n])
        np.testing.assert_array_equal(push_valid, r["negative_valid"][: 2 * n])
    # The checks above were exercised in every regime, flips of each crop included.
    assert seen["flips"] == {(False, False), (False, True), (True, False), (True, True)}
    assert seen["valid"] > 0 and seen["invalid_outside"] > 0 and seen["invalid_ignored"] > 0
    assert TRACES[(per_image, pass_labels2)] == 1  # one compilation for all keys


def test_pairs_differ_between_keys():
    image, labels, _, bank = _scene()
    boxes = {
        tuple(np.asarray(_PIPELINE(jax.random.key(s), image, labels, bank, per_image=False,
                                   pass_labels2=False)["box2"]))
        for s in range(8)
    }
    assert len(boxes) > 2


def _directional_loss_np(f1, f2, labels, conf1, conf2, valid, negs, neg_labels, neg_valid):
    """Naive float64 docs/method.md §5 loss on flattened cells (l1 for crop 1, l2 for crop 2)."""
    total, count = 0.0, 0
    for a, p, ca, cp in ((f1, f2, conf1, conf2), (f2, f1, conf2, conf1)):
        for k in range(len(a)):
            if not (valid[k] and cp[k] > 0.9 and ca[k] < cp[k]):
                continue
            pos = np.exp(a[k] @ p[k] / 0.1)
            keep = neg_valid & (neg_labels != labels[k])
            total += -np.log(pos / (pos + np.sum(np.exp(negs[keep] @ a[k] / 0.1))))
            count += 1
    return total / max(count, 1), count


def test_patch_contrast_loss_against_numpy():
    _, labels, _, _ = _scene(1)
    rng = np.random.default_rng(3)
    dim = 8
    f1 = rng.standard_normal((B, H_CELLS, W_CELLS, dim))
    f1 = (f1 / np.linalg.norm(f1, axis=-1, keepdims=True)).astype(np.float32)
    f2 = f1 + 0.5 * rng.standard_normal(f1.shape)
    f2 = (f2 / np.linalg.norm(f2, axis=-1, keepdims=True)).astype(np.float32)
    logits1 = (4.0 * rng.standard_normal((B, 2 * H_CELLS, 2 * W_CELLS, NUM_CLASSES))).astype(np.float32)
    logits2 = (4.0 * rng.standard_normal(logits1.shape)).astype(np.float32)
    box1, box2 = np.array([8, 16], np.int32), np.array([16, 32], np.int32)
    labels1 = labels[:, 8 : 8 + CROP_HW[0] : S, 16 : 16 + CROP_HW[1] : S].astype(np.int32)
    labels2 = labels[:, 16 : 16 + CROP_HW[0] : S, 32 : 32 + CROP_HW[1] : S].astype(np.int32)
    bank_feats = rng.standard_normal((BANK_SIZE, dim)).astype(np.float32)
    bank_feats /= np.linalg.norm(bank_feats, axis=-1, keepdims=True)
    bank_labels = (np.arange(BANK_SIZE) % NUM_CLASSES).astype(np.int32)
    bank_valid = np.arange(BANK_SIZE) % 3 != 0

    def loss_fn(f1, f2, bank_feats):
        bank = dict(feats=bank_feats, labels=bank_labels, valid=bank_valid)
        loss, count, _ = patch.patch_contrast_loss(
            f1, f2, logits1, logits2, labels1, box1, box2, CROP_HW, S, bank, labels2=labels2
        )
        return loss, count

    (loss, count), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True))(
        f1, f2, bank_feats
    )
    # Reference: overlap by hand (crop 2 is 1 cell down, 2 cells right of crop 1).
    a1, a2, lab, c1, c2, ok = [], [], [], [], [], []
    conf1, conf2 = _max_softmax(logits1[:, ::2, ::2]), _max_softmax(logits2[:, ::2, ::2])
    for b in range(B):
        for i in range(H_CELLS):
            for j in range(W_CELLS):
                i2, j2 = i - 1, j - 2
                inside = 0 <= i2 < H_CELLS and 0 <= j2 < W_CELLS
                i2, j2 = (i2, j2) if inside else (0, 0)
                a1.append(f1[b, i, j]); a2.append(f2[b, i2, j2]); lab.append(labels1[b, i, j])
                c1.append(conf1[b, i, j]); c2.append(conf2[b, i2, j2])
                ok.append(inside and labels1[b, i, j] != IGNORE_INDEX)
    negs = np.concatenate([f1.reshape(-1, dim), f2.reshape(-1, dim), bank_feats]).astype(np.float64)
    neg_labels = np.concatenate([labels1.ravel(), labels2.ravel(), bank_labels])
    neg_valid = np.concatenate([labels1.ravel() != IGNORE_INDEX, labels2.ravel() != IGNORE_INDEX, bank_valid])
    ref_loss, ref_count = _directional_loss_np(
        np.array(a1, np.float64), np.array(a2, np.float64), np.array(lab), np.array(c1),
        np.array(c2), np.array(ok), negs, neg_labels, neg_valid,
    )
    assert int(count) == ref_count > 5
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert np.abs(grads[0]).sum() > 0 and np.abs(grads[1]).sum() > 0
    np.testing.assert_array_equal(grads[2], 0.0)  # the bank is detached


# ----------------------------------------------------------------------------- bank


def test_bank_fifo_order_capacity_and_validity():
    num, groups, dim = 2, 2, 3
    size = 3 * groups * num  # three steps
    rows = 10  # 5 per group
    bank = patch.init_bank(size, dim)
    assert bank["feats"].shape == (size, dim) and bank["feats"].dtype == jnp.float32
    assert bank["labels"].dtype == jnp.int32 and not np.asarray(bank["valid"]).any()
    assert patch.init_bank(dim=dim)["feats"].shape == (6400, dim) == (patch.DEFAULT_BANK_SIZE, dim)
    push = jax.jit(patch.push_bank, static_argnames=("num", "groups"))
    rng = np.random.default_rng(4)
    history = []
    for step in range(4):
        # feats = (step, row, 0) identify each row; labels = row.
        feats = np.stack([np.full(rows, step), np.arange(rows), np.zeros(rows)], 1).astype(np.float32)
        valid = rng.random(rows) < 0.8
        valid[[0, 5]] = True  # at least one valid row per group
        if step == 2:
            valid[:5] = [False, False, True, False, False]  # group 0 has fewer than num valid
        bank = push(bank, jax.random.key(step), feats, np.arange(rows), valid, num=num, groups=groups)
        history.append(valid)
        b = jax.tree.map(np.asarray, bank)
        for age in range(min(step + 1, 3)):
            block = slice(age * groups * num, (age + 1) * groups * num)
            src, v = history[step - age], b["valid"][block]
            f, lab = b["feats"][block], b["labels"][block]
            assert np.all(f[v, 0] == step - age)  # newest first
            picked = f[v, 1].astype(int)
            assert len(set(picked.tolist())) == len(picked)  # without replacement
            assert np.all(src[picked])  # only valid rows
            np.testing.assert_array_equal(lab[v], picked)
            assert np.all(lab[~v] == IGNORE_INDEX)
            for g in range(groups):
                part = slice(g * num, (g + 1) * num)
                got = f[part][v[part], 1]
                assert np.all((got >= g * 5) & (got < (g + 1) * 5))  # group g's rows
                assert v[part].sum() == min(num, src[g * 5 : (g + 1) * 5].sum())
        if step < 2:
            assert not b["valid"][(step + 1) * groups * num :].any()
    # After 4 pushes into a 3-step bank, step 0 is gone.
    assert set(np.asarray(bank["feats"])[np.asarray(bank["valid"]), 0].tolist()) == {1.0, 2.0, 3.0}


def test_bank_picks_uniformly_among_valid_rows_and_is_detached():
    rows, dim = 12, 2
    feats = np.stack([np.arange(rows), np.ones(rows)], 1).astype(np.float32)
    valid = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
    bank = patch.init_bank(4, dim)

    def picked(key):
        out = patch.push_bank(bank, key, feats, np.zeros(rows, np.int32), valid, num=4, groups=1)
        return out["feats"][:, 0].astype(jnp.int32)

    counts = np.bincount(
        np.asarray(jax.jit(jax.vmap(picked))(jax.random.split(jax.random.key(0), 900))).ravel(),
        minlength=rows,
    )
    assert np.all(counts[~valid] == 0)
    expected = 900 * 4 / valid.sum()  # 400 per valid row
    assert np.all(np.abs(counts[valid] - expected) < 80)

    grad = jax.jit(jax.grad(
        lambda f: jnp.sum(patch.push_bank(bank, jax.random.key(0), f, np.zeros(rows, np.int32),
                                          valid, num=4, groups=1)["feats"])
    ))(feats)
    np.testing.assert_array_equal(grad, 0.0)
    with pytest.raises(ValueError, match="equal groups"):
        patch.push_bank(bank, jax.random.key(0), feats[:11], np.zeros(11), valid[:11], num=2, groups=2)
