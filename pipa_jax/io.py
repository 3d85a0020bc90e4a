"""Reading and writing images and label maps, with errors that name the file and the fix.

All decoding goes through Pillow. Every reader calls `Image.load()` inside the `try`, so a
truncated or corrupt file fails here (with its path) rather than later, deep inside a data
pipeline, with Pillow's bare "image file is truncated".

SYNTHIA caveat: SYNTHIA-RAND-CITYSCAPES labels are 16-bit RGB PNGs with the class id in the
first (R) channel. Pillow decodes 16-bit RGB PNGs to 8 bits per channel (keeping the high
byte), which turns every class id into 0. Do not read them with `read_label`; they need
OpenCV (`IMREAD_UNCHANGED`, BGR order) or pypng, in the SYNTHIA data source (docs/method.md §9).
Single-channel 16-bit PNGs (e.g. Cityscapes `*_instanceIds.png`) are fine: Pillow keeps them
as mode "I;16" and `read_label` returns them as uint16.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

import numpy as np
from PIL import Image

from pipa_jax import labels as labels_lib

_CORRUPT_HINT = "re-download or re-extract it"


def _open_loaded(path) -> Image.Image:
    """Opens and fully decodes an image file; errors name `path`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"expected an image file, got a directory: {path}")
    image = None
    try:
        image = Image.open(path)
        image.load()  # Image.open only reads the header; decoding finds truncation.
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, zlib.error, ...
        if image is not None:
            image.close()
        raise ValueError(
            f"{path} is corrupt or not an image file ({type(e).__name__}: {e}); {_CORRUPT_HINT}"
        ) from e
    return image


def read_image(path) -> np.ndarray:
    """Reads an image as uint8 RGB [H, W, 3].

    Palette ("P"), greyscale ("L", "1") and RGBA / LA images are converted to RGB (alpha is
    dropped, not composited). 16-bit or float images are rejected: they are not photographs
    this pipeline expects.
    """
    image = _open_loaded(path)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise ValueError(
            f"{os.fspath(path)}: expected an 8-bit photo (RGB, RGBA, palette or greyscale), "
            f"got Pillow mode {image.mode!r} (16-bit or float); is this a label map?"
        )
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[-1] != 3:  # Defensive: convert("RGB") guarantees it.
        raise ValueError(f"{os.fspath(path)}: expected an [H, W, 3] image, got shape {array.shape}")
    return array


def read_label(path) -> np.ndarray:
    """Reads a single-channel label map [H, W] exactly as stored (no id conversion).

    Returns uint8 for 8-bit greyscale and palette PNGs (palette indices, not colours) and
    uint16 for 16-bit greyscale PNGs. Multi-channel files (RGB colour visualisations, SYNTHIA's
    16-bit RGB labels) raise ValueError naming the path and the shape.
    """
    image = _open_loaded(path)
    path = os.fspath(path)
    if image.mode == "1":
        array = np.asarray(image, dtype=np.uint8)
    elif image.mode in ("I", "I;16", "I;16B", "I;16L"):
        array = np.asarray(image)
        if array.size and (array.min() < 0 or array.max() > 0xFFFF):
            raise ValueError(
                f"{path}: label values must lie in [0, 65535], got "
                f"[{array.min()}, {array.max()}]"
            )
        array = array.astype(np.uint16)
    else:
        array = np.asarray(image)
    if array.ndim != 2:
        raise ValueError(
            f"{path}: expected a single-channel label map [H, W], got shape {array.shape} "
            f"(Pillow mode {image.mode!r}). Label files hold one id per pixel; colour "
            f"visualisations cannot be read as labels (SYNTHIA's 16-bit RGB labels need their "
            f"own reader, see pipa_jax.io)."
        )
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: expected 8- or 16-bit label values, got dtype {array.dtype}")
    return array


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
    """A file opened beside `path` that replaces `path` when the block ends without error (flushed
    and fsynced first); on any error it is removed and `path` keeps its old content. The one way
    pipa_jax writes files (JSON, text, PNGs, arrays), so a crash never leaves a half-written one."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json_atomic(path, obj, *, indent: int | None = 2, sort_keys: bool = True, **kw) -> None:
    """JSON of `obj` (numpy scalars as floats), written atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys, default=kw.pop("default", float), **kw)


def write_npz_atomic(path, **arrays) -> None:
    """np.savez of `arrays` to `path` (which should end in .npz), written atomically."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def _write_atomic(path, image: Image.Image) -> None:
    """Saves `image` as PNG atomically (a crash mid-write never leaves a truncated PNG)."""
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")


def write_label_png(path, array) -> None:
    """Writes a label map [H, W] as a single-channel PNG, atomically.

    uint8 is written as 8-bit greyscale, uint16 as 16-bit greyscale. Other integer (or bool)
    arrays are written as 8-bit if every value fits in [0, 255]; otherwise cast to uint16
    yourself (the bit depth is never chosen from the data silently).
    """
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(
            f"{os.fspath(path)}: a label map must be 2-D [H, W], got shape {array.shape}"
        )
    if array.dtype == np.uint8:
        image = Image.fromarray(array)  # mode "L"
    elif array.dtype == np.uint16:
        image = Image.fromarray(array)  # mode "I;16"
    elif array.dtype == np.bool_ or array.dtype.kind in "iu":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"{os.fspath(path)}: label values [{array.min()}, {array.max()}] of dtype "
                f"{array.dtype} do not fit in uint8; cast to uint16 to write a 16-bit PNG"
            )
        image = Image.fromarray(array.astype(np.uint8))
    else:
        raise ValueError(
            f"{os.fspath(path)}: label maps must be integers, got dtype {array.dtype}"
        )
    _write_atomic(path, image)


def write_color_png(path, array) -> None:
    """Writes an RGB PNG atomically.

    `array` is either uint8 RGB [H, W, 3] or a train-id map [H, W], which is coloured with the
    Cityscapes palette (`pipa_jax.labels.colorize`; ignored pixels black).
    """
    array = np.asarray(array)
    if array.ndim == 2:
        if array.dtype.kind not in "iu":
            raise ValueError(
                f"{os.fspath(path)}: a train-id map must be integers, got dtype {array.dtype}"
            )
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"{os.fspath(path)}: train ids must lie in [0, 255], got "
                f"[{array.min()}, {array.max()}]"
            )
        array = labels_lib.colorize(array.astype(np.uint8))
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(
            f"{os.fspath(path)}: expected an RGB image [H, W, 3] or a train-id map [H, W], "
            f"got shape {array.shape}"
        )
    if array.dtype != np.uint8:
        raise ValueError(f"{os.fspath(path)}: RGB images must be uint8, got dtype {array.dtype}")
    _write_atomic(path, Image.fromarray(array))
