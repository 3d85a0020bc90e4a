"""Convolutions: depthwise (shifted multiply-adds with a hand-written VJP on CPU), Conv2d with
matmul forms for 1x1 and patch convolutions and a per-tap filter gradient, and their inits."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from pipa_jax.models.layers.dense import matmul_last
from pipa_jax.models.layers.forms import resolve_conv_impl, resolve_dwconv_impl


def _shift_sum(x, taps, pads: tuple[int, int], dilation: int, out_hw: tuple[int, int]):
    """sum_ij pad(x)[:, i*d : i*d + oh, j*d : j*d + ow, :] * taps[i, j]: a depthwise correlation
    of x [B, H, W, C] with taps [kh, kw, C], zero padding `pads` on both sides, output `out_hw`."""
    kh, kw = taps.shape[:2]
    (ph, pw), (oh, ow), d = pads, out_hw, dilation
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out = None
    for i in range(kh):
        for j in range(kw):
            term = xp[:, i * d: i * d + oh, j * d: j * d + ow, :] * taps[i, j]
            out = term if out is None else out + term
    return out


def _same_pads(taps, dilation):
    return dilation * (taps.shape[0] // 2), dilation * (taps.shape[1] // 2)


def _out_hw(x, taps, dilation):
    (ph, pw), (kh, kw) = _same_pads(taps, dilation), taps.shape[:2]
    return x.shape[1] + 2 * ph - (kh - 1) * dilation, x.shape[2] + 2 * pw - (kw - 1) * dilation


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shift_depthwise(x, taps, dilation: int):
    """Depthwise conv (padding dilation * (k // 2)) of x [B, H, W, C] with taps [kh, kw, C] as
    shifted multiply-adds, with a hand-written VJP.

    JAX's autodiff of the shifted slices pads a full-size cotangent copy per tap and sums them;
    the VJP below instead reuses the forward's single fused loop: the input gradient is the same
    shift sum of the cotangent with the spatially flipped taps, and the tap gradient is one
    reduction per tap of (shifted input * cotangent) over batch and space.
    """
    return _shift_sum(x, taps, _same_pads(taps, dilation), dilation, _out_hw(x, taps, dilation))


def _shift_depthwise_fwd(x, taps, dilation):
    return _shift_depthwise(x, taps, dilation), (x, taps)


def _shift_depthwise_bwd(dilation, res, g):
    x, taps = res
    kh, kw = taps.shape[:2]
    ph, pw = _same_pads(taps, dilation)
    # y[h] = sum_i x[h + i*d - ph] t[i]  =>  dx[h'] = sum_i g[h' - i*d + ph] t[i]
    #       = sum_i' pad(g, lo)[h' + i'*d] t[kh-1-i'] with lo = (kh-1)*d - ph (= ph for odd kh).
    lo = ((kh - 1) * dilation - ph, (kw - 1) * dilation - pw)
    dx = _shift_sum(g, taps[::-1, ::-1], lo, dilation, (x.shape[1], x.shape[2]))
    dtaps = _tap_grads(x, g, (kh, kw), (ph, pw), dilation).astype(taps.dtype)
    return dx.astype(x.dtype), dtaps


# Rows of the cotangent per block of the tap gradient: about this many elements (1 MiB in float32).
TAP_GRAD_BLOCK_ELEMENTS = 1 << 18


def _tap_grads(x, g, ksize, pads, dilation, block_elements: int | None = None):
    """dtaps[i, j, c] = sum_{b,h,w} pad(x)[b, h + i*d, w + j*d, c] * g[b, h, w, c], in float32.

    Written as kh*kw reductions over the whole map, each tap reads x and g from memory again
    (measured on this CPU: 44 ms for a 2x128x128x128 map). Walking the rows in blocks of about
    `block_elements` cotangent values (default TAP_GRAD_BLOCK_ELEMENTS, read at trace time)
    computes all taps of a block while it is in cache (16 ms).
    Rows past the end are zero-padded in g, so they add nothing.
    """
    (kh, kw), (ph, pw), d = ksize, pads, dilation
    b, oh, ow, c = g.shape
    block_elements = TAP_GRAD_BLOCK_ELEMENTS if block_elements is None else block_elements
    rb = max(1, min(oh, block_elements // max(1, b * ow * c)))
    nb = -(-oh // rb)
    extra = nb * rb - oh
    gf = g.astype(jnp.float32)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (ph, ph + extra), (pw, pw), (0, 0)))
    if extra:
        gf = jnp.pad(gf, ((0, 0), (0, extra), (0, 0), (0, 0)))

    def block(r):
        g_blk = jax.lax.dynamic_slice_in_dim(gf, r * rb, rb, axis=1)
        rows = []
        for i in range(kh):
            band = jax.lax.dynamic_slice_in_dim(xp, r * rb + i * d, rb, axis=1)
            rows.append(jnp.stack([jnp.sum(band[:, :, j * d: j * d + ow] * g_blk, axis=(1, 2))
                                   for j in range(kw)], axis=1))
        return jnp.stack(rows, axis=1)  # [B, kh, kw, C]: the batch is summed outside the loop

    # Each block keeps the batch axis, so a batch sharded over devices needs no collective inside
    # the loop (one all-reduce after it; collectives inside the loop deadlocked XLA:CPU's 8 fake
    # devices beside the other reductions of a train step).
    if nb == 1:
        return block(0).sum(axis=0)
    return jax.lax.map(block, jnp.arange(nb)).sum(axis=(0, 1))


_shift_depthwise.defvjp(_shift_depthwise_fwd, _shift_depthwise_bwd)


def depthwise_conv2d(x, kernel, *, dilation: int = 1, impl: str = "auto"):
    """3x3-style depthwise convolution with 'same' zero padding (padding = dilation * (k // 2)).

    x: [B, H, W, C]; kernel: [kh, kw, 1, C]. Every implementation computes the same sum; the
    'shift' forms are sums of kh*kw shifted, per-channel scaled copies of the padded input.
    """
    kh, kw = kernel.shape[:2]
    ph, pw = dilation * (kh // 2), dilation * (kw // 2)
    impl = resolve_dwconv_impl(impl)
    if impl == "native":
        return jax.lax.conv_general_dilated(
            x, kernel, window_strides=(1, 1), padding=((ph, ph), (pw, pw)),
            rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )
    taps = kernel[:, :, 0, :]
    if impl == "shift":
        return _shift_depthwise(x, taps, dilation)
    return _shift_sum(x, taps, (ph, pw), dilation, _out_hw(x, taps, dilation))


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


def _pairs(v, n=2):
    return (v,) * n if isinstance(v, int) else tuple(v)


def live_taps(size: int, ksize: int, dilation: int, pad: tuple[int, int]) -> tuple[int, int]:
    """The taps [first, last] of one axis of a stride-1 convolution that read any input position.

    Output row r reads input row r + j * dilation - pad_lo through tap j, for r in [0, out). A tap
    whose every read falls in the zero padding adds nothing to the output and gets no gradient
    (a 3x3 conv with dilation 24 on a 12-row map reads only padding off its centre). Returns
    (0, ksize - 1) where every tap is live, or where none is (the output is then padding alone,
    left to the full convolution)."""
    lo, hi = pad
    out = size + lo + hi - dilation * (ksize - 1)
    live = [j for j in range(ksize) if j * dilation - lo <= size - 1 and out - 1 + j * dilation - lo >= 0]
    return (live[0], live[-1]) if live else (0, ksize - 1)


def trim_dead_taps(kernel, padding, dilation, in_hw):
    """(kernel, padding) without the taps that read only zero padding (see live_taps): the same
    output, exactly, with fewer multiplies. The padding shrinks by the dropped taps' reach, so the
    output size is unchanged; an axis whose trimmed padding would turn negative stays whole.
    kernel [kh, kw, I, O]; padding ((lo, hi), (lo, hi)); stride 1."""
    spans, pads = [], []
    for n, k, d, (lo, hi) in zip(in_hw, kernel.shape[:2], dilation, padding):
        first, last = live_taps(n, k, d, (lo, hi))
        lo2, hi2 = lo - first * d, hi - (k - 1 - last) * d
        if min(lo2, hi2) < 0:
            first, last, lo2, hi2 = 0, k - 1, lo, hi
        spans.append((first, last))
        pads.append((lo2, hi2))
    if all(span == (0, k - 1) for span, k in zip(spans, kernel.shape[:2])):
        return kernel, padding
    (a0, a1), (b0, b1) = spans
    return kernel[a0: a1 + 1, b0: b1 + 1], tuple(pads)


def _conv_native(x, kernel, padding, dilation):
    return jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=padding,
                                        rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_tap_filter_grad(x, kernel, padding, dilation):
    """Stride-1 k x k convolution (lax, NHWC / HWIO, explicit padding) whose forward and input
    gradient stay the native convolution, while the filter gradient is computed as one matrix
    product per tap: dW[i, j] = sum over positions of pad(x) shifted by (i, j) (x) g."""
    return _conv_native(x, kernel, padding, dilation)


def _conv_tap_fwd(x, kernel, padding, dilation):
    return _conv_native(x, kernel, padding, dilation), (x, kernel)


def _conv_tap_bwd(padding, dilation, res, g):
    x, kernel = res
    _, vjp_x = jax.vjp(lambda t: _conv_native(t, kernel, padding, dilation), x)
    (dx,) = vjp_x(g)
    kh, kw = kernel.shape[:2]
    (dh, dw), (oh, ow) = dilation, g.shape[1:3]
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    g2 = g.reshape(-1, g.shape[-1])

    def tap(i, j):
        # The barrier keeps XLA from fusing the shifted slice into a transposing copy (measured:
        # 295 ms per tap fused vs 112 ms as a plain slice + 2-D matmul, 1024 -> 256 on 2x128x128).
        sl = jax.lax.optimization_barrier(xp[:, i * dh: i * dh + oh, j * dw: j * dw + ow])
        return jnp.matmul(sl.reshape(-1, sl.shape[-1]).T, g2, preferred_element_type=jnp.float32)

    dkernel = jnp.stack([jnp.stack([tap(i, j) for j in range(kw)]) for i in range(kh)]).astype(kernel.dtype)
    return dx, dkernel


_conv_tap_filter_grad.defvjp(_conv_tap_fwd, _conv_tap_bwd)


class Conv2d(nnx.Conv):
    """nnx.Conv (same parameters, names, layouts and init) that computes 1x1 and
    non-overlapping patch convolutions (kernel = stride, no padding, no groups) as one matrix
    product when `impl` resolves to 'matmul' (see resolve_conv_impl); every other convolution,
    and every convolution with impl 'native', runs as the lax convolution.

    Patch form: like PyTorch's unpadded strided conv, trailing rows/columns that do not fill a
    whole patch are dropped (output floor(H / stride)). Stride-1 k x k convolutions with explicit
    padding ('taps') run natively but take their filter gradient as per-tap matmuls.

    On every backend and impl, a stride-1 convolution with explicit padding first drops the taps
    that read only zero padding for the input's size (trim_dead_taps): DeepLabV2's and ProDA's
    dilation-12/18/24 branches on a map of 12 rows are 1x1 convolutions, and run as such.
    """

    def __init__(self, *args, impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        resolve_conv_impl(impl)  # validate early
        self.impl = impl

    def _stride1_pairs(self):
        """The explicit ((lo, hi), (lo, hi)) padding of a plain stride-1 2-D convolution (no
        groups, mask or input dilation), else None."""
        if (len(tuple(self.kernel_size)) != 2 or self.feature_group_count != 1 or self.mask is not None
                or _pairs(self.input_dilation or 1) != (1, 1) or _pairs(self.strides or 1) != (1, 1)
                or isinstance(self.padding, str)):
            return None
        if isinstance(self.padding, int):
            return ((self.padding,) * 2,) * 2
        if not all(len(_pairs(q)) == 2 for q in self.padding):
            return None
        return tuple(tuple(_pairs(q)) for q in self.padding)

    def matmul_form(self, kernel_size=None, padding=None) -> str | None:
        """'pointwise' (1x1, stride 1), 'patch' (kernel = stride), 'taps' (stride-1 k x k with
        explicit padding: native forward, per-tap matmul filter gradient) or None (native).
        `kernel_size` / `padding` override the layer's own (the trimmed geometry)."""
        k = tuple(kernel_size or self.kernel_size)
        pad = self.padding if padding is None else padding
        if (len(k) != 2 or self.feature_group_count != 1 or self.mask is not None
                or _pairs(self.input_dilation or 1) != (1, 1)):
            return None
        if (k != (1, 1) and _pairs(self.strides or 1) == (1, 1) and not isinstance(pad, str)
                and all(len(_pairs(q)) == 2 for q in pad)):
            return "taps"
        if _pairs(self.strides or 1) != k:
            return None
        if isinstance(pad, str):
            zero_pad = pad.upper() == "VALID" or (pad.upper() == "SAME" and k == (1, 1))
        else:
            zero_pad = all(tuple(_pairs(q)) == (0, 0) for q in pad)
        if not zero_pad or (k != (1, 1) and _pairs(self.kernel_dilation or 1) != (1, 1)):
            return None
        return "pointwise" if k == (1, 1) else "patch"

    def __call__(self, inputs, out_sharding=None):
        if out_sharding is not None or inputs.ndim != 4:
            return super().__call__(inputs, out_sharding=out_sharding)
        kernel = self.kernel[...]
        dilation = tuple(_pairs(self.kernel_dilation or 1))
        pads = self._stride1_pairs()
        if pads is not None:
            kernel, pads = trim_dead_taps(kernel, pads, dilation, inputs.shape[1:3])
        trimmed = tuple(kernel.shape[:2]) != tuple(self.kernel_size)
        matmul = resolve_conv_impl(self.impl) == "matmul"
        form = self.matmul_form(kernel.shape[:2], pads) if matmul else None
        if form is None and not trimmed:
            return super().__call__(inputs)
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        kw = dict(precision=self.precision, preferred_element_type=self.preferred_element_type)
        if form is None:
            y = jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=pads, rhs_dilation=dilation,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)
        elif form == "taps":
            if pads is None:
                pads = tuple(tuple(_pairs(q)) for q in self.padding)
            y = _conv_tap_filter_grad(x, kernel, pads, dilation)
        elif form == "pointwise":
            y = matmul_last(x, kernel[0, 0], **kw)
        else:
            (rh, rw), (b, h, w, c) = self.kernel_size, x.shape
            oh, ow = h // rh, w // rw
            patches = x[:, :oh * rh, :ow * rw].reshape(b, oh, rh, ow, rw, c)
            y = jnp.einsum("bhiwjc,ijco->bhwo", patches, kernel, **kw)
        if bias is not None:
            y = y + bias
        return y


def conv2d(in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
           dilation: int = 1, use_bias: bool = True, impl: str = "auto", dtype=jnp.float32,
           param_dtype=jnp.float32, rngs: nnx.Rngs) -> Conv2d:
    """A Conv2d with PyTorch's explicit symmetric padding (so odd sizes give PyTorch's shapes).
    `impl`: see resolve_conv_impl (only 1x1 and kernel = stride convolutions have a matmul form)."""
    return Conv2d(
        in_ch, out_ch, (kernel_size, kernel_size), strides=(stride, stride),
        padding=((padding, padding), (padding, padding)), kernel_dilation=(dilation, dilation),
        use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=_normal_fan_out,
        precision=None, impl=impl, rngs=rngs,
    )
