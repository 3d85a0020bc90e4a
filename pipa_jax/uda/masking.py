"""MIC's block mask (docs/method.md §7): a grid of round(H / b) x round(W / b) cells, each kept
with probability 1 - mask_ratio independently per image, nearest-upsampled to the image
(PyTorch's 'nearest': source cell floor(i * cells / H)); masked pixels become 0 in normalised
space (the dataset mean). Static shapes, jittable."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pipa_jax.models.layers import resize_nearest


def block_grid(hw, block_size: int) -> tuple[int, int]:
    """(rows, cols) of the mask grid: round(H / b), round(W / b) (Python's round, as the official
    code), at least 1."""
    return tuple(max(1, round(int(n) / int(block_size))) for n in hw)


def block_mask(key, batch: int, hw, block_size: int, mask_ratio: float) -> jax.Array:
    """float32 [B, H, W, 1]: 1 where the image is kept, 0 where it is masked. A cell is kept when
    its uniform draw exceeds mask_ratio (so mask_ratio of the cells are masked on average)."""
    rows, cols = block_grid(hw, block_size)
    keep = (jax.random.uniform(key, (batch, rows, cols)) > mask_ratio).astype(jnp.float32)
    return resize_nearest(keep, tuple(hw))[..., None]


def mask_images(key, images, block_size: int, mask_ratio: float):
    """images [B, H, W, C] (normalised) times their block mask."""
    return images * block_mask(key, images.shape[0], images.shape[1:3], block_size, mask_ratio).astype(images.dtype)
