"""What a finished run leaves for a person to read: a per-class IoU table and a picture.

`write_run_report(workdir, ...)` writes, at the end of training,
  iou_table.md      per-class IoU and accuracy of the student (and teacher) on the target val split
  predictions.png   a grid of target val images: image | ground truth | prediction [| baseline]
  grid_predictions.npz   the predicted train ids shown in the grid (small), so another run can
                    show them as its baseline column (`report.baseline_workdir`, e.g. a
                    source-only run of the same data config).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from PIL import Image

from pipa_jax import inference
from pipa_jax import io as io_lib
from pipa_jax import labels as L
from pipa_jax import metrics as metrics_lib

GRID_FILE = "predictions.png"
TABLE_FILE = "iou_table.md"
GRID_PREDICTIONS_FILE = "grid_predictions.npz"


def iou_table(confusions: dict[str, np.ndarray], title: str = "", miou_subsets=(19,)) -> str:
    """A markdown document with one per-class table per evaluated model (e.g. student, teacher),
    with mIoU rows over the class subsets (19, and 16 / 13 for SYNTHIA)."""
    subsets = metrics_lib.miou_rows(miou_subsets)
    parts = [f"# {title}".rstrip()] if title else []
    for who, conf in confusions.items():
        parts += [f"## {who}", "", metrics_lib.format_iou_table(conf, subsets=subsets), ""]
    return "\n".join(parts)


def _tile(array: np.ndarray, width: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] scaled to `width` (nearest for label colours keeps edges honest)."""
    h, w = array.shape[:2]
    height = max(1, round(h * width / w))
    return np.asarray(Image.fromarray(array).resize((width, height), Image.NEAREST))


def _label_rgb(train_ids: np.ndarray) -> np.ndarray:
    return L.colorize(np.asarray(train_ids, np.uint8))


def _header(names, tile_width: int, gap: int) -> np.ndarray:
    """A white strip with each column's name."""
    from PIL import ImageDraw
    strip = Image.new("RGB", (len(names) * (tile_width + gap) - gap, 14), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, name in enumerate(names):
        draw.text((i * (tile_width + gap) + 2, 1), name, fill=(0, 0, 0))
    return np.asarray(strip)


def grid_image(images, labels, predictions, baseline=None, tile_width: int = 256,
               gap: int = 4, baseline_name: str = "baseline") -> np.ndarray:
    """Rows of image | ground truth | prediction [| baseline prediction] under a header row,
    white gaps between."""
    rows = []
    for i in range(len(images)):
        cols = [images[i], _label_rgb(labels[i]), _label_rgb(predictions[i])]
        if baseline is not None:
            cols.append(_label_rgb(baseline[i]))
        tiles = [_tile(np.asarray(t, np.uint8), tile_width) for t in cols]
        h = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 0), (0, 0)), constant_values=255) for t in tiles]
        spacer = np.full((h, gap, 3), 255, np.uint8)
        row = [tiles[0]]
        for t in tiles[1:]:
            row += [spacer, t]
        rows.append(np.concatenate(row, axis=1))
    width = max(r.shape[1] for r in rows)
    names = ["image", "ground truth", "prediction"] + ([baseline_name] if baseline is not None else [])
    rows.insert(0, _header(names, tile_width, gap))
    out = []
    for r in rows:
        out += [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255),
                np.full((gap, width, 3), 255, np.uint8)]
    return np.concatenate(out[:-1], axis=0)


def predict_examples(graphdef, params, batch_stats, examples, settings=None) -> list[np.ndarray]:
    """Train-id predictions for each {'image','label'} example at the label's size, with the
    evaluation's own inference (whole image or sliding window, pipa_jax.inference)."""
    step = inference.make_predict_step(graphdef)
    settings = settings or inference.InferenceSettings()
    return [np.asarray(jax.device_get(step(params, batch_stats, ex["image"][None],
                                           out_hw=ex["label"].shape, settings=settings)))[0]
            for ex in examples]


def _load_baseline(path: str, labels) -> np.ndarray | None:
    file = os.path.join(path, GRID_PREDICTIONS_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"report.baseline_workdir={path!r} holds no {GRID_PREDICTIONS_FILE}; point it at the workdir "
            "of a finished run (e.g. configs/synthetic.py:method=source_only) or set it to ''")
    with np.load(file) as z:
        preds, gt = z["predictions"], z["labels"]
    if preds.shape[0] < len(labels) or any(g.shape != l.shape or not np.array_equal(g, l)
                                           for g, l in zip(gt, labels)):
        raise ValueError(
            f"{file}: its grid shows other validation images than this run (different data config "
            "or seed); run the baseline with the same data settings")
    return preds[:len(labels)]


def write_run_report(workdir: str, c, graphdef, params, batch_stats, confusions: dict[str, np.ndarray],
                     source, write: bool = True) -> dict[str, str]:
    """Writes the table, the grid and the grid's predictions into `workdir`; returns their paths.
    With several processes every one calls this (the predictions run on the global mesh) and only
    the one given write=True writes; the others return {}."""
    paths = {"table": os.path.join(workdir, TABLE_FILE)}
    title = f"{c.data.target} validation ({len(source)} images), step {c.total_steps}"
    sizes = tuple(c.eval.miou_subsets) if "eval" in c else (19,)
    if write:
        io_lib.write_text_atomic(paths["table"], iou_table(confusions, title, sizes) + "\n")
    n = min(int(c.report.grid_images), len(source))
    if n <= 0:
        return paths if write else {}
    examples = [source[i] for i in range(n)]
    images = [ex["image"] for ex in examples]
    gts = [ex["label"] for ex in examples]
    preds = predict_examples(graphdef, params, batch_stats, examples, inference.settings_from_config(c))
    if not write:
        return {}
    baseline = _load_baseline(c.report.baseline_workdir, gts) if c.report.baseline_workdir else None
    paths.update(grid=os.path.join(workdir, GRID_FILE),
                 grid_predictions=os.path.join(workdir, GRID_PREDICTIONS_FILE))
    io_lib.write_color_png(paths["grid"], grid_image(
        images, gts, preds, baseline, int(c.report.tile_width),
        baseline_name=f"baseline: {os.path.basename(os.path.normpath(c.report.baseline_workdir))}"))
    if len({p.shape for p in preds}) == 1:
        with io_lib.atomic_open(paths["grid_predictions"], "wb") as f:
            np.savez_compressed(f, predictions=np.stack(preds), labels=np.stack(gts))
    else:
        paths.pop("grid_predictions")
    return paths
