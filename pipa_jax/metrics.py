"""Semantic segmentation metrics: confusion matrix (JAX), IoU / mIoU and a printable table.

Evaluation follows docs/method.md §8: one dataset-level confusion matrix summed over all images
(not a mean of per-image IoUs), IoU_c = TP / (TP + FP + FN), and mIoU = nanmean over the
reported classes (all 19; SYNTHIA->Cityscapes also reports mIoU16 and mIoU13 over the subsets
in `pipa_jax.labels`). A class absent from both the ground truth and the predictions has IoU
nan and is left out of the mean; a class absent from the ground truth but predicted somewhere
has IoU 0 and counts. This is the convention of the official Cityscapes evaluator
(`cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling`), which tests/test_score.py
checks against.

Confusion matrices are int32 per call (one call covers < 2**31 pixels); accumulate them over a
dataset on the host in int64: `total += np.asarray(conf, np.int64)`.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pipa_jax.labels import (
    CLASS_NAMES,
    IGNORE_INDEX,
    NUM_CLASSES,
    SYNTHIA_13_CLASSES,
    SYNTHIA_16_CLASSES,
)

# Class subsets by the number of classes a benchmark reports (None = all 19).
CLASS_SUBSETS: dict[int, tuple[int, ...] | None] = {
    19: None,
    16: SYNTHIA_16_CLASSES,
    13: SYNTHIA_13_CLASSES,
}


def miou_rows(subsets=(19,)) -> dict[str, tuple[int, ...] | None]:
    """The one mapping from class-subset sizes (19, 16, 13) to named mIoU rows, in the order given:
    {'mIoU': None, 'mIoU16': SYNTHIA_16_CLASSES, 'mIoU13': SYNTHIA_13_CLASSES} for (19, 16, 13).
    Records use the lower-case names ('miou', 'miou16', 'miou13')."""
    rows = {}
    for n in subsets:
        if int(n) not in CLASS_SUBSETS:
            raise ValueError(f"mIoU subset {n!r}: expected one of {sorted(CLASS_SUBSETS)}")
        rows["mIoU" if int(n) == 19 else f"mIoU{int(n)}"] = CLASS_SUBSETS[int(n)]
    return rows


def subsets_of(c) -> dict[str, tuple[int, ...] | None]:
    """miou_rows of a run config's eval.miou_subsets ((19,) when the config has none)."""
    ev = c.get("eval") if hasattr(c, "get") else None
    return miou_rows(tuple(ev.get("miou_subsets", (19,))) if ev is not None else (19,))


@functools.partial(
    jax.jit, static_argnames=("num_classes", "ignore_index", "count_invalid_pred")
)
def confusion_matrix(
    pred: jax.Array,
    label: jax.Array,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
    count_invalid_pred: bool = False,
) -> jax.Array:
    """Pixel confusion matrix, int32 [C, C]: rows = ground truth, columns = prediction.

    Args:
      pred: integer predictions of any shape [...] (e.g. [B, H, W] argmax train ids).
      label: integer ground truth, same shape. Pixels equal to `ignore_index`, or outside
        [0, num_classes), are left out entirely.
      num_classes: C.
      ignore_index: the ground-truth value that marks unlabelled pixels.
      count_invalid_pred: predictions outside [0, C) (e.g. 255 written by a user for "no
        prediction") cannot be placed in a [C, C] matrix. By default they are dropped; with
        True the result is [C, C + 1] and its last column counts them, so `iou_from_confusion`
        scores them as misses (false negatives of the ground-truth class), as the official
        Cityscapes evaluator does. Model argmax outputs never fall outside [0, C).

    Works under jit and on sharded inputs (any sharding; XLA partitions the scatter-add).
    Memory is O(pixels) for the flat indices plus O(C^2) for the counts: no one-hot of the
    image is formed.
    """
    pred = jnp.asarray(pred)
    label = jnp.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(
            f"pred and label must have the same shape, got {pred.shape} and {label.shape}"
        )
    for name, x in (("pred", pred), ("label", label)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
    c = num_classes
    # int32 arithmetic: uint8 inputs would overflow in label * C.
    pred = pred.reshape(-1).astype(jnp.int32)
    label = label.reshape(-1).astype(jnp.int32)
    valid_label = (label != ignore_index) & (label >= 0) & (label < c)
    valid_pred = (pred >= 0) & (pred < c)
    num_cols = c + 1 if count_invalid_pred else c
    col = jnp.where(valid_pred, pred, c)
    keep = valid_label & (valid_pred | count_invalid_pred)
    # One extra bin (index C * num_cols) swallows every dropped pixel; it is sliced off.
    flat = jnp.where(keep, label * num_cols + col, c * num_cols)
    counts = jnp.bincount(flat, length=c * num_cols + 1)
    return counts[: c * num_cols].reshape(c, num_cols).astype(jnp.int32)


def confusion_matrix_np(
    pred: np.ndarray,
    label: np.ndarray,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
    count_invalid_pred: bool = False,
) -> np.ndarray:
    """Host-side NumPy twin of `confusion_matrix` (same arguments and conventions), int64.

    For tools that score files on the host (tools/score.py): it never initialises a JAX
    backend, so scoring on a machine whose accelerator is busy training takes no device memory.
    """
    pred = np.asarray(pred)
    label = np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(
            f"pred and label must have the same shape, got {pred.shape} and {label.shape}"
        )
    for name, x in (("pred", pred), ("label", label)):
        if x.dtype.kind not in "iu":
            raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
    c = num_classes
    pred = pred.reshape(-1).astype(np.int64)
    label = label.reshape(-1).astype(np.int64)
    valid_label = (label != ignore_index) & (label >= 0) & (label < c)
    valid_pred = (pred >= 0) & (pred < c)
    num_cols = c + 1 if count_invalid_pred else c
    keep = valid_label & (valid_pred | count_invalid_pred)
    flat = label[keep] * num_cols + np.where(valid_pred[keep], pred[keep], c)
    return np.bincount(flat, minlength=c * num_cols).reshape(c, num_cols)


def iou_from_confusion(conf) -> np.ndarray:
    """Per-class IoU, float64 [C], from a confusion matrix [C, C] or [C, C + 1].

    IoU_c = TP / (TP + FP + FN) with TP = conf[c, c], TP + FN = row sum (including the
    invalid-prediction column of a [C, C + 1] matrix), TP + FP = column sum. nan where the
    class appears in neither the ground truth nor the predictions.
    """
    conf = np.asarray(conf, dtype=np.int64)
    if conf.ndim != 2 or conf.shape[1] not in (conf.shape[0], conf.shape[0] + 1):
        raise ValueError(f"expected a confusion matrix [C, C] or [C, C + 1], got {conf.shape}")
    c = conf.shape[0]
    tp = np.diagonal(conf[:, :c]).astype(np.float64)
    gt_total = conf.sum(axis=1)
    pred_total = conf[:, :c].sum(axis=0)
    union = (gt_total + pred_total).astype(np.float64) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def accuracy_from_confusion(conf) -> np.ndarray:
    """Per-class pixel accuracy (recall) TP / (TP + FN), float64 [C]; nan where absent in gt."""
    conf = np.asarray(conf, dtype=np.int64)
    c = conf.shape[0]
    tp = np.diagonal(conf[:, :c]).astype(np.float64)
    gt_total = conf.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(gt_total > 0, tp / np.where(gt_total > 0, gt_total, 1.0), np.nan)


def _subset(classes: Sequence[int] | None, num_classes: int) -> np.ndarray:
    if classes is None:
        return np.arange(num_classes)
    idx = np.asarray(classes, dtype=np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= num_classes:
        raise ValueError(f"class subset must be non-empty ids in [0, {num_classes}), got {classes}")
    return idx


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def miou(conf, classes: Sequence[int] | None = None) -> float:
    """Mean IoU over `classes` (None = all), ignoring nan (classes absent from gt and pred).

    Use `classes=SYNTHIA_16_CLASSES` / `SYNTHIA_13_CLASSES` (or `CLASS_SUBSETS[16]`) for
    SYNTHIA's mIoU16 / mIoU13: the IoUs come from the full 19-class matrix, only the average
    is restricted. Returns nan if every class in the subset is nan.
    """
    iou = iou_from_confusion(conf)
    return _nanmean(iou[_subset(classes, iou.shape[0])])


def per_class_iou(
    conf, classes: Sequence[int] | None = None, class_names: Sequence[str] = CLASS_NAMES
) -> dict[str, float]:
    """{class name: IoU} for `classes` (None = all), in train-id order; nan where absent."""
    iou = iou_from_confusion(conf)
    if len(class_names) != iou.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {iou.shape[0]}-class matrix")
    return {class_names[i]: float(iou[i]) for i in _subset(classes, iou.shape[0])}


def format_iou_table(
    conf,
    class_names: Sequence[str] = CLASS_NAMES,
    subsets: Mapping[str, Sequence[int] | None] | None = None,
) -> str:
    """A markdown table of per-class IoU and accuracy (%), then one row per class subset.

    `subsets` maps a row name to class ids (None = all classes), e.g.
    `{"mIoU": None, "mIoU16": SYNTHIA_16_CLASSES, "mIoU13": SYNTHIA_13_CLASSES}`; default
    `{"mIoU": None}`. Each summary row holds the nanmean IoU and accuracy over its subset;
    a final row gives the overall pixel accuracy (aAcc). Classes absent from both ground truth
    and predictions show "-" and are left out of the means.
    """
    conf = np.asarray(conf, dtype=np.int64)
    iou = iou_from_confusion(conf)
    acc = accuracy_from_confusion(conf)
    c = iou.shape[0]
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for a {c}-class matrix")
    if subsets is None:
        subsets = {"mIoU": None}

    def pct(x: float) -> str:
        return "-" if np.isnan(x) else f"{100.0 * x:.2f}"

    width = max([len(n) for n in class_names] + [len(n) for n in subsets] + [5])
    lines = [
        f"| {'class':<{width}} | IoU (%) | Acc (%) |",
        f"|{'-' * (width + 2)}|--------:|--------:|",
    ]
    for i, name in enumerate(class_names):
        lines.append(f"| {name:<{width}} | {pct(iou[i]):>7} | {pct(acc[i]):>7} |")
    lines.append(f"|{'-' * (width + 2)}|--------:|--------:|")
    for name, classes in subsets.items():
        idx = _subset(classes, c)
        lines.append(
            f"| {name:<{width}} | {pct(_nanmean(iou[idx])):>7} | {pct(_nanmean(acc[idx])):>7} |"
        )
    total = conf.sum()
    a_acc = float(np.trace(conf[:, :c]) / total) if total else float("nan")
    lines.append(f"| {'aAcc':<{width}} | {'':>7} | {pct(a_acc):>7} |")
    return "\n".join(lines)
