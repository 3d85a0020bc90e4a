r"""Scores train-id PNG predictions against Cityscapes ground truth (mIoU, per-class IoU).

  python -m pipa_jax.tools.score --pred_dir preds/ --gt_dir /data/cityscapes/gtFine/val \
      [--classes 19|16|13] [--json scores.json] [--gt_train_ids] [--allow_missing]

Predictions are single-channel PNGs holding train ids 0..18 (255 = no prediction, scored as
a miss). They are matched to the ground truth by the Cityscapes frame id
`<city>_<seq>_<frame>` at the start of the file name, searched recursively in both
directories (e.g. `frankfurt_000000_000294_leftImg8bit.png` or `frankfurt_000000_000294.png`
for `frankfurt/frankfurt_000000_000294_gtFine_labelIds.png`), and must have the ground
truth's size. Ground truth is `*_gtFine_labelIds.png` (label ids, mapped to train ids with
`pipa_jax.labels.CITYSCAPES_ID_TO_TRAIN_ID`) or, with --gt_train_ids,
`*_gtFine_labelTrainIds.png`.

Scores come from one dataset-level confusion matrix and agree with the official Cityscapes
evaluator (cityscapesscripts' evalPixelLevelSemanticLabeling) to 1e-9 (tests/test_score.py).
--classes 16 / 13 average over SYNTHIA's class subsets (the IoUs themselves are the 19-class
ones). The JSON file holds {"per_class_iou": {name: IoU}, "miou", "num_images", "classes",
"confusion_matrix", "missing_frames"}; IoUs are fractions in [0, 1], null where a class is
absent from both ground truth and predictions.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import Sequence

import numpy as np
from absl import flags

from pipa_jax import io as io_lib
from pipa_jax import metrics
from pipa_jax.labels import CITYSCAPES_ID_TO_TRAIN_ID, CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from pipa_jax.labels import to_train_ids

LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"

# <city>_<6-digit sequence>_<6-digit frame> at the start of a file name, as in the official
# evaluator's prediction pattern "<city>_<seq>_<frame>*.png".
FRAME_ID_RE = re.compile(r"^([A-Za-z][A-Za-z-]*_\d{6}_\d{6})(?![0-9])")

# --classes N reports these rows (SYNTHIA's 16 classes also give the 13-class mIoU).
_MIOU_ROWS = {19: metrics.miou_rows((19,)), 16: metrics.miou_rows((16, 13)), 13: metrics.miou_rows((13,))}
_SHOW_MISSING = 5

log = logging.getLogger(__name__)


def frame_id(filename: str) -> str | None:
    """'frankfurt_000000_000294_gtFine_labelIds.png' -> 'frankfurt_000000_000294' (or None)."""
    m = FRAME_ID_RE.match(os.path.basename(filename))
    return m.group(1) if m else None


def find_frames(root: str, suffix: str) -> dict[str, str]:
    """{frame id: path} for files under `root` (recursive) whose name ends with `suffix`.

    Raises ValueError if two files share a frame id.
    """
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(suffix) or name.startswith("."):
                continue
            fid = frame_id(name)
            if fid is None:
                continue
            path = os.path.join(dirpath, name)
            if fid in found:
                raise ValueError(
                    f"two files under {root} match frame {fid}: {found[fid]} and {path}; keep "
                    f"one per frame (or narrow the match with a more specific suffix)"
                )
            found[fid] = path
    return found


def _check_dir(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} directory does not exist: {path}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{what} must be a directory, got a file: {path}")


def _load_gt(path: str, gt_train_ids: bool) -> np.ndarray:
    label = io_lib.read_label(path)
    if not gt_train_ids:
        return to_train_ids(label, CITYSCAPES_ID_TO_TRAIN_ID)
    bad = np.setdiff1d(np.unique(label), np.r_[np.arange(NUM_CLASSES), IGNORE_INDEX])
    if bad.size:
        raise ValueError(
            f"{path}: not a train-id label map (values {bad[:10].tolist()} are neither train ids "
            f"0..{NUM_CLASSES - 1} nor {IGNORE_INDEX}); for label-id ground truth drop "
            f"--gt_train_ids"
        )
    return label


def _load_pred(path: str, gt_path: str, gt_shape: tuple[int, ...]) -> np.ndarray:
    pred = io_lib.read_label(path)
    if pred.shape != gt_shape:
        raise ValueError(
            f"prediction {path} is {pred.shape[1]}x{pred.shape[0]} (WxH) but its ground truth "
            f"{gt_path} is {gt_shape[1]}x{gt_shape[0]}; predictions must be written at the "
            f"ground truth's full resolution (upsample the logits before the argmax)"
        )
    bad = np.setdiff1d(np.unique(pred), np.r_[np.arange(NUM_CLASSES), IGNORE_INDEX])
    if bad.size:
        raise ValueError(
            f"prediction {path} holds values {bad[:10].tolist()} that are not train ids "
            f"0..{NUM_CLASSES - 1} (or {IGNORE_INDEX} for no prediction); are these Cityscapes "
            f"label ids? Write train ids (argmax of the 19 logits)"
        )
    return pred


def score_dirs(
    pred_dir: str,
    gt_dir: str,
    classes: int = 19,
    gt_train_ids: bool = False,
    gt_suffix: str | None = None,
    pred_suffix: str = ".png",
    allow_missing: bool = False,
) -> dict:
    """Scores every ground-truth frame under `gt_dir` against its prediction in `pred_dir`.

    Args:
      pred_dir: directory searched recursively for train-id PNGs named `<frame id>*<pred_suffix>`.
      gt_dir: directory searched recursively for `*<gt_suffix>`.
      classes: 19, 16 or 13: the classes reported and averaged (16 / 13 = SYNTHIA subsets).
      gt_train_ids: the ground truth holds train ids (default: label ids, mapped here).
      gt_suffix: ground-truth file suffix; default `_gtFine_labelIds.png`, or
        `_gtFine_labelTrainIds.png` with `gt_train_ids`.
      pred_suffix: prediction file suffix (to pick one file per frame from a mixed directory).
      allow_missing: skip ground-truth frames without a prediction (logged, and listed under
        "missing_frames") instead of raising.

    Returns:
      {"per_class_iou": {class name: IoU (nan if absent from gt and predictions)},
       "miou": nanmean over those classes, "num_images": frames scored, "classes": 19|16|13,
       "confusion_matrix": int [19, 20] (rows gt, columns prediction; the last column counts
       pixels predicted 255), "missing_frames": sorted frame ids skipped}.
    """
    if classes not in metrics.CLASS_SUBSETS:
        raise ValueError(f"classes must be one of {sorted(metrics.CLASS_SUBSETS)}, got {classes}")
    if gt_suffix is None:
        gt_suffix = TRAIN_IDS_SUFFIX if gt_train_ids else LABEL_IDS_SUFFIX
    pred_dir, gt_dir = os.fspath(pred_dir), os.fspath(gt_dir)
    _check_dir(gt_dir, "ground-truth")
    _check_dir(pred_dir, "prediction")

    gt_files = find_frames(gt_dir, gt_suffix)
    if not gt_files:
        other = LABEL_IDS_SUFFIX if gt_train_ids else TRAIN_IDS_SUFFIX
        hint = ""
        if find_frames(gt_dir, other):
            hint = (
                f" Found *{other} files there: "
                + ("drop --gt_train_ids." if gt_train_ids else "pass --gt_train_ids.")
            )
        raise FileNotFoundError(
            f"no ground truth found: no file named <city>_<seq>_<frame>{gt_suffix} under "
            f"{gt_dir}. Expected the Cityscapes layout gtFine/val/<city>/<city>_<seq>_<frame>"
            f"{gt_suffix} (pass gtFine/val or any directory above it).{hint}"
        )
    pred_files = find_frames(pred_dir, pred_suffix)
    missing = sorted(set(gt_files) - set(pred_files))
    if missing:
        shown = ", ".join(missing[:_SHOW_MISSING]) + (", ..." if len(missing) > _SHOW_MISSING else "")
        message = (
            f"{len(missing)} of {len(gt_files)} ground-truth frames have no prediction in "
            f"{pred_dir} (e.g. {shown}). Predictions are matched by the frame id "
            f"<city>_<seq>_<frame> at the start of a *{pred_suffix} file name, e.g. "
            f"{missing[0]}_leftImg8bit.png"
        )
        if not allow_missing or len(missing) == len(gt_files):
            raise FileNotFoundError(
                message + ("" if allow_missing else "; pass --allow_missing to score the rest.")
            )
        log.warning("%s; skipping them (--allow_missing).", message)

    conf = np.zeros((NUM_CLASSES, NUM_CLASSES + 1), dtype=np.int64)
    scored = [fid for fid in sorted(gt_files) if fid in pred_files]
    for fid in scored:
        gt_path, pred_path = gt_files[fid], pred_files[fid]
        gt = _load_gt(gt_path, gt_train_ids)
        pred = _load_pred(pred_path, gt_path, gt.shape)
        conf += metrics.confusion_matrix_np(pred, gt, count_invalid_pred=True)

    subset = metrics.CLASS_SUBSETS[classes]
    return {
        "per_class_iou": metrics.per_class_iou(conf, subset, CLASS_NAMES),
        "miou": metrics.miou(conf, subset),
        "num_images": len(scored),
        "classes": classes,
        "confusion_matrix": conf.tolist(),
        "missing_frames": missing,
    }


def _json_safe(x):
    if isinstance(x, float) and np.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: str, result: dict) -> None:
    """Writes `result` as JSON (nan -> null), atomically."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    io_lib.write_json_atomic(path, _json_safe(result), sort_keys=False, default=None)


def format_result(result: dict) -> str:
    """The per-class table plus the headline mIoU line, as printed by the CLI."""
    conf = np.asarray(result["confusion_matrix"])
    table = metrics.format_iou_table(conf, CLASS_NAMES, _MIOU_ROWS[result["classes"]])
    return (
        f"{table}\n\nmIoU{'' if result['classes'] == 19 else result['classes']} = "
        f"{100 * result['miou']:.2f} over {result['classes']} classes, "
        f"{result['num_images']} images"
    )


def _define_flags(fv: flags.FlagValues) -> None:
    # A private FlagValues: importing this module never touches absl's global FLAGS, so it
    # cannot collide with flags of other entry points imported in the same process.
    flags.DEFINE_string("pred_dir", None, "Directory of train-id PNG predictions.", flag_values=fv)
    flags.DEFINE_string("gt_dir", None, "Cityscapes gtFine/val (or a parent).", flag_values=fv)
    flags.DEFINE_enum("classes", "19", ["19", "16", "13"],
                      "Classes to report: 19, or SYNTHIA's 16 / 13.", flag_values=fv)
    flags.DEFINE_string("json", None, "Write the scores to this JSON file.", flag_values=fv)
    flags.DEFINE_bool("gt_train_ids", False,
                      f"Ground truth is *{TRAIN_IDS_SUFFIX} (train ids) instead of "
                      f"*{LABEL_IDS_SUFFIX} (label ids).", flag_values=fv)
    flags.DEFINE_string("gt_suffix", None, "Ground-truth file suffix (default from "
                        "--gt_train_ids).", flag_values=fv)
    flags.DEFINE_string("pred_suffix", ".png", "Prediction file suffix.", flag_values=fv)
    flags.DEFINE_bool("allow_missing", False,
                      "Skip ground-truth frames without a prediction (with a warning).",
                      flag_values=fv)
    flags.mark_flags_as_required(["pred_dir", "gt_dir"], flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; `argv[0]` is the program name. Returns the exit code."""
    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    _define_flags(fv)
    prog = "python -m pipa_jax.tools.score"
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
        print(f"{__doc__}\nflags:\n{fv.get_help()}")
        return 0
    try:
        rest = fv(argv)
    except flags.Error as e:
        print(f"{prog}: error: {e}\n(see {prog} --help)", file=sys.stderr)
        return 2
    if len(rest) > 1:
        print(f"{prog}: error: unexpected arguments {rest[1:]}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        result = score_dirs(
            fv.pred_dir, fv.gt_dir, classes=int(fv.classes), gt_train_ids=fv.gt_train_ids,
            gt_suffix=fv.gt_suffix, pred_suffix=fv.pred_suffix, allow_missing=fv.allow_missing,
        )
    except (OSError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    print(format_result(result))
    if fv.json:
        write_json(fv.json, result)
        print(f"wrote {fv.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
