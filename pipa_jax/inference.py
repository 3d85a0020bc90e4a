"""Test-time inference as the papers evaluate: whole-image or sliding-window logits, upsampled
to the full-resolution ground truth before the argmax, scored with one dataset-level confusion
matrix (docs/method.md §6, §8).

Used by the in-training evaluation (train.evaluate), `python -m pipa_jax.evaluate` and
`python -m pipa_jax.predict`, so all three see the same numbers.

What mmseg (the official code's test path) does, and this module reproduces:
- whole: logits at stride 4 -> bilinear (half-pixel centres) to the network input size ->
  bilinear to the original (ground-truth) size -> argmax. The two resizes are kept, not fused
  into one, because the official numbers were produced that way.
- slide: windows of `crop_size` placed every `stride` pixels (the last row / column of
  windows is shifted back to end at the image border; an image smaller than the window is one
  window of its own size). Each window's logits are resized to the window size, summed into
  an image-sized map, divided by the number of windows covering each pixel, then resized to
  the original size. Window positions depend only on static shapes, so the count map is a
  NumPy constant and the windows run in a `lax.scan`: the network compiles once, whatever
  the number of windows.
Everything is shape-static: one compilation per (batch shape, label shape, settings).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipa_jax import labels as L
from pipa_jax import metrics as metrics_lib
from pipa_jax.models import layers

MODES = ("whole", "slide")

ApplyFn = Callable[[jax.Array], jax.Array]  # normalised [N, h, w, 3] -> logits [N, h', w', K]


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """How logits are computed for one image (hashable: a static jit argument).

    mode: 'whole' (the network sees the whole test-size image) or 'slide' (windows of
      `crop_size` (height, width) every `stride` (height, width) pixels, logits averaged).
    """
    mode: str = "whole"
    crop_size: tuple[int, int] = (1024, 1024)
    stride: tuple[int, int] = (512, 512)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"eval.mode = {self.mode!r}: expected one of {MODES}")
        crop, stride = _pair("eval.crop_size", self.crop_size), _pair("eval.stride", self.stride)
        object.__setattr__(self, "crop_size", crop)
        object.__setattr__(self, "stride", stride)
        if self.mode == "slide" and (stride[0] > crop[0] or stride[1] > crop[1]):
            raise ValueError(
                f"eval.stride = {stride} is larger than eval.crop_size = {crop}: some pixels would be "
                "covered by no window; use a stride no larger than the window (e.g. half of it)")


def _pair(name, value) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} = {value!r}: expected (height, width) positive integers") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} = {value!r}: expected (height, width) positive integers")
    return h, w


def settings_from_config(c) -> InferenceSettings:
    """The `eval` group of a run config (pipa_jax.config) as InferenceSettings."""
    ev = c.get("eval") if hasattr(c, "get") else None
    if ev is None:  # configs written before the eval group existed: whole-image inference
        return InferenceSettings()
    return InferenceSettings(str(ev.mode), tuple(ev.crop_size), tuple(ev.stride))


# ----------------------------------------------------------------------------- window geometry

def window_grid(image_hw: Sequence[int], crop_hw: Sequence[int],
                stride_hw: Sequence[int]) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Sliding-window layout (mmseg slide_inference): ((win_h, win_w), [(y1, x1), ...]) in
    row-major window order. Windows are min(crop, image) in size and lie inside the image."""
    (h, w), (ch, cw), (sh, sw) = image_hw, crop_hw, stride_hw
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    offsets = []
    for r in range(rows):
        for q in range(cols):
            y2, x2 = min(r * sh + ch, h), min(q * sw + cw, w)
            offsets.append((max(y2 - ch, 0), max(x2 - cw, 0)))
    return (min(ch, h), min(cw, w)), offsets


def count_map(image_hw: Sequence[int], crop_hw: Sequence[int], stride_hw: Sequence[int]) -> np.ndarray:
    """int32 [H, W]: how many windows cover each pixel (>= 1 everywhere when stride <= crop)."""
    (wh, ww), offsets = window_grid(image_hw, crop_hw, stride_hw)
    count = np.zeros(tuple(image_hw), np.int32)
    for y, x in offsets:
        count[y:y + wh, x:x + ww] += 1
    return count


# ----------------------------------------------------------------------------- logits

def _logits_at(apply_fn: ApplyFn, x, size):
    return layers.resize_bilinear(apply_fn(x).astype(jnp.float32), size)


def whole_logits(apply_fn: ApplyFn, x) -> jax.Array:
    """Normalised images [B, H, W, 3] -> float32 logits [B, H, W, K] at the input size."""
    return _logits_at(apply_fn, x, x.shape[1:3])


def slide_logits(apply_fn: ApplyFn, x, crop_hw, stride_hw) -> jax.Array:
    """Normalised images [B, H, W, 3] -> float32 logits [B, H, W, K]: the mean of the logits
    of every window covering a pixel (windows: `window_grid`)."""
    b, h, w, _ = x.shape
    (wh, ww), offsets = window_grid((h, w), crop_hw, stride_hw)
    if len(offsets) == 1:
        y, x1 = offsets[0]
        return _logits_at(apply_fn, x[:, y:y + wh, x1:x1 + ww], (wh, ww))
    k = jax.eval_shape(lambda a: apply_fn(a), jax.ShapeDtypeStruct((b, wh, ww, 3), x.dtype)).shape[-1]
    starts = jnp.asarray(offsets, jnp.int32)

    def body(acc, yx):
        y, x1 = yx[0], yx[1]
        window = jax.lax.dynamic_slice(x, (0, y, x1, 0), (b, wh, ww, x.shape[3]))
        logits = _logits_at(apply_fn, window, (wh, ww))
        part = jax.lax.dynamic_slice(acc, (0, y, x1, 0), (b, wh, ww, k))
        return jax.lax.dynamic_update_slice(acc, part + logits, (0, y, x1, 0)), None

    acc, _ = jax.lax.scan(body, jnp.zeros((b, h, w, k), jnp.float32), starts)
    count = count_map((h, w), crop_hw, stride_hw).astype(np.float32)
    return acc / jnp.asarray(count)[None, :, :, None]


def image_logits(apply_fn: ApplyFn, x, settings: InferenceSettings) -> jax.Array:
    """Logits [B, H, W, K] at the network-input size, by `settings.mode`."""
    if settings.mode == "slide":
        return slide_logits(apply_fn, x, settings.crop_size, settings.stride)
    return whole_logits(apply_fn, x)


def full_resolution_logits(apply_fn: ApplyFn, x, out_hw, settings: InferenceSettings) -> jax.Array:
    """Logits at the input size, then bilinearly resized to `out_hw` (e.g. the full-resolution
    ground truth): float32 [B, out_h, out_w, K]."""
    return layers.resize_bilinear(image_logits(apply_fn, x, settings), tuple(out_hw))


def model_apply(graphdef, params, batch_stats) -> ApplyFn:
    """The segmentor's `infer_logits` in evaluation mode (running BatchNorm statistics, no
    dropout): logits at the input size (HRDA: both scales, the detail branch sliding)."""
    model = nnx.merge(graphdef, params, batch_stats)
    return lambda x: model.infer_logits(x)


# ----------------------------------------------------------------------------- jitted steps

# The jitted functions take the model's GraphDef as a static argument (GraphDefs of equal
# architectures compare and hash equal), so every caller in a process (the trainer, the CLIs,
# notebooks) shares one compilation per (architecture, shapes, settings).

@functools.partial(jax.jit, static_argnames=("graphdef", "settings", "return_predictions"))
def _eval_step(graphdef, params, batch_stats, images, labels, *, settings, return_predictions):
    apply_fn = model_apply(graphdef, params, batch_stats)
    logits = full_resolution_logits(apply_fn, L.normalize(images), labels.shape[1:3], settings)
    pred = jnp.argmax(logits, axis=-1)
    conf = metrics_lib.confusion_matrix(pred, labels, num_classes=L.NUM_CLASSES)
    if return_predictions:
        return conf, pred.astype(jnp.uint8)
    return conf


def make_eval_step(graphdef):
    """`(params, batch_stats, images uint8 [B,h,w,3], labels [B,H,W], *, settings,
    return_predictions=False) -> confusion int32 [19, 19]` (and the uint8 predictions [B, H, W]
    at the labels' size when `return_predictions`), jitted. Compiles once per shapes and
    settings; images and labels may be sharded over the batch."""

    def eval_step(params, batch_stats, images, labels, *, settings: InferenceSettings = InferenceSettings(),
                  return_predictions: bool = False):
        return _eval_step(graphdef, params, batch_stats, images, labels, settings=settings,
                          return_predictions=return_predictions)

    return eval_step


@functools.partial(jax.jit, static_argnames=("graphdef", "out_hw", "settings"))
def _predict_step(graphdef, params, batch_stats, images, *, out_hw, settings):
    apply_fn = model_apply(graphdef, params, batch_stats)
    logits = full_resolution_logits(apply_fn, L.normalize(images), tuple(out_hw), settings)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


def make_predict_step(graphdef):
    """`(params, batch_stats, images uint8 [B, h, w, 3], *, out_hw, settings) -> train ids
    uint8 [B, out_h, out_w]`, jitted: logits at the input size (whole or sliding window),
    bilinearly resized to `out_hw` (e.g. the image's original size), then the argmax."""

    def predict_step(params, batch_stats, images, *, out_hw, settings: InferenceSettings = InferenceSettings()):
        return _predict_step(graphdef, params, batch_stats, images, out_hw=tuple(out_hw), settings=settings)

    return predict_step


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class EvalBatch:
    images: np.ndarray     # uint8 [b, h, w, 3]: this process's share of a global batch
    labels: np.ndarray     # uint8 [b, H, W] train ids at full resolution (255 in padding)
    names: list            # frame ids of the real (non-padding) examples of this share
    num_valid: int         # real examples in this share (the rest is padding)


def _example_name(ex, index):
    name = ex.get("name") if isinstance(ex, dict) else None
    return str(name) if name is not None else f"{index:06d}"


def _check_example(ex, index):
    if not isinstance(ex, dict) or "image" not in ex or "label" not in ex:
        raise ValueError(f"evaluation example {index} must be a dict with 'image' and 'label', got "
                         f"{type(ex).__name__} {sorted(ex) if isinstance(ex, dict) else ''}")
    img, lab = np.asarray(ex["image"]), np.asarray(ex["label"])
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"evaluation example {index} ({_example_name(ex, index)}): expected a uint8 image "
                         f"[H, W, 3], got {img.dtype} {img.shape}")
    if lab.ndim != 2:
        raise ValueError(f"evaluation example {index} ({_example_name(ex, index)}): expected a label map "
                         f"[H, W] of train ids, got shape {lab.shape}")
    return img, lab.astype(np.uint8) if lab.dtype != np.uint8 else lab


def eval_batches(source, batch_size: int, *, num_threads: int = 2, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[EvalBatch]:
    """Batches of a random-access source of {'image', 'label'[, 'name']} examples, in order.

    `batch_size` is global; each process gets its contiguous share. Consecutive examples with
    the same (image, label) shapes share a batch; a shape change or the end of the data closes
    the batch, which is then padded (zero images, ignored labels) to `batch_size`, so every
    batch has a static shape (one compilation per distinct shape). Examples are read by
    `num_threads` host threads ahead of use.
    """
    pid = jax.process_index() if process_index is None else process_index
    n_proc = jax.process_count() if process_count is None else process_count
    if batch_size % n_proc:
        raise ValueError(f"evaluation batch size {batch_size} is not a multiple of the {n_proc} processes")
    local = batch_size // n_proc
    n = len(source)

    def emit(group):
        imgs = np.stack([g[1] for g in group])
        labs = np.stack([g[2] for g in group])
        pad = batch_size - len(group)
        if pad:
            imgs = np.concatenate([imgs, np.zeros((pad,) + imgs.shape[1:], np.uint8)])
            labs = np.concatenate([labs, np.full((pad,) + labs.shape[1:], L.IGNORE_INDEX, np.uint8)])
        lo, hi = pid * local, (pid + 1) * local
        names = [g[0] for g in group][lo:hi]
        return EvalBatch(imgs[lo:hi], labs[lo:hi], names, len(names))

    def load(i):
        ex = source[i]
        img, lab = _check_example(ex, i)
        return _example_name(ex, i), img, lab

    group = []
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        ahead = max(2 * batch_size, 4)
        futures = [pool.submit(load, i) for i in range(min(ahead, n))]
        for i in range(n):
            item = futures[i].result()
            futures[i] = None
            if i + ahead < n:
                futures.append(pool.submit(load, i + ahead))
            if group and (item[1].shape != group[0][1].shape or item[2].shape != group[0][2].shape):
                yield emit(group)
                group = []
            group.append(item)
            if len(group) == batch_size:
                yield emit(group)
                group = []
        if group:
            yield emit(group)


def _process_local_rows(x) -> np.ndarray:
    """This process's rows of a batch-sharded array, in batch order (all rows on one host)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    rows = {}
    for shard in x.addressable_shards:
        rows.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(rows[k]) for k in sorted(rows)])


def evaluate_source(eval_step, params, batch_stats, source, batch_size: int, settings: InferenceSettings, *,
                    sharding=None, on_predictions=None, num_threads: int = 2) -> tuple[np.ndarray, int]:
    """Dataset-level confusion matrix int64 [19, 19] of a model over `source`, and the number of
    examples. `on_predictions(names, preds uint8 [b, H, W])` (optional) receives this process's
    full-resolution predictions batch by batch (e.g. to write PNGs)."""
    conf = np.zeros((L.NUM_CLASSES, L.NUM_CLASSES), np.int64)
    count = 0
    want_preds = on_predictions is not None
    pending = None  # the previous batch's matrix: fetched after the next batch is dispatched
    for batch in eval_batches(source, batch_size, num_threads=num_threads):
        imgs, labs = batch.images, batch.labels
        if sharding is not None:
            imgs = jax.make_array_from_process_local_data(sharding, imgs)
            labs = jax.make_array_from_process_local_data(sharding, labs)
        out = eval_step(params, batch_stats, imgs, labs, settings=settings, return_predictions=want_preds)
        if want_preds:
            out, preds = out
            on_predictions(batch.names, _process_local_rows(preds)[:batch.num_valid])
        if pending is not None:
            conf += np.asarray(jax.device_get(pending), np.int64)
        pending = out
        count += batch.num_valid
    if pending is not None:
        conf += np.asarray(jax.device_get(pending), np.int64)
    return conf, count
