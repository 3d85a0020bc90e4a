"""Resizes with PyTorch's conventions (F.interpolate bilinear without antialias; 'nearest')."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=256)
def _interp_matrix(out_size: int, in_size: int, align_corners: bool) -> np.ndarray:
    """[out, in] linear-interpolation weights with PyTorch's coordinate conventions."""
    m = np.zeros((out_size, in_size), dtype=np.float64)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = np.arange(out_size) * scale
    else:
        # Half-pixel centres; PyTorch clamps negative source coordinates to 0.
        src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
        src = np.maximum(src, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m.astype(np.float32)


def resize_bilinear(x, size: tuple[int, int], *, align_corners: bool = False):
    """Bilinear resize of [B, H, W, C] to [B, h, w, C], equal to PyTorch's
    F.interpolate(mode='bilinear', align_corners=...) (no antialiasing).

    Written as two small matrix products: exact for both corner conventions, cheap on every
    backend, and differentiable without scatter.
    """
    h, w = size
    if (x.shape[1], x.shape[2]) == (h, w):
        return x
    mh = jnp.asarray(_interp_matrix(h, x.shape[1], align_corners), dtype=x.dtype)
    mw = jnp.asarray(_interp_matrix(w, x.shape[2], align_corners), dtype=x.dtype)
    y = jnp.einsum("oh,bhwc->bowc", mh, x)
    return jnp.einsum("pw,bowc->bopc", mw, y)


def resize_nearest(x, size: tuple[int, int]):
    """PyTorch 'nearest' resize (source index floor(i * in / out)) of [B, H, W, ...] arrays;
    used for labels."""
    h, w = size
    rows = np.floor(np.arange(h) * (x.shape[1] / h)).astype(np.int32)
    cols = np.floor(np.arange(w) * (x.shape[2] / w)).astype(np.int32)
    return x[:, rows][:, :, cols]
