"""pipa_jax.tools.score (and pipa_jax.io) checked against the official Cityscapes evaluator.

The reference is cityscapesscripts' `evaluation.evalPixelLevelSemanticLabeling` (v2.3.0),
which CI installs with `pip install --no-deps cityscapesscripts pyquaternion` (pyquaternion is
the only package beyond numpy and Pillow that the evaluator's import chain needs:
evalPixelLevelSemanticLabeling -> helpers.csHelpers -> helpers.annotation ->
helpers.box3dImageTransform -> pyquaternion). Without it the cross-check FAILS, on purpose.

How the official evaluator scores, and how the comparison maps onto ours:
  * It fills one dataset-level confusion matrix over label ids 0..33 (rows ground truth,
    columns prediction) from every pixel, ignored or not.
  * For each of the 19 evaluated classes: TP = diagonal; FN = row sum - TP over *all* prediction
    columns, so a valid pixel predicted as an ignored id (e.g. 0, "unlabeled") is a miss;
    FP = column sum over the rows of evaluated classes only, so predictions on ignored ground
    truth never count. IoU = TP / (TP + FP + FN), nan if that is 0. The 15 ignored ids score nan.
  * `averageScoreClasses` = mean over the classes whose IoU is not nan (the 19 evaluated ones
    at most). A class predicted somewhere but absent from the gt scores 0 and counts.
  Ours writes train ids; 255 ("no prediction") becomes label id 0 for the official evaluator,
  and our [19, 20] matrix's last column (pixels predicted 255) plays the role of its ignored-id
  columns. We assert: per-class IoU of all 19 classes equal to 1e-9 (nan exactly where the
  official is nan), mIoU equal to `averageScoreClasses` to 1e-9, and our confusion matrix equal
  to the official one restricted to the evaluated ids (plus the folded ignored-id columns).
"""
import importlib
import json
import logging
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from pipa_jax import io as io_lib
from pipa_jax import labels
from pipa_jax.tools import score

DATA = "/work/shared/data"
GT_LABEL_IDS = f"{DATA}/cityscapes/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
FRAME = "frankfurt_000000_000294"
FRAME2 = "frankfurt_000000_000576"  # a second (synthetic) frame, built from the first
C = labels.NUM_CLASSES
EVAL_LABEL_IDS = sorted(labels.CITYSCAPES_ID_TO_TRAIN_ID)  # label ids in train-id order
TRAIN_TO_LABEL_ID = np.zeros(256, np.uint8)  # 255 -> 0 ("unlabeled", ignored in eval)
for _label_id, _train_id in labels.CITYSCAPES_ID_TO_TRAIN_ID.items():
    TRAIN_TO_LABEL_ID[_train_id] = _label_id


# --------------------------------------------------------------------------------------------
# The official evaluator.


@pytest.fixture
def official(tmp_path, monkeypatch):
    """The official evaluator module, writing only into tmp_path; FAILS if not installed."""
    # Read at import time (for its default paths); point them at tmp_path to be safe.
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path / "cs_dataset"))
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(tmp_path / "cs_results"))
    monkeypatch.delenv("CITYSCAPES_EXPORT_DIR", raising=False)
    try:
        ev = importlib.import_module("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    except ImportError as e:
        pytest.fail(
            "the official Cityscapes evaluator is needed for this cross-check: "
            "`pip install --no-deps cityscapesscripts pyquaternion` "
            f"(import failed: {type(e).__name__}: {e})"
        )
    # numpy >= 2.4 removed np.in1d, which the instance-level (nIoU) and pixel-accuracy paths
    # call; the class IoU path does not need them.
    monkeypatch.setattr(ev.args, "evalInstLevelScore", False)
    monkeypatch.setattr(ev.args, "evalPixelAccuracy", False)
    monkeypatch.setattr(ev.args, "exportFile", str(tmp_path / "official" / "result.json"))
    monkeypatch.setattr(ev.args, "JSONOutput", True)
    monkeypatch.setattr(ev.args, "quiet", True)
    monkeypatch.setattr(ev.args, "colorized", False)
    monkeypatch.setattr(ev.args, "predictionPath", None)
    monkeypatch.setattr(ev.args, "predictionWalk", None)
    return ev


def gt_train_ids() -> np.ndarray:
    return labels.to_train_ids(io_lib.read_label(GT_LABEL_IDS), labels.CITYSCAPES_ID_TO_TRAIN_ID)


def make_predictions(gt: np.ndarray) -> dict[str, np.ndarray]:
    """Predictions built from the ground truth (train ids), each a different kind of error."""
    h, w = gt.shape
    # 1) Swapped classes + overwritten blocks: road<->sidewalk, car->truck (truck is absent
    #    from this frame's gt, so its IoU is 0 and counts), a block of "pole", and a block of
    #    255 ("no prediction": misses for the gt class under the official convention).
    swapped = gt.copy()
    swapped[gt == 0], swapped[gt == 1] = 1, 0
    swapped[gt == 13] = 14
    swapped[: h // 4, : w // 3] = 5
    swapped[h // 2 : h // 2 + 20, w // 2 : w // 2 + 40] = 255
    # 2) A shifted copy: errors along every boundary; shifted-in ignore becomes 255 (misses).
    shifted = np.roll(gt, shift=(3, -7), axis=(0, 1))
    # 3) Mostly right, with 20% of pixels replaced by random classes (all 19 appear).
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(gt.shape) < 0.2, rng.integers(0, C, gt.shape), gt)
    noisy = np.where(noisy == 255, 2, noisy).astype(np.uint8)
    return {"swapped": swapped, "shifted": shifted, "noisy": noisy}


def write_case(root, gts: dict[str, np.ndarray], preds: dict[str, np.ndarray]):
    """Writes gt label-id PNGs and predictions in both id spaces; returns the file lists."""
    gt_dir, ours_dir, official_dir = root / "gt", root / "pred_train_ids", root / "pred_label_ids"
    gt_files, official_files = [], []
    for frame, gt in gts.items():
        gt_path = gt_dir / "val" / "frankfurt" / f"{frame}_gtFine_labelIds.png"
        io_lib.write_label_png(gt_path, gt)
        io_lib.write_label_png(ours_dir / "frankfurt" / f"{frame}_leftImg8bit.png", preds[frame])
        official_path = official_dir / f"{frame}_pred.png"
        io_lib.write_label_png(official_path, TRAIN_TO_LABEL_ID[preds[frame]])
        gt_files.append(str(gt_path))
        official_files.append(str(official_path))
    return gt_dir, ours_dir, gt_files, official_files


@pytest.mark.parametrize("case", ["swapped", "shifted", "noisy", "two_frames"])
def test_matches_official_cityscapes_evaluator(case, official, tmp_path, capsys):
    gt_label_ids = io_lib.read_label(GT_LABEL_IDS)
    gt = gt_train_ids()
    preds = make_predictions(gt)
    if case == "two_frames":
        # Dataset-level accumulation over two frames of different content.
        gts = {FRAME: gt_label_ids, FRAME2: gt_label_ids[:, ::-1].copy()}
        preds = {FRAME: preds["swapped"], FRAME2: make_predictions(gt[:, ::-1].copy())["shifted"]}
    else:
        gts = {FRAME: gt_label_ids}
        preds = {FRAME: preds[case]}
    gt_dir, ours_dir, gt_files, official_files = write_case(tmp_path, gts, preds)

    ours = score.score_dirs(ours_dir, gt_dir)
    result = official.evaluateImgLists(official_files, gt_files, official.args)
    assert os.path.exists(official.args.exportFile)  # it wrote its JSON into tmp_path only

    assert ours["num_images"] == len(gts)
    official_scores = result["classScores"]
    compared = 0
    for name in labels.CLASS_NAMES:
        a, b = ours["per_class_iou"][name], official_scores[name]
        if np.isnan(b):
            assert np.isnan(a), f"{name}: official nan, ours {a}"
        else:
            assert abs(a - b) <= 1e-9, f"{name}: ours {a}, official {b}"
            compared += 1
    # The 15 ignored label ids are nan in the official scores, so its average runs over
    # exactly the classes we average over.
    assert all(
        np.isnan(v) for k, v in official_scores.items() if k not in labels.CLASS_NAMES
    )
    assert abs(ours["miou"] - result["averageScoreClasses"]) <= 1e-9
    assert compared >= 10  # the cases exercise most classes, not a handful

    # Confusion matrices agree too (ours: train ids; official: label ids 0..33).
    official_conf = np.asarray(result["confMatrix"], dtype=np.int64)
    rows = official_conf[EVAL_LABEL_IDS]
    ignored_cols = [i for i in range(official_conf.shape[1]) if i not in EVAL_LABEL_IDS]
    expected = np.concatenate(
        [rows[:, EVAL_LABEL_IDS], rows[:, ignored_cols].sum(axis=1, keepdims=True)], axis=1
    )
    np.testing.assert_array_equal(np.asarray(ours["confusion_matrix"]), expected)

    with capsys.disabled():  # the numbers, for the record (visible with `pytest -s`)
        print(
            f"\n[{case}] mIoU ours {ours['miou']!r} official {result['averageScoreClasses']!r} "
            f"({compared} classes)"
        )


def test_official_evaluator_sanity_on_perfect_prediction(official, tmp_path):
    """A perfect prediction scores 1.0 in both (checks our id round trip, not just agreement)."""
    gt = gt_train_ids()
    gt_dir, ours_dir, gt_files, official_files = write_case(
        tmp_path, {FRAME: io_lib.read_label(GT_LABEL_IDS)}, {FRAME: gt}
    )
    result = official.evaluateImgLists(official_files, gt_files, official.args)
    ours = score.score_dirs(ours_dir, gt_dir)
    assert result["averageScoreClasses"] == pytest.approx(1.0)
    assert ours["miou"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# score_dirs / CLI behaviour and errors.


@pytest.fixture
def one_frame(tmp_path):
    """gt dir with the real frame; a pred dir with a correct train-id prediction for it."""
    gt_dir = tmp_path / "gtFine" / "val" / "frankfurt"
    gt_dir.mkdir(parents=True)
    shutil.copy(GT_LABEL_IDS, gt_dir)
    pred_dir = tmp_path / "preds"
    io_lib.write_label_png(pred_dir / f"{FRAME}_leftImg8bit.png", gt_train_ids())
    return tmp_path / "gtFine", pred_dir


def test_cli_prints_table_and_writes_json(one_frame, tmp_path, capsys):
    gt_dir, pred_dir = one_frame
    out = tmp_path / "out" / "scores.json"
    rc = score.main(["score", f"--pred_dir={pred_dir}", f"--gt_dir={gt_dir}", f"--json={out}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| road" in printed and "mIoU" in printed and "100.00" in printed
    data = json.loads(out.read_text())
    assert data["miou"] == 1.0 and data["num_images"] == 1 and data["classes"] == 19
    assert set(data["per_class_iou"]) == set(labels.CLASS_NAMES)
    assert data["per_class_iou"]["train"] is None  # absent class: null, not NaN (invalid JSON)

    rc = score.main(["score", f"--pred_dir={pred_dir}", f"--gt_dir={gt_dir}", "--classes=16"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mIoU16" in printed and "mIoU13" in printed


def test_subsets_and_train_id_ground_truth(one_frame, tmp_path):
    gt_dir, pred_dir = one_frame
    r16 = score.score_dirs(pred_dir, gt_dir, classes=16)
    assert list(r16["per_class_iou"]) == [labels.CLASS_NAMES[c] for c in labels.SYNTHIA_16_CLASSES]
    r13 = score.score_dirs(pred_dir, gt_dir, classes=13)
    assert len(r13["per_class_iou"]) == 13
    # Train-id ground truth (written from the label ids, so it matches exactly).
    tid_dir = tmp_path / "tid" / "frankfurt"
    io_lib.write_label_png(tid_dir / f"{FRAME}_gtFine_labelTrainIds.png", gt_train_ids())
    r = score.score_dirs(pred_dir, tmp_path / "tid", gt_train_ids=True)
    assert r["miou"] == 1.0 and r["num_images"] == 1
    with pytest.raises(ValueError, match="classes must be one of"):
        score.score_dirs(pred_dir, gt_dir, classes=18)


def test_mismatched_size_names_both_files(one_frame):
    gt_dir, pred_dir = one_frame
    pred_path = pred_dir / f"{FRAME}_leftImg8bit.png"
    io_lib.write_label_png(pred_path, gt_train_ids()[::2, ::2])
    with pytest.raises(ValueError) as e:
        score.score_dirs(pred_dir, gt_dir)
    message = str(e.value)
    assert str(pred_path) in message and f"{FRAME}_gtFine_labelIds.png" in message
    assert "128x64" in message and "256x128" in message


def test_missing_predictions_listed_or_skipped(one_frame, caplog):
    gt_dir, pred_dir = one_frame
    city = gt_dir / "val" / "frankfurt"
    for frame in ("frankfurt_000001_000001", "frankfurt_000001_000002"):
        shutil.copy(GT_LABEL_IDS, city / f"{frame}_gtFine_labelIds.png")
    with pytest.raises(FileNotFoundError) as e:
        score.score_dirs(pred_dir, gt_dir)
    message = str(e.value)
    assert "2 of 3" in message and "frankfurt_000001_000001" in message
    assert str(pred_dir) in message and "--allow_missing" in message

    with caplog.at_level(logging.WARNING):
        r = score.score_dirs(pred_dir, gt_dir, allow_missing=True)
    assert r["num_images"] == 1 and r["miou"] == 1.0
    assert r["missing_frames"] == ["frankfurt_000001_000001", "frankfurt_000001_000002"]
    assert "frankfurt_000001_000002" in caplog.text

    # Nothing at all to score is an error even with allow_missing.
    empty = pred_dir.parent / "no_preds"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="3 of 3"):
        score.score_dirs(empty, gt_dir, allow_missing=True)


def test_no_ground_truth_names_dir_and_layout(tmp_path, one_frame):
    _, pred_dir = one_frame
    empty = tmp_path / "empty_gt"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        score.score_dirs(pred_dir, empty)
    assert str(empty) in str(e.value) and "gtFine/val/<city>" in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        score.score_dirs(pred_dir, tmp_path / "nope")
    # Only train-id files present: the error says which flag to pass.
    tid = tmp_path / "tid_only"
    io_lib.write_label_png(tid / f"{FRAME}_gtFine_labelTrainIds.png", gt_train_ids())
    with pytest.raises(FileNotFoundError, match="--gt_train_ids"):
        score.score_dirs(pred_dir, tid)


def test_corrupt_png_names_path(one_frame):
    gt_dir, pred_dir = one_frame
    pred_path = pred_dir / f"{FRAME}_leftImg8bit.png"
    data = pred_path.read_bytes()
    pred_path.write_bytes(data[: len(data) // 2])  # truncated mid-IDAT
    with pytest.raises(ValueError) as e:
        score.score_dirs(pred_dir, gt_dir)
    assert str(pred_path) in str(e.value) and "corrupt" in str(e.value)
    assert "re-download or re-extract" in str(e.value)


def test_cli_errors_are_one_line_messages(one_frame, tmp_path, capsys):
    gt_dir, pred_dir = one_frame
    rc = score.main(["score", f"--pred_dir={pred_dir}", f"--gt_dir={tmp_path / 'missing'}"])
    assert rc == 1
    assert str(tmp_path / "missing") in capsys.readouterr().err
    assert score.main(["score", f"--pred_dir={pred_dir}"]) == 2  # --gt_dir required
    assert score.main(["score", f"--pred_dir={pred_dir}", f"--gt_dir={gt_dir}", "--classes=7"]) == 2


def test_bad_prediction_contents(one_frame):
    gt_dir, pred_dir = one_frame
    pred_path = pred_dir / f"{FRAME}_leftImg8bit.png"
    # Label ids instead of train ids.
    io_lib.write_label_png(pred_path, TRAIN_TO_LABEL_ID[gt_train_ids()])
    with pytest.raises(ValueError, match="not train ids"):
        score.score_dirs(pred_dir, gt_dir)
    # A colour visualisation instead of ids.
    io_lib.write_color_png(pred_path, gt_train_ids())
    with pytest.raises(ValueError, match=r"\(128, 256, 3\)"):
        score.score_dirs(pred_dir, gt_dir)
    # Two predictions for one frame.
    io_lib.write_label_png(pred_path, gt_train_ids())
    io_lib.write_label_png(pred_dir / "sub" / f"{FRAME}.png", gt_train_ids())
    with pytest.raises(ValueError, match="two files"):
        score.score_dirs(pred_dir, gt_dir)
    assert score.score_dirs(pred_dir, gt_dir, pred_suffix="_leftImg8bit.png")["miou"] == 1.0


def test_frame_id():
    assert score.frame_id(f"{FRAME}_gtFine_labelIds.png") == FRAME
    assert score.frame_id(f"/x/y/{FRAME}.png") == FRAME
    assert score.frame_id("frankfurt_000000_0002941.png") is None
    assert score.frame_id("00001.png") is None


# --------------------------------------------------------------------------------------------
# pipa_jax.io


def test_read_image_modes(tmp_path):
    rgb = io_lib.read_image(f"{DATA}/cityscapes/leftImg8bit/val/frankfurt/{FRAME}_leftImg8bit.png")
    assert rgb.shape == (128, 256, 3) and rgb.dtype == np.uint8
    palette = io_lib.read_image(f"{DATA}/demos/mmseg_demo_cityscapes_1024x512_P.png")
    assert palette.shape == (512, 1024, 3) and palette.dtype == np.uint8
    expected = np.asarray(
        Image.open(f"{DATA}/demos/mmseg_demo_cityscapes_1024x512_P.png").convert("RGB")
    )
    np.testing.assert_array_equal(palette, expected)
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = io_lib.read_image(tmp_path / "a.png")
    assert out.shape == (4, 5, 3) and (out[..., 0] == 200).all()
    Image.fromarray(np.full((4, 5), 7, np.uint8)).save(tmp_path / "g.png")
    assert (io_lib.read_image(tmp_path / "g.png") == 7).all()


def test_read_label_preserves_mode_and_dtype(tmp_path):
    label = io_lib.read_label(GT_LABEL_IDS)
    assert label.dtype == np.uint8 and label.shape == (128, 256)
    inst = io_lib.read_label(f"{DATA}/cityscapes/gtFine/val/frankfurt/{FRAME}_gtFine_instanceIds.png")
    assert inst.dtype == np.uint16 and inst.max() > 1000
    big = (np.arange(20, dtype=np.uint16) * 3000).reshape(4, 5)
    io_lib.write_label_png(tmp_path / "u16.png", big)
    np.testing.assert_array_equal(io_lib.read_label(tmp_path / "u16.png"), big)
    small = np.arange(20, dtype=np.int64).reshape(4, 5)
    io_lib.write_label_png(tmp_path / "i64.png", small)
    out = io_lib.read_label(tmp_path / "i64.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, small)
    with pytest.raises(ValueError, match="uint16"):
        io_lib.write_label_png(tmp_path / "x.png", small * 100)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        io_lib.write_label_png(tmp_path / "x.png", np.zeros((2, 3, 4), np.uint8))
    rgb_path = tmp_path / "rgb.png"
    io_lib.write_color_png(rgb_path, np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError) as e:
        io_lib.read_label(rgb_path)
    assert str(rgb_path) in str(e.value) and "(4, 5, 3)" in str(e.value)


def test_io_errors_name_the_path(tmp_path):
    missing = tmp_path / "nothing_here.png"
    for read in (io_lib.read_image, io_lib.read_label):
        with pytest.raises(FileNotFoundError, match="nothing_here.png"):
            read(missing)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(pathlib.Path(GT_LABEL_IDS).read_bytes()[:300])
    for path in (garbage, truncated):
        for read in (io_lib.read_image, io_lib.read_label):
            with pytest.raises(ValueError) as e:
                read(path)
            assert str(path) in str(e.value) and "corrupt" in str(e.value)


def test_writes_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "dir" / "label.png"
    io_lib.write_label_png(target, np.ones((3, 3), np.uint8))
    assert os.listdir(target.parent) == ["label.png"]  # no temp files left behind
    before = target.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io_lib.write_label_png(target, np.zeros((3, 3), np.uint8))
    assert target.read_bytes() == before  # the old file is intact
    assert os.listdir(target.parent) == ["label.png"]  # and the temp file is gone


def test_write_color_png(tmp_path):
    ids = np.array([[0, 13], [255, 18]], np.uint8)
    io_lib.write_color_png(tmp_path / "c.png", ids)
    np.testing.assert_array_equal(io_lib.read_image(tmp_path / "c.png"), labels.colorize(ids))
    with pytest.raises(ValueError, match="uint8"):
        io_lib.write_color_png(tmp_path / "d.png", np.zeros((2, 2, 3), np.float32))
