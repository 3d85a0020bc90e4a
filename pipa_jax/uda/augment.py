"""DACS strong augmentation of the mixed images (docs/method.md §3.6), on device and jittable.

Official behaviour (DAFormer ``dacs_transforms.color_jitter`` / ``gaussian_blur``, kornia 0.5.x):
- Two uniforms per training step, shared by the batch: ``u`` (colour jitter iff ``u > 0.2``) and
  ``v`` (blur iff ``v > 0.5``).
- Colour jitter = ``kornia.augmentation.ColorJitter(s, s, s, s)`` of kornia 0.5 (kornia >= 0.6
  calls these semantics ``ColorJiggle``; its ``ColorJitter`` now follows torchvision) on the
  de-normalised image in [0, 1], then re-normalised:
  brightness ``x + (b - 1)``, ``b ~ U[1-s, 1+s]``; contrast ``x * c``, ``c ~ U[1-s, 1+s]`` (no mean
  subtraction); saturation: HSV ``S * f``, ``f ~ U[1-s, 1+s]``; hue: HSV hue + ``h * 2 pi`` rad
  (wrapped), ``h ~ U[-s, s]``; each op clamps to [0, 1]; the four run in a random order.
- Gaussian blur (``kornia.filters.GaussianBlur2d``, border 'reflect') on the NORMALISED image, with
  ``sigma ~ U(0.15, 1.15)`` and kernel size per axis ``floor(ceil(0.1 n) - 0.5 + ceil(0.1 n) % 2)``.
- DAFormer calls this transform once per image (``for i in range(batch_size)``), so a fresh
  ColorJitter module draws the four factors AND the order per image, and the blur sigma is drawn
  per image; only ``u`` and ``v`` are shared. This module reproduces exactly that: per-image
  factors, per-image order, per-image sigma, one ``u`` and one ``v`` per step.
- MIC augments its masked target batch with ONE call for the whole batch: kornia then draws the
  factors per image but one order for the batch, and the blur one sigma for the batch
  (``per_image_order=False, per_image_sigma=False``).

Library use: dm-pix (``dm_pix``) supplies brightness (its additive ``adjust_brightness``; we add
the clamp), saturation (HSV scale, identical to kornia's) and hue (dm-pix measures hue in turns,
kornia in radians: we divide by 2 pi). Contrast is our own (dm-pix ``adjust_contrast`` subtracts
the mean, kornia's does not) and so is the blur (dm-pix ``gaussian_blur`` pads with zeros, uses
one square kernel and one sigma for the batch; kornia reflects, and DAFormer uses per-axis sizes
and a per-image sigma).
"""
from __future__ import annotations

import math

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from pipa_jax.labels import IMAGE_MEAN, IMAGE_STD

_TWO_PI = 2.0 * math.pi


def _per_image(factor, x, plane: bool = False):
    """Broadcast a scalar or [B] factor against x ([B, H, W, 3]); ``plane`` drops the channel."""
    factor = jnp.asarray(factor, jnp.float32)
    if factor.ndim == 0:
        return factor
    trailing = x.ndim - 1 - (1 if plane else 0)
    return factor.reshape(factor.shape + (1,) * trailing)


def _clamp01(x):
    return jnp.clip(x, 0.0, 1.0)


def adjust_brightness(x, delta):
    """kornia ``adjust_brightness``: ``clamp(x + delta, 0, 1)``; delta scalar or [B]."""
    return _clamp01(dm_pix.adjust_brightness(x, _per_image(delta, x)))


def adjust_contrast(x, factor):
    """kornia ``adjust_contrast``: ``clamp(x * factor, 0, 1)`` (no mean subtraction)."""
    return _clamp01(x * _per_image(factor, x))


def adjust_saturation(x, factor):
    """kornia ``adjust_saturation``: HSV saturation times ``factor``, clamped to [0, 1]."""
    return _clamp01(dm_pix.adjust_saturation(x, _per_image(factor, x, plane=True)))


def adjust_hue(x, hue_radians):
    """kornia ``adjust_hue``: HSV hue plus ``hue_radians`` (wrapped to one turn)."""
    turns = _per_image(hue_radians, x, plane=True) / _TWO_PI
    return _clamp01(dm_pix.adjust_hue(x, turns))


def color_jitter(x, brightness_delta, contrast, saturation, hue_radians, order):
    """The four colour ops on x ([B, H, W, 3] in [0, 1]) in a per-image order.

    Args:
      brightness_delta, contrast, saturation, hue_radians: [B] factors (kornia's ``factor - 1``
        for brightness, radians for hue).
      order: [B, 4] int, a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue) per
        image (kornia's ``params['order']``).

    Returns [B, H, W, 3] in [0, 1]. Like kornia's ColorJiggle, the input is clamped first.
    Static shapes: each of the 4 stages evaluates all 4 ops and keeps the one the image's order
    names (4x the elementwise work, negligible next to the network; SPMD-friendly). The stages
    run in a ``lax.scan`` so the ops are compiled once, not four times.
    """
    x = _clamp01(jnp.asarray(x, jnp.float32))
    order = jnp.asarray(order, jnp.int32)

    def stage(y, which):
        which = which.reshape((-1,) + (1,) * (y.ndim - 1))
        candidates = [
            adjust_brightness(y, brightness_delta),
            adjust_contrast(y, contrast),
            adjust_saturation(y, saturation),
            adjust_hue(y, hue_radians),
        ]
        return jnp.select([which == i for i in range(4)], candidates, y), None

    x, _ = jax.lax.scan(stage, x, order.T)
    return x


def blur_kernel_size(n: int) -> int:
    """DACS kernel size for an axis of n pixels: ``floor(ceil(0.1 n) - 0.5 + ceil(0.1 n) % 2)``.

    Always odd: ``ceil(0.1 n)`` if that is odd, else one less (512 -> 51, 1024 -> 103).
    """
    c = math.ceil(0.1 * n)
    return int(math.floor(c - 0.5 + c % 2))


def _gaussian_kernel1d(sigma, size: int):
    """[B, size] normalised Gaussian taps at integer offsets from the centre (kornia, odd size)."""
    offsets = jnp.arange(size, dtype=jnp.float32) - (size // 2)
    sigma = jnp.asarray(sigma, jnp.float32).reshape(-1, 1)
    taps = jnp.exp(-(offsets**2) / (2.0 * sigma**2))
    return taps / jnp.sum(taps, axis=1, keepdims=True)


def _blur_axis(x, kernel, axis: int):
    """Correlate x [B, H, W, C] along ``axis`` (1 or 2) with per-image taps [B, k], reflect pad."""
    size = kernel.shape[1]
    radius = size // 2
    if radius == 0:
        return x * kernel[:, 0].reshape(-1, 1, 1, 1)
    n = x.shape[axis]
    if radius >= n:
        raise ValueError(
            f"blur kernel of size {size} needs an image axis longer than {radius} pixels for "
            f"reflect padding, got {n}"
        )
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="reflect")  # PyTorch 'reflect' = NumPy 'reflect' (no edge repeat)
    out = jnp.zeros_like(x)
    for t in range(size):
        window = jax.lax.slice_in_dim(padded, t, t + n, axis=axis)
        out = out + kernel[:, t].reshape(-1, 1, 1, 1) * window
    return out


def gaussian_blur(x, sigma, kernel_size):
    """kornia ``gaussian_blur2d(x, kernel_size, (sigma, sigma), border_type='reflect')``.

    Args:
      x: [B, H, W, C] float images (any affine scale: the taps sum to 1).
      sigma: scalar or [B] standard deviation(s) in pixels, the same for both axes.
      kernel_size: odd int or (ky, kx) odd ints (static).
    """
    x = jnp.asarray(x, jnp.float32)
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    ky, kx = (int(k) for k in kernel_size)
    if ky % 2 == 0 or kx % 2 == 0 or ky < 1 or kx < 1:
        raise ValueError(f"blur kernel sizes must be odd and positive, got {(ky, kx)}")
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    x = _blur_axis(x, _gaussian_kernel1d(sigma, ky), axis=1)
    return _blur_axis(x, _gaussian_kernel1d(sigma, kx), axis=2)


def sample_strong_augment_params(
    key,
    batch: int,
    *,
    jitter_strength: float = 0.2,
    sigma_range=(0.15, 1.15),
    per_image_order: bool = True,
    per_image_sigma: bool = True,
):
    """Draws one step's random numbers (kornia 0.5 ColorJitter ranges; see module docstring).

    Returns a dict of arrays: ``u`` and ``v`` (scalars in [0, 1)), per image ``brightness_delta``
    (``b - 1`` with ``b ~ U[max(0, 1-s), 1+s]``), ``contrast`` and ``saturation``
    (``U[max(0, 1-s), 1+s]``), ``hue_radians`` (``U[-s, s] * 2 pi``, s capped at 0.5), ``order``
    ([B, 4] permutations) and ``sigma`` (``U(sigma_range)``). With ``per_image_order`` /
    ``per_image_sigma`` False, every image takes the first image's order / sigma (one batch call).
    """
    s = float(jitter_strength)
    lo = max(0.0, 1.0 - s)
    hue = min(s, 0.5)
    key_step, key_image = jax.random.split(key)
    u, v = jax.random.uniform(key_step, (2,), jnp.float32)
    # One draw for every per-image number (fewer RNG calls compile faster); an argsort of
    # uniforms is a uniformly random permutation.
    r = jax.random.uniform(key_image, (batch, 9), jnp.float32)
    scale = lambda col, a, b: a + (b - a) * r[:, col]  # noqa: E731
    return {
        "u": u,
        "v": v,
        "brightness_delta": scale(0, lo, 1.0 + s) - 1.0,
        "contrast": scale(1, lo, 1.0 + s),
        "saturation": scale(2, lo, 1.0 + s),
        "hue_radians": scale(3, -hue, hue) * _TWO_PI,
        "sigma": _shared(scale(4, float(sigma_range[0]), float(sigma_range[1])), per_image_sigma),
        "order": _shared(jnp.argsort(r[:, 5:9], axis=1).astype(jnp.int32), per_image_order),
    }


def _shared(values, per_image: bool):
    """values [B, ...], or the first row for every image."""
    return values if per_image else jnp.broadcast_to(values[:1], values.shape)


def apply_strong_augment(
    images,
    params,
    *,
    jitter_p: float = 0.2,
    blur_p: float = 0.5,
    blur: bool = True,
    mean=IMAGE_MEAN,
    std=IMAGE_STD,
):
    """Applies colour jitter (iff ``u > jitter_p``) then blur (iff ``v > blur_p`` and ``blur``).

    Args:
      images: [B, H, W, 3] images normalised with ``mean``/``std`` on the RGB 0..255 scale.
      params: from :func:`sample_strong_augment_params`.

    Returns [B, H, W, 3] float32 normalised images. Skipped ops leave the input bit-exact.
    """
    x = jnp.asarray(images, jnp.float32)
    mean = jnp.asarray(np.asarray(mean, np.float32))
    std = jnp.asarray(np.asarray(std, np.float32))

    def jitter(y):
        y01 = (y * std + mean) / 255.0
        y01 = color_jitter(
            y01,
            params["brightness_delta"],
            params["contrast"],
            params["saturation"],
            params["hue_radians"],
            params["order"],
        )
        return (y01 * 255.0 - mean) / std

    x = jax.lax.cond(params["u"] > jitter_p, jitter, lambda y: y, x)
    if blur:
        # DAFormer blurs the re-normalised image; the taps sum to 1, so this equals blurring in
        # [0, 1] and re-normalising.
        kernel_size = (blur_kernel_size(x.shape[1]), blur_kernel_size(x.shape[2]))
        x = jax.lax.cond(
            params["v"] > blur_p,
            lambda y: gaussian_blur(y, params["sigma"], kernel_size),
            lambda y: y,
            x,
        )
    return x


def strong_augment(
    key,
    images,
    *,
    jitter_p: float = 0.2,
    jitter_strength: float = 0.2,
    blur_p: float = 0.5,
    sigma_range=(0.15, 1.15),
    blur: bool = True,
    mean=IMAGE_MEAN,
    std=IMAGE_STD,
    per_image_order: bool = True,
    per_image_sigma: bool = True,
):
    """DACS strong transform of normalised images [B, H, W, 3] (see the module docstring)."""
    params = sample_strong_augment_params(
        key, images.shape[0], jitter_strength=jitter_strength, sigma_range=sigma_range,
        per_image_order=per_image_order, per_image_sigma=per_image_sigma,
    )
    return apply_strong_augment(
        images, params, jitter_p=jitter_p, blur_p=blur_p, blur=blur, mean=mean, std=std
    )
