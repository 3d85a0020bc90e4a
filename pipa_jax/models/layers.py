"""Building blocks shared by the encoder, the decoders and the PiPa heads.

Layout conventions: activations NHWC; convolution kernels [kh, kw, in / groups, out] (Flax);
linear kernels [in, out]. The converter (pipa_jax/convert.py) relies on exactly these layouts.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DWCONV_IMPLS = ("auto", "shift", "native")


def resolve_dwconv_impl(impl: str) -> str:
    """Picks the depthwise-convolution form for the current backend.

    XLA:CPU lowers grouped (depthwise) convolutions to a slow generic loop: measured here ~20x
    slower forward and ~6x slower forward+backward than the same filter written as k*k shifted
    multiply-adds, which XLA fuses into one elementwise kernel. GPU and TPU have fast native
    depthwise kernels, so 'auto' keeps the native convolution there.
    """
    if impl not in DWCONV_IMPLS:
        raise ValueError(f"dwconv_impl must be one of {DWCONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "native"
    return impl


def depthwise_conv2d(x, kernel, *, dilation: int = 1, impl: str = "auto"):
    """3x3-style depthwise convolution with 'same' zero padding (padding = dilation * (k // 2)).

    x: [B, H, W, C]; kernel: [kh, kw, 1, C]. Both implementations compute the same sum; the
    'shift' form is a sum of kh*kw shifted, per-channel scaled copies of the padded input.
    """
    kh, kw = kernel.shape[:2]
    ph, pw = dilation * (kh // 2), dilation * (kw // 2)
    if resolve_dwconv_impl(impl) == "native":
        return jax.lax.conv_general_dilated(
            x, kernel, window_strides=(1, 1), padding=((ph, ph), (pw, pw)),
            rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, i * dilation: i * dilation + h, j * dilation: j * dilation + w, :]
            term = tap * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


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


def drop_path(x, rate, rng, *, train: bool):
    """Stochastic depth per sample (timm/SegFormer semantics: x / keep * Bernoulli(keep)).

    `rate` may be a Python float or a traced scalar (blocks scanned with their rates as data).
    """
    if not train or (isinstance(rate, (int, float)) and rate == 0.0):
        return x
    if rng is None:
        raise ValueError(
            "stochastic depth is active (train=True, drop_path_rate > 0) but no rng was given; "
            "pass rng=jax.random.key(...) to the model call"
        )
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * (mask.astype(x.dtype) / keep.astype(x.dtype))


def _normal_fan_out(key, shape, dtype=jnp.float32):
    """He-normal with fan_out = kh*kw*out/groups (the SegFormer / mmcv conv init)."""
    kh, kw, _, out = shape
    std = math.sqrt(2.0 / (kh * kw * out))
    return std * jax.random.normal(key, shape, dtype)


class DepthwiseConv2d(nnx.Module):
    """Depthwise k x k convolution with 'same' padding. kernel [k, k, 1, C] (Flax grouped-conv
    layout, so the native path needs no reshape)."""

    def __init__(self, channels: int, *, kernel_size: int = 3, dilation: int = 1, use_bias: bool = True,
                 impl: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        resolve_dwconv_impl(impl)  # validate early
        shape = (kernel_size, kernel_size, 1, channels)
        std = math.sqrt(2.0 / (kernel_size * kernel_size))  # fan_out / groups = k*k
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype)) if use_bias else None
        self.dilation = dilation
        self.impl = impl
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(self.dtype)
        y = depthwise_conv2d(x, self.kernel[...].astype(self.dtype), dilation=self.dilation, impl=self.impl)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def conv2d(in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
           dilation: int = 1, use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
           rngs: nnx.Rngs) -> nnx.Conv:
    """A Conv2d with PyTorch's explicit symmetric padding (so odd sizes give PyTorch's shapes)."""
    return nnx.Conv(
        in_ch, out_ch, (kernel_size, kernel_size), strides=(stride, stride),
        padding=((padding, padding), (padding, padding)), kernel_dilation=(dilation, dilation),
        use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=_normal_fan_out,
        precision=None, rngs=rngs,
    )


def linear(in_f: int, out_f: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """Linear with the SegFormer init (truncated normal std 0.02, zero bias)."""
    return nnx.Linear(
        in_f, out_f, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.truncated_normal(stddev=0.02), rngs=rngs,
    )


def layer_norm(dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class BatchNorm(nnx.Module):
    """BatchNorm2d with PyTorch's exact semantics over NHWC inputs.

    Written here rather than taken from nnx.BatchNorm because PyTorch updates the running
    variance with the UNBIASED batch variance (n / (n - 1)) while normalising with the biased
    one; Flax uses the biased variance for both. Official checkpoints carry PyTorch statistics,
    and evaluation uses them, so training here must accumulate them the same way.
    Statistics are reduced in float32 over every axis but the last; under jit with a batch
    sharded over a mesh the reduction spans the global batch (SyncBN semantics).
    """

    def __init__(self, channels: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))
        self.eps = eps
        self.momentum = momentum
        self.dtype = dtype

    def __call__(self, x, *, use_running_average: bool):
        if use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            n = math.prod(x.shape[:-1])
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
        inv = jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        shift = self.bias[...].astype(jnp.float32) - mean * inv
        return (x.astype(jnp.float32) * inv + shift).astype(self.dtype)
