"""Host-side transforms: keep-ratio resize, random crop with the 75 % class rule, flip, and
Rare Class Sampling (docs/method.md §8). All are pure functions of (example, numpy Generator), so a
grain `random_map` makes every training element a function of (seed, index).

The resizes follow the conventions of the official (mmcv / OpenCV) pipeline rather than Pillow's:
bilinear with half-pixel centres and no antialiasing (cv2.INTER_LINEAR), nearest as
floor(dst * in/out) (cv2.INTER_NEAREST). Pillow's BILINEAR would low-pass filter every downscaled
GTA frame, a small but real change to the published recipe; they are written here in NumPy
because no installed library does exactly this without TensorFlow or OpenCV.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pipa_jax import labels as L


def rescale_size(hw: tuple[int, int], size: tuple[int, int], keep_ratio: bool = True) -> tuple[int, int]:
    """Keep-ratio target (height, width) for an image of `hw` and `size` = (long, short) side:
    scale = min(long / max(h, w), short / min(h, w)); e.g. 1052x1914 with (1280, 720) -> 704x1280.
    keep_ratio=False: exactly the long x short box, the long side along the image's (DACS resizes
    GTA5 so to 720x1280)."""
    h, w = int(hw[0]), int(hw[1])
    long_side, short_side = max(size), min(size)
    if not keep_ratio:
        return (short_side, long_side) if w >= h else (long_side, short_side)
    scale = min(long_side / max(h, w), short_side / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _linear_taps(n_in: int, n_out: int):
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0.0, n_in - 1)
    x0 = np.floor(x).astype(np.intp)
    x1 = np.minimum(x0 + 1, n_in - 1)
    return x0, x1, (x - x0).astype(np.float32)


def resize_bilinear(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [h, w, C], bilinear with half-pixel centres (cv2.INTER_LINEAR)."""
    h, w = int(hw[0]), int(hw[1])
    y0, y1, fy = _linear_taps(image.shape[0], h)
    x0, x1, fx = _linear_taps(image.shape[1], w)
    # In place and with np.take: ~30 ms for a GTA frame (1052x1914 -> 704x1280), half the naive cost.
    rows = image[y0].astype(np.float32)
    below = image[y1].astype(np.float32)
    below -= rows
    below *= fy[:, None, None]
    rows += below
    out = np.take(rows, x0, axis=1)
    right = np.take(rows, x1, axis=1)
    right -= out
    right *= fx[None, :, None]
    out += right
    out += 0.5  # round half up, then truncate (values are >= 0)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def resize_nearest(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """[H, W] -> [h, w] nearest neighbour (cv2.INTER_NEAREST: source = floor(dst * in / out))."""
    h, w = int(hw[0]), int(hw[1])
    ys = np.minimum((np.arange(h) * (label.shape[0] / h)).astype(np.intp), label.shape[0] - 1)
    xs = np.minimum((np.arange(w) * (label.shape[1] / w)).astype(np.intp), label.shape[1] - 1)
    return np.ascontiguousarray(label[ys[:, None], xs[None, :]])


def crop_passes_class_rule(label: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg's rule: at least two classes (255 ignored) and none covering >= cat_max_ratio of the
    non-ignored pixels."""
    cnt = np.bincount(label.ravel(), minlength=256)[:L.IGNORE_INDEX]
    cnt = cnt[cnt > 0]
    return len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio


@dataclasses.dataclass(frozen=True)
class ValidMargins:
    """Adds ex['valid'] (uint8 [H, W]: 1 inside, 0 on the margins) to an example: HRDA's and MIC's
    pseudo-label margins (top, bottom, left, right) in pixels of the image as the source delivers it
    (Cityscapes at data.target_size; (30, 240, 30, 30) at 2048x1024), made before the crop and the
    flip so that they follow the frame (docs/method.md §3.5)."""
    margins: tuple[int, int, int, int]

    def __post_init__(self):
        if len(self.margins) != 4 or any(int(m) != m or m < 0 for m in self.margins):
            raise ValueError(f"data.target_valid_margins = {self.margins!r}: expected (top, bottom, left, right) "
                             "pixel counts >= 0")

    def __call__(self, ex):
        top, bottom, left, right = (int(m) for m in self.margins)
        h, w = ex["label"].shape[:2]
        if top + bottom >= h or left + right >= w:
            raise ValueError(f"data.target_valid_margins = {self.margins} leave nothing of a {h}x{w} target image")
        valid = np.zeros((h, w), np.uint8)
        valid[top:h - bottom, left:w - right] = 1
        return dict(ex, valid=valid)


@dataclasses.dataclass(frozen=True)
class RandomCropFlip:
    """Random crop to `crop_hw` (zero / 255 padding at the bottom / right when smaller) and a
    horizontal flip with p=0.5.

    With `cat_max_ratio` < 1 (the source domain: 0.75) a crop is redrawn up to `max_tries` times
    until it passes `crop_passes_class_rule`; as in mmseg's RandomCrop, a crop drawn after the
    last failed check is kept unchecked. An example's 'valid' mask (ValidMargins), if any, is
    cropped, padded (with 0) and flipped with the image.
    """
    crop_hw: tuple[int, int]
    flip: bool = True
    cat_max_ratio: float = 1.0
    max_tries: int = 10

    def __call__(self, ex, rng: np.random.Generator):
        img, lab, valid = ex["image"], ex["label"], ex.get("valid")
        ch, cw = self.crop_hw
        h, w = lab.shape
        if h < ch or w < cw:
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
            lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=L.IGNORE_INDEX)
            if valid is not None:
                valid = np.pad(valid, ((0, ph), (0, pw)))
            h, w = lab.shape
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        if self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                if crop_passes_class_rule(lab[y:y + ch, x:x + cw], self.cat_max_ratio):
                    break
                y = int(rng.integers(0, h - ch + 1))
                x = int(rng.integers(0, w - cw + 1))
        img, lab = img[y:y + ch, x:x + cw], lab[y:y + ch, x:x + cw]
        valid = valid[y:y + ch, x:x + cw] if valid is not None else None
        if self.flip and rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
            valid = valid[:, ::-1] if valid is not None else None
        out = {"image": np.ascontiguousarray(img), "label": np.ascontiguousarray(lab)}
        if valid is not None:
            out["valid"] = np.ascontiguousarray(valid)
        return out


def rcs_class_probs(counts: np.ndarray, temperature: float, min_pixels: int):
    """Rare Class Sampling distribution from per-image pixel counts [N, 19] (original resolution).

    f_c = (pixels of c) / (all non-ignored pixels); P(c) = softmax((1 - f_c) / T) over the classes
    that some image holds with > min_pixels pixels (the only ones that can be sampled; on the full
    GTA5 / SYNTHIA sets that is every class present, as in the official code, which asserts it).
    Returns (classes int [K], probabilities float64 [K], images per class: tuple of int arrays).
    """
    counts = np.asarray(counts, np.int64)
    if counts.ndim != 2 or counts.shape[1] != L.NUM_CLASSES:
        raise ValueError(f"class counts must be [N, {L.NUM_CLASSES}], got shape {counts.shape}")
    total = counts.sum(0).astype(np.float64)
    if total.sum() <= 0:
        raise ValueError("Rare Class Sampling: the source labels hold no labelled pixel")
    freq = total / total.sum()
    samples = [np.flatnonzero(counts[:, c] > min_pixels) for c in range(L.NUM_CLASSES)]
    classes = np.array([c for c in range(L.NUM_CLASSES) if len(samples[c])], np.int64)
    if not len(classes):
        raise ValueError(f"Rare Class Sampling: no source image holds > {min_pixels} pixels of any "
                         "class; lower config.data.rcs.min_pixels or disable RCS")
    logits = (1.0 - freq[classes]) / float(temperature)
    p = np.exp(logits - logits.max())
    return classes, p / p.sum(), tuple(samples[c] for c in classes)


class RareClassSampling:
    """grain random_map transform: element index -> a source example chosen by RCS, cropped.

    Draws a class c ~ P(c), an image uniformly among those with > min_pixels pixels of c, then
    crops it (`crop`, including the 75 % rule) and re-crops up to `max_tries` times until the crop
    holds > min_pixels * min_crop_ratio pixels of c (the image is decoded once; the official code
    reloads it through the whole pipeline, which draws the same kind of crops).
    """

    def __init__(self, source: Any, counts: np.ndarray, crop: RandomCropFlip, temperature: float,
                 min_pixels: int, min_crop_ratio: float, max_tries: int = 10):
        if len(counts) != len(source):
            raise ValueError(f"{len(counts)} class-count rows for a source of {len(source)} images")
        self.source, self.crop = source, crop
        self.classes, self.probs, self.samples = rcs_class_probs(counts, temperature, min_pixels)
        self.min_class_pixels = float(min_pixels) * float(min_crop_ratio)
        self.check_crop = float(min_crop_ratio) > 0
        self.max_tries = int(max_tries)

    def sample_image(self, rng: np.random.Generator) -> tuple[int, int]:
        """(class, image index)."""
        k = int(rng.choice(len(self.classes), p=self.probs))
        cand = self.samples[k]
        return int(self.classes[k]), int(cand[rng.integers(len(cand))])

    def __call__(self, index, rng: np.random.Generator):
        c, j = self.sample_image(rng)
        ex = self.source[j]
        out = self.crop(ex, rng)
        if self.check_crop:
            for _ in range(self.max_tries):
                if np.count_nonzero(out["label"] == c) > self.min_class_pixels:
                    break
                out = self.crop(ex, rng)
        return out
