r"""Segments any images with a trained model: train-id PNGs and colour overlays.

  python -m pipa_jax.predict --workdir runs/gta2cs --images 'frames/*.png' --out preds/
  python -m pipa_jax.predict --checkpoint ckpt/pipa_gta --config configs/gta2cs.py \
      --images 'frames/**/*.jpg' --out preds/ [--alpha 0.5] [--mode auto|whole|slide] [--noresize]

For each image `<stem>.<ext>` matched by --images (quote the pattern; `**` recurses), writes
  <out>/<stem>_trainIds.png   uint8 Cityscapes train ids (0..18), at the image's original size
  <out>/<stem>_overlay.png    the image blended with the Cityscapes palette of the prediction
The image is resized keeping its aspect ratio into the configured test size (`data.target_size`,
e.g. 1024x512 as in evaluation; mmcv's Resize(keep_ratio=True)), segmented with the config's
inference mode (`eval.mode`: whole image, or sliding windows of `eval.crop_size` every
`eval.stride`), and the logits are upsampled back to the original size before the argmax.
`--mode auto` (default) follows eval.mode, except that an image still larger than the test
size (only with --noresize) is segmented with sliding windows of the test size (stride half a
window), the input size the model was validated at. The model comes from `--workdir` (latest
checkpoint; `--which teacher`) or `--checkpoint` (a converted model directory); the test size and
inference settings from `--config` when given, else from the run's config.json (with
--checkpoint and no --config: whole images at 1024x512). Each distinct image size compiles
once (frames of one camera share a size).
"""
from __future__ import annotations

import glob
import os
import sys
import time
from typing import Sequence

import jax
import numpy as np
from absl import flags
from PIL import Image

from pipa_jax import config as config_lib
from pipa_jax import evaluate as evaluate_lib
from pipa_jax import inference
from pipa_jax import io as io_lib
from pipa_jax import labels as L
from pipa_jax.data import transforms

MODES = ("auto", "whole", "slide")
TRAIN_IDS_SUFFIX = "_trainIds.png"
OVERLAY_SUFFIX = "_overlay.png"
DEFAULT_TEST_SIZE = (1024, 512)  # Cityscapes at DAFormer's test size (long, short), when nothing else says


class PredictError(ValueError):
    """Bad inputs to prediction (images, output paths)."""


def find_images(pattern: str) -> list[str]:
    """Sorted files matched by a glob pattern (`~` expanded, `**` recursive); errors when none."""
    expanded = os.path.expanduser(pattern)
    paths = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    if not paths:
        where = os.path.abspath(os.path.dirname(expanded) or ".")
        hint = "" if os.path.isdir(where) else f" (the directory {where} does not exist)"
        raise PredictError(
            f"no images match --images {pattern!r}{hint}. Pass a glob of image files such as "
            f"'{os.path.join(where, '*.png')}', quoted so the shell does not expand it")
    stems: dict[str, str] = {}
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        if stem in stems:
            raise PredictError(
                f"{stems[stem]} and {p} would both be written as {stem}{TRAIN_IDS_SUFFIX}; predict the "
                "directories separately (one --out each) or rename one of them")
        stems[stem] = p
    return paths


def check_images(paths: Sequence[str]) -> None:
    """Cheap header check of every file, so a non-image fails before the model loads."""
    for p in paths:
        try:
            with Image.open(p) as im:
                im.size  # noqa: B018  (header only)
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
            raise PredictError(
                f"{p} is not a readable image ({type(e).__name__}: {e}); remove it from --images (narrow "
                "the pattern, e.g. '*.png') or re-export it") from e


def resize_box(c) -> tuple[int, int]:
    """(long side, short side) box images are resized into: the target's test size
    (data.target_size), or the rendered size of the synthetic target (data.image_size)."""
    data = c.data if "data" in c else {}
    if str(data.get("target", "")).startswith("synthetic"):
        h, w = (int(v) for v in data.image_size)
    elif "target_size" in data:
        h, w = (int(v) for v in data.target_size)
    else:
        h, w = DEFAULT_TEST_SIZE
    return max(h, w), min(h, w)


def plan(image_hw, c, mode: str = "auto", resize: bool = True):
    """(resize_hw, InferenceSettings) for an image of size (h, w)."""
    box = resize_box(c)
    resize_hw = transforms.rescale_size(image_hw, box) if resize else tuple(image_hw)
    settings = inference.settings_from_config(c)
    if mode == "whole" or (mode == "auto" and settings.mode == "whole"):
        larger = max(resize_hw) > max(box) or min(resize_hw) > min(box)
        if mode == "whole" or not larger:
            return resize_hw, inference.InferenceSettings("whole", settings.crop_size, settings.stride)
        # Too large for one pass at the validated scale: windows of the test size.
        win = (min(box), max(box)) if resize_hw[0] <= resize_hw[1] else (max(box), min(box))
        return resize_hw, inference.InferenceSettings("slide", win, (max(1, win[0] // 2), max(1, win[1] // 2)))
    return resize_hw, inference.InferenceSettings("slide", settings.crop_size, settings.stride)


def overlay(image: np.ndarray, train_ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 [H, W, 3]: (1 - alpha) * image + alpha * Cityscapes colour of each pixel's class."""
    colour = L.colorize(train_ids).astype(np.float32)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def predict_images(loaded, c, paths: Sequence[str], out_dir: str, *, mode: str = "auto", resize: bool = True,
                   alpha: float = 0.5, log=print) -> list[tuple[str, str]]:
    """Segments `paths` and writes the PNGs; returns [(train-id path, overlay path)]."""
    if mode not in MODES:
        raise PredictError(f"--mode {mode!r}: expected one of {MODES}")
    if not 0.0 <= alpha <= 1.0:
        raise PredictError(f"--alpha {alpha}: expected a blend weight in [0, 1]")
    os.makedirs(out_dir, exist_ok=True)
    device = jax.local_devices()[0]
    params, batch_stats = jax.device_put((loaded.params, loaded.batch_stats), device)
    step = inference.make_predict_step(loaded.graphdef)
    written = []
    for i, path in enumerate(paths):
        try:
            image = io_lib.read_image(path)
        except (OSError, ValueError) as e:
            raise PredictError(f"cannot read {path}: {e}. Remove it from --images or re-export it "
                               f"({i} of {len(paths)} images were written to {out_dir} before it)") from e
        resize_hw, settings = plan(image.shape[:2], c, mode, resize)
        # The same host resize as the evaluation data (pipa_jax.data.transforms, cv2 INTER_LINEAR).
        x = transforms.resize_bilinear(image, resize_hw) if resize_hw != image.shape[:2] else image
        pred = np.asarray(jax.device_get(step(params, batch_stats, x[None], out_hw=image.shape[:2],
                                              settings=settings)))[0]
        stem = os.path.splitext(os.path.basename(path))[0]
        ids_path = os.path.join(out_dir, stem + TRAIN_IDS_SUFFIX)
        ov_path = os.path.join(out_dir, stem + OVERLAY_SUFFIX)
        io_lib.write_label_png(ids_path, pred)
        io_lib.write_color_png(ov_path, overlay(image, pred, alpha))
        written.append((ids_path, ov_path))
        if log:
            how = settings.mode + (f" {settings.crop_size}/{settings.stride}" if settings.mode == "slide" else "")
            log(f"{path}: {image.shape[1]}x{image.shape[0]} -> {resize_hw[1]}x{resize_hw[0]} ({how}) -> {ids_path}")
    return written


def _define_flags(fv: flags.FlagValues, argv=None) -> None:
    evaluate_lib.define_model_flags(fv, argv)
    flags.DEFINE_string("images", None, "Glob of input images (quote it; ** recurses).", flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
    flags.DEFINE_enum("mode", "auto", list(MODES), "Inference mode (auto: eval.mode, windows for large images).",
                      flag_values=fv)
    flags.DEFINE_bool("resize", True, "Resize (keep ratio) into the test size (data.target_size) first; --noresize keeps "
                      "the original resolution.", flag_values=fv)
    flags.DEFINE_float("alpha", 0.5, "Palette weight in the overlay.", flag_values=fv)
    flags.mark_flags_as_required(["images", "out"], flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; `argv[0]` is the program name. Returns the exit code."""
    argv = list(sys.argv if argv is None else argv)
    prog = "python -m pipa_jax.predict"
    fv, code = evaluate_lib.parse_cli(__doc__, prog, argv, _define_flags)
    if fv is None:
        return code
    try:
        if bool(fv.workdir) == bool(fv.checkpoint):
            raise PredictError("pass exactly one of --workdir (a training run) and --checkpoint (a model directory)")
        paths = find_images(fv.images)
        check_images(paths)
        if fv.workdir:
            loaded, c = evaluate_lib.load_model_and_config(fv.workdir, None, fv.config, fv.which)
        else:
            loaded = evaluate_lib.load_checkpoint_model(fv.checkpoint, fv.which)
            c = fv.config
            if c is None:
                c = config_lib.base_config()
                c.data.target = "cityscapes"   # only its test size (data.target_size) is used
        config_lib.enable_compilation_cache(c)
        t0 = time.time()
        written = predict_images(loaded, c, paths, fv.out, mode=fv.mode, resize=fv.resize, alpha=fv.alpha)
    except (OSError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} predictions ({TRAIN_IDS_SUFFIX}, {OVERLAY_SUFFIX}) to {fv.out} "
          f"in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
