"""The run report: the prediction grid's layout, the baseline column and its mismatch error."""
import os

import ml_collections
import numpy as np
import pytest

from pipa_jax import labels as L
from pipa_jax import report


def _examples(n, h=20, w=30, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    labels = [rng.integers(0, 19, (h, w), dtype=np.uint8) for _ in range(n)]
    return images, labels


def test_grid_layout_and_colours():
    images, labels = _examples(3)
    preds = [np.full_like(l, 13) for l in labels]                 # all "car"
    grid = report.grid_image(images, labels, preds, tile_width=60, gap=4)
    assert grid.dtype == np.uint8
    assert grid.shape == (14 + 3 * (40 + 4), 3 * 60 + 2 * 4, 3)  # 20x30 -> 40x60 tiles
    # The prediction column of the first row is the palette colour of "car" everywhere.
    tile = grid[14 + 4:14 + 4 + 40, 2 * (60 + 4):]
    assert (tile == L.PALETTE[13]).all()
    # The ground-truth column is the colourised label, scaled by nearest neighbour.
    gt = grid[18:58, 64:124]
    np.testing.assert_array_equal(gt[::2, ::2], L.colorize(labels[0]))
    with_baseline = report.grid_image(images, labels, preds, baseline=labels, tile_width=60, gap=4)
    assert with_baseline.shape[1] == 4 * 60 + 3 * 4


def _config(workdir_baseline="", grid_images=2):
    c = ml_collections.ConfigDict()
    c.total_steps = 1
    c.data = ml_collections.ConfigDict({"target": "toy"})
    c.report = ml_collections.ConfigDict(
        {"grid_images": grid_images, "tile_width": 32, "baseline_workdir": workdir_baseline})
    return c


def test_baseline_must_show_the_same_images(tmp_path, monkeypatch):
    images, labels = _examples(2)
    source = [{"image": i, "label": l} for i, l in zip(images, labels)]
    # A fixed "model" so the report needs no network.
    monkeypatch.setattr(report, "predict_examples",
                        lambda g, p, b, exs, settings=None: [np.zeros_like(e["label"]) for e in exs])
    conf = {"student": np.eye(19, dtype=np.int64)}
    base = tmp_path / "base"
    base.mkdir()
    paths = report.write_run_report(str(base), _config(), None, None, None, conf, source)
    assert set(paths) == {"table", "grid", "grid_predictions"}
    run = tmp_path / "run"
    run.mkdir()
    paths = report.write_run_report(str(run), _config(str(base)), None, None, None, conf, source)
    assert os.path.getsize(paths["grid"]) > 0
    # Other images than the baseline's: a clear error, not a misleading column.
    other = [{"image": i, "label": l} for i, l in zip(*_examples(2, seed=1))]
    with pytest.raises(ValueError, match="other validation images"):
        report.write_run_report(str(run), _config(str(base)), None, None, None, conf, other)
    with pytest.raises(FileNotFoundError, match="report.baseline_workdir"):
        report.write_run_report(str(run), _config(str(tmp_path / "nope")), None, None, None, conf, source)
    # grid_images = 0: only the table.
    assert set(report.write_run_report(str(run), _config(grid_images=0), None, None, None, conf, source)) == {"table"}


def test_iou_table_has_the_synthia_subsets():
    conf = np.diag(np.arange(1, 20)).astype(np.int64)
    conf[0, 3] = 5
    text = report.iou_table({"student": conf, "teacher": np.eye(19, dtype=np.int64)}, "t", (19, 16, 13))
    assert text.startswith("# t") and "## student" in text and "## teacher" in text
    for row in ("| mIoU ", "| mIoU16 ", "| mIoU13 "):
        assert text.count(row) == 2
