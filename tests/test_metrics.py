"""pipa_jax.metrics against independent NumPy references (plain per-class mask counting)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pipa_jax import labels, metrics

C = labels.NUM_CLASSES
IGNORE = labels.IGNORE_INDEX


def reference_confusion(pred, label, num_classes=C, ignore_index=IGNORE, invalid_column=False):
    """Counts (gt == i) & (pred == j) class by class: no bincount, no flat indices."""
    pred = np.asarray(pred).astype(np.int64)
    label = np.asarray(label).astype(np.int64)
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    pred_ok = (pred >= 0) & (pred < num_classes)
    out = np.zeros((num_classes, num_classes + invalid_column), np.int64)
    for i in range(num_classes):
        gt_i = valid & (label == i)
        for j in range(num_classes):
            out[i, j] = np.count_nonzero(gt_i & (pred == j))
        if invalid_column:
            out[i, num_classes] = np.count_nonzero(gt_i & ~pred_ok)
    return out


def reference_iou(conf):
    """IoU by the textbook formula, class by class, with Python floats."""
    conf = np.asarray(conf)
    n = conf.shape[0]
    out = []
    for c in range(n):
        tp = int(conf[c, c])
        fn = int(conf[c, :].sum()) - tp
        fp = int(conf[:n, c].sum()) - tp
        out.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
    return np.array(out)


def random_maps(rng, shape, ignore_frac=0.2, out_of_range_frac=0.0):
    label = rng.integers(0, C, shape)
    label[rng.random(shape) < ignore_frac] = IGNORE
    if out_of_range_frac:
        label[rng.random(shape) < out_of_range_frac] = 19 + rng.integers(0, 200)
    # Predictions agree with the label 60% of the time so the diagonal is not trivial.
    pred = np.where(rng.random(shape) < 0.6, np.minimum(label, C - 1), rng.integers(0, C, shape))
    return pred.astype(np.uint8), label.astype(np.uint8)


def test_confusion_matrix_matches_reference_with_ignore_and_uint8():
    rng = np.random.default_rng(0)
    # uint8 inputs: label * 19 + pred overflows uint8, so this also checks the int32 cast.
    pred, label = random_maps(rng, (2, 37, 53), out_of_range_frac=0.05)
    conf = metrics.confusion_matrix(pred, label)
    assert conf.dtype == jnp.int32 and conf.shape == (C, C)
    np.testing.assert_array_equal(np.asarray(conf), reference_confusion(pred, label))
    valid = (label < C).sum()
    assert int(conf.sum()) == valid  # ignore (255) and out-of-range (19..) labels excluded
    np.testing.assert_array_equal(
        metrics.confusion_matrix_np(pred, label), reference_confusion(pred, label)
    )


def test_confusion_matrix_rows_are_gt_columns_are_pred():
    label = np.array([0, 0, 0, 1, IGNORE])
    pred = np.array([0, 2, 2, 0, 1])
    conf = np.asarray(metrics.confusion_matrix(pred, label, num_classes=3))
    np.testing.assert_array_equal(conf, [[1, 0, 2], [1, 0, 0], [0, 0, 0]])


def test_invalid_predictions_dropped_or_counted_as_misses():
    rng = np.random.default_rng(1)
    pred, label = random_maps(rng, (41, 29))
    pred[rng.random(pred.shape) < 0.1] = 255
    pred[0, :5] = 19
    plain = np.asarray(metrics.confusion_matrix(pred, label))
    with_col = np.asarray(metrics.confusion_matrix(pred, label, count_invalid_pred=True))
    ref = reference_confusion(pred, label, invalid_column=True)
    assert with_col.shape == (C, C + 1)
    np.testing.assert_array_equal(with_col, ref)
    np.testing.assert_array_equal(plain, ref[:, :C])
    np.testing.assert_array_equal(
        metrics.confusion_matrix_np(pred, label, count_invalid_pred=True), ref
    )
    # Misses lower the IoU of the gt class (they are false negatives), never raise it.
    assert np.all(metrics.iou_from_confusion(with_col) <= metrics.iou_from_confusion(plain) + 1e-12)
    np.testing.assert_allclose(metrics.iou_from_confusion(with_col), reference_iou(ref))


def test_confusion_matrix_under_jit_and_other_settings():
    rng = np.random.default_rng(2)
    pred, label = random_maps(rng, (3, 16, 16))
    label[0, 0, :4] = 0
    f = jax.jit(functools.partial(metrics.confusion_matrix, num_classes=C, ignore_index=IGNORE))
    np.testing.assert_array_equal(np.asarray(f(pred, label)), reference_confusion(pred, label))

    # A different class count and ignore value, inside a larger jitted function.
    p5, l5 = pred % 5, label % 6  # label 5 plays "ignore" for 5 classes
    g = jax.jit(lambda p, l: metrics.confusion_matrix(p, l, num_classes=5, ignore_index=5) * 2)
    np.testing.assert_array_equal(
        np.asarray(g(p5, l5)), 2 * reference_confusion(p5, l5, num_classes=5, ignore_index=5)
    )


def test_confusion_matrix_sharded_over_8_devices():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(3)
    pred, label = random_maps(rng, (16, 24, 40))
    pred_s = jax.device_put(jnp.asarray(pred, jnp.int32), sharding)
    label_s = jax.device_put(jnp.asarray(label, jnp.int32), sharding)
    assert len(pred_s.sharding.device_set) == 8

    step = jax.jit(
        lambda p, l: metrics.confusion_matrix(p, l),
        in_shardings=(sharding, sharding),
        out_shardings=NamedSharding(mesh, P()),
    )
    conf = step(pred_s, label_s)
    np.testing.assert_array_equal(np.asarray(conf), reference_confusion(pred, label))
    # The jitted function itself also accepts sharded arrays directly.
    np.testing.assert_array_equal(
        np.asarray(metrics.confusion_matrix(pred_s, label_s)), reference_confusion(pred, label)
    )


def test_confusion_matrix_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="same shape"):
        metrics.confusion_matrix(np.zeros((2, 3), np.int32), np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match="integer"):
        metrics.confusion_matrix(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int32))


def test_dataset_level_matrix_is_a_sum_over_images():
    rng = np.random.default_rng(4)
    a = random_maps(rng, (20, 30))
    b = random_maps(rng, (10, 30))
    total = np.asarray(metrics.confusion_matrix(*a), np.int64) + np.asarray(
        metrics.confusion_matrix(*b), np.int64
    )
    joint = reference_confusion(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]))
    np.testing.assert_array_equal(total, joint)


def test_iou_absent_classes_and_miou():
    conf = np.zeros((C, C), np.int64)
    conf[0, 0], conf[0, 1] = 8, 2  # road: 8 right, 2 called sidewalk
    conf[1, 1] = 5                 # sidewalk: 5 right, plus 2 road pixels predicted as it
    conf[2, 3] = 4                 # building always called wall; wall absent from gt
    iou = metrics.iou_from_confusion(conf)
    assert iou[0] == pytest.approx(8 / 10)
    assert iou[1] == pytest.approx(5 / 7)
    assert iou[2] == 0.0
    assert iou[3] == 0.0  # absent from gt but predicted: a false positive, IoU 0, counted
    assert np.isnan(iou[4:]).all()  # absent from gt and predictions: nan, left out
    np.testing.assert_allclose(iou, reference_iou(conf))
    assert metrics.miou(conf) == pytest.approx((0.8 + 5 / 7 + 0 + 0) / 4)
    assert metrics.miou(conf, classes=[0, 1]) == pytest.approx((0.8 + 5 / 7) / 2)
    assert math.isnan(metrics.miou(conf, classes=[5, 6]))  # all nan -> nan (no warning)
    assert math.isnan(metrics.miou(np.zeros((C, C), np.int64)))
    with pytest.raises(ValueError, match="subset"):
        metrics.miou(conf, classes=[19])


def test_synthia_subsets_miou16_miou13():
    assert len(labels.SYNTHIA_16_CLASSES) == 16 and len(labels.SYNTHIA_13_CLASSES) == 13
    assert metrics.CLASS_SUBSETS[16] == labels.SYNTHIA_16_CLASSES
    rng = np.random.default_rng(5)
    pred, label = random_maps(rng, (64, 64), ignore_frac=0.1)
    conf = np.asarray(metrics.confusion_matrix(pred, label))
    iou = reference_iou(conf)
    assert metrics.miou(conf) == pytest.approx(np.nanmean(iou), abs=1e-12)
    for n, subset in ((16, labels.SYNTHIA_16_CLASSES), (13, labels.SYNTHIA_13_CLASSES)):
        expected = np.mean([iou[c] for c in subset])
        assert metrics.miou(conf, subset) == pytest.approx(expected, abs=1e-12)
        assert metrics.miou(conf, metrics.CLASS_SUBSETS[n]) == pytest.approx(expected, abs=1e-12)
    # Classes outside the 16 (terrain, truck, train) do not move mIoU16.
    spoiled = conf.copy()
    for c in (9, 14, 16):
        spoiled[c, c] = 0
    assert metrics.miou(spoiled, labels.SYNTHIA_16_CLASSES) == metrics.miou(
        conf, labels.SYNTHIA_16_CLASSES
    )
    assert metrics.miou(spoiled) < metrics.miou(conf)
    names = metrics.per_class_iou(conf, labels.SYNTHIA_13_CLASSES)
    assert list(names) == [labels.CLASS_NAMES[c] for c in labels.SYNTHIA_13_CLASSES]


def test_format_iou_table():
    conf = np.zeros((C, C), np.int64)
    conf[0, 0], conf[0, 1], conf[1, 1], conf[10, 10] = 8, 2, 5, 3
    table = metrics.format_iou_table(
        conf,
        labels.CLASS_NAMES,
        subsets={"mIoU": None, "mIoU16": labels.SYNTHIA_16_CLASSES, "mIoU13": labels.SYNTHIA_13_CLASSES},
    )
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in table.splitlines()}
    assert float(rows["road"][0]) == pytest.approx(80.0)
    assert float(rows["sidewalk"][0]) == pytest.approx(100 * 5 / 7, abs=0.005)
    assert rows["wall"][0].strip() == "-"
    expected = 100 * (0.8 + 5 / 7 + 1.0) / 3
    for name in ("mIoU", "mIoU16", "mIoU13"):
        assert float(rows[name][0]) == pytest.approx(expected, abs=0.005)
    assert float(rows["aAcc"][1]) == pytest.approx(100 * 16 / 18, abs=0.005)
    assert all(name in table for name in labels.CLASS_NAMES)
