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

DWCONV_IMPLS = ("auto", "shift", "shift_autodiff", "native")
CONV_IMPLS = ("auto", "matmul", "native")
ATTENTION_IMPLS = ("auto", "chunked", "dense")
# Query rows per attention chunk are chosen so that one (image, head) pair's logits in a chunk
# hold at most this many elements (2048 rows x 256 keys). Measured on this CPU (2 cores, MiT-b5
# at 512x512, batch 2, forward + backward), this rule with the heads folded into the batch vs the
# earlier form (heads in the middle, about 2^20 logits of all images and heads a chunk):
# stage 1 (16384 queries, 1 head) 67 vs 81 ms, stage 3 (1024 queries, 5 heads, now unchunked)
# 19 vs 34 ms, stage 2 32 ms both. Rows of 1024 or 4096 at stage 1 took 72-75 ms.
ATTENTION_CHUNK_ELEMENTS = 1 << 19


def resolve_dwconv_impl(impl: str) -> str:
    """Picks the depthwise-convolution form for the current backend.

    XLA:CPU lowers grouped (depthwise) convolutions to a slow generic loop: measured here ~20x
    slower forward and ~6x slower forward+backward than the same filter written as k*k shifted
    multiply-adds, which XLA fuses into one elementwise kernel. GPU and TPU have fast native
    depthwise kernels, so 'auto' keeps the native convolution there.

    'shift' carries a hand-written VJP (see `_shift_depthwise`); 'shift_autodiff' is the same
    forward left to JAX's autodiff, kept only to measure and test the VJP against: its backward
    pads one cotangent copy per tap (b5 encoder gradient 1.5x slower, 1.5x the temp memory).
    """
    if impl not in DWCONV_IMPLS:
        raise ValueError(f"dwconv_impl must be one of {DWCONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "native"
    return impl


def resolve_conv_impl(impl: str) -> str:
    """Picks how 1x1 convolutions, non-overlapping patch convolutions (kernel = stride, no
    padding: the attention's spatial reduction) and the filter gradient of stride-1 k x k
    convolutions are computed.

    On XLA:CPU a convolution's gradient is much slower than the same contraction written as a
    matrix product (measured: 1x1 conv 1024->256 on 2x128x128, gradient 0.93 s as a conv, 0.26 s
    as a dot; the sr=8 reduction's filter gradient runs as a 16x16-window dilated convolution;
    the filter gradient of DAFormer's 3x3 bottleneck, 1024->256 on 2x128x128, takes 4.2 s as a
    conv and about 0.7 s as 9 tap matmuls), so 'auto' takes 'matmul' there and keeps the native
    convolution on GPU/TPU. Strided k x k convolutions (the patch embeddings) stay native.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "matmul" if jax.default_backend() == "cpu" else "native"
    return impl


def resolve_attention_impl(impl: str) -> str:
    """Picks how softmax attention is computed.

    'dense' materialises the [B, heads, N, M] logits and probabilities and leaves the backward
    pass to autodiff, which keeps the probabilities as residuals. On XLA:CPU that form is memory
    bound: at MiT stage 1 (N = 16384 queries, M = 256 reduced keys) it moves several 32 MB arrays
    per pass. 'chunked' (see `attention`) folds the heads into the batch (3-D dots, no
    transposing copies) and walks the queries in chunks (attention_chunk_size) with a
    hand-written VJP that recomputes the probabilities from the saved log-sum-exp, so memory is
    linear in N. 'auto' takes 'chunked' on CPU and 'dense' on GPU/TPU, whose fused attention
    kernels are fast and whose memory holds the logits easily (M is only 256).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "chunked" if jax.default_backend() == "cpu" else "dense"
    return impl


def attention_chunk_size(n: int, m: int, elements: int = ATTENTION_CHUNK_ELEMENTS) -> int:
    """Query rows per chunk: n itself when n * m <= `elements`, else the largest power of two
    (>= 64) whose logits [chunk, m] per (image, head) hold at most `elements` values."""
    if n * m <= elements:
        return n
    chunk = 64
    while (2 * chunk) * m <= elements and 2 * chunk < n:
        chunk *= 2
    return chunk


def _dense_attention(q, k, v, scale):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * scale, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _fold_heads(x):
    """[B, n, heads, d] -> [B * heads, n, d]: one independent attention problem per leading index.
    XLA:CPU runs these 3-D batched dots 1.5-4x faster than the same dots with the heads axis in
    the middle (measured at MiT stage 1: forward 11 vs 42 ms), which need transposing copies."""
    b, n, h, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * h, n, d)


def _chunk_rows(x, chunk):
    """[G, n, ...] -> [n / chunk, G, chunk, ...] (n must be a multiple of chunk)."""
    g, n = x.shape[:2]
    return x.reshape(g, n // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)


def _unchunk_rows(x):
    x = x.swapaxes(0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _logits(qs, k):
    """Logits of the pre-scaled queries qs = q * scale: scaling q [G, n, d] instead of the logits
    [G, n, m] keeps a full-size multiply (and, on XLA:CPU, a materialised broadcast of the scale
    feeding the YNNPACK dot fusion) out of both passes."""
    return jnp.einsum("gqd,gkd->gqk", qs, k, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_attention(q, k, v, scale: float, chunk: int):
    return _chunked_attention_fwd(q, k, v, scale, chunk)[0]


def _chunked_attention_fwd(q, k, v, scale, chunk):
    """q [G, n, d], k and v [G, m, d] (heads folded into G). Saves q, k, v, the output and the
    log-sum-exp of each row's logits; the probabilities are recomputed in the backward pass."""
    def one(qc):
        logits = _logits(qc * scale, k)
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - top)
        total = jnp.sum(e, axis=-1, keepdims=True)
        # Normalise before the value product: dividing its [chunk, d] result instead was 3x slower
        # on XLA:CPU (stage 1 forward, 32 vs 11 ms), as the division stops the fusions around it.
        out = jnp.einsum("gqk,gkd->gqd", (e / total).astype(v.dtype), v)
        return out, (top + jnp.log(total))[..., 0]

    if chunk >= q.shape[1]:
        out, lse = one(q)
    else:
        out, lse = jax.lax.map(one, _chunk_rows(q, chunk))  # lse stays chunked: [n / chunk, G, chunk]
        out = _unchunk_rows(out)
    return out, (q, k, v, out, lse)


def _chunked_attention_bwd(scale, chunk, res, g):
    q, k, v, out, lse = res

    def one(qc, gc, oc, lc):
        qs = qc * scale
        probs = jnp.exp(_logits(qs, k) - lc[..., None])                    # [G, c, m] float32
        dv = jnp.einsum("gqk,gqd->gkd", probs.astype(gc.dtype), gc, preferred_element_type=jnp.float32)
        dp = jnp.einsum("gqd,gkd->gqk", gc, v, preferred_element_type=jnp.float32)
        delta = jnp.sum(gc.astype(jnp.float32) * oc.astype(jnp.float32), axis=-1)
        ds = (probs * (dp - delta[..., None])).astype(q.dtype)  # d(loss) / d(logits)
        dq = jnp.einsum("gqk,gkd->gqd", ds, k, preferred_element_type=jnp.float32) * scale
        dk = jnp.einsum("gqk,gqd->gkd", ds, qs, preferred_element_type=jnp.float32)
        return dq, dk, dv

    if chunk >= q.shape[1]:
        dq, dk, dv = one(q, g, out, lse)
    else:
        def body(carry, inp):
            dq, dk, dv = one(*inp)
            return (carry[0] + dk, carry[1] + dv), dq

        zeros = jnp.zeros(k.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(body, (zeros, zeros),
                                    (_chunk_rows(q, chunk), _chunk_rows(g, chunk), _chunk_rows(out, chunk), lse))
        dq = _unchunk_rows(dq)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)


def attention(q, k, v, *, impl: str = "auto", chunk: int | None = None):
    """softmax(q k^T / sqrt(d)) v per head. q [B, N, heads, d], k and v [B, M, heads, d] ->
    [B, N, heads, d]. Logits and softmax are computed in float32 whatever the input dtype.

    'chunked' (see resolve_attention_impl) folds the heads into the batch and computes the same
    values in chunks of `chunk` query rows (default: attention_chunk_size), padding N up to a
    multiple of the chunk with zero rows whose outputs are dropped (their cotangents are zero, so
    they add nothing to dk, dv).
    """
    scale = q.shape[-1] ** -0.5
    if resolve_attention_impl(impl) == "dense":
        return _dense_attention(q, k, v, scale)
    b, n, h, d = q.shape
    chunk = int(chunk) if chunk is not None else attention_chunk_size(n, k.shape[1])
    if chunk < 1:
        raise ValueError(f"attention chunk must be >= 1, got {chunk}")
    q, k, v = _fold_heads(q), _fold_heads(k), _fold_heads(v)
    pad = (-n) % chunk if chunk < n else 0
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0)))
    out = _chunked_attention(q, k, v, scale, min(chunk, q.shape[1]))[:, :n]
    return out.reshape(b, h, n, d).transpose(0, 2, 1, 3)


def gelu_erf(x):
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), PyTorch's nn.GELU() formula. jax.nn.gelu
    (approximate=False) evaluates it through erfc, which XLA:CPU computes 2.4x slower (measured:
    4.4 vs 1.8 ms on 2x128x128x128); both are within 1.1e-6 of a float64 reference."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


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


def _pairs(v, n=2):
    return (v,) * n if isinstance(v, int) else tuple(v)


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
    """

    def __init__(self, *args, impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        resolve_conv_impl(impl)  # validate early
        self.impl = impl

    def matmul_form(self) -> str | None:
        """'pointwise' (1x1, stride 1), 'patch' (kernel = stride), 'taps' (stride-1 k x k with
        explicit padding: native forward, per-tap matmul filter gradient) or None (native)."""
        k = tuple(self.kernel_size)
        if (len(k) != 2 or self.feature_group_count != 1 or self.mask is not None
                or _pairs(self.input_dilation or 1) != (1, 1)):
            return None
        pad = self.padding
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
        form = self.matmul_form() if resolve_conv_impl(self.impl) == "matmul" else None
        if form is None or out_sharding is not None or inputs.ndim != 4:
            return super().__call__(inputs, out_sharding=out_sharding)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        kw = dict(precision=self.precision, preferred_element_type=self.preferred_element_type)
        if form == "taps":
            pads = tuple(tuple(_pairs(q)) for q in self.padding)
            y = _conv_tap_filter_grad(x, kernel, pads, tuple(_pairs(self.kernel_dilation or 1)))
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


def matmul_last(x, kernel, **kw):
    """x [..., K] @ kernel [K, N] -> [..., N] as one 2-D dot over the flattened leading axes.

    The same product written as a dot contracting x's last axis keeps the leading axes, and then
    XLA:CPU emits the weight gradient (x^T g, contracting over all of them) behind a transposing
    copy of the cotangent g (a full activation-sized copy per layer). Measured on MiT-b5's
    stage-3 fc1 (2x32x32x320 @ 320x1280, AMD EPYC, 2 cores): forward + backward 100 ms as a 4-D
    dot, 50 ms as a 2-D one. Flattening is a free reshape on every backend and keeps a
    batch-sharded leading axis sharded.
    """
    lead = x.shape[:-1]
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())), **kw)
    return y.reshape(*lead, kernel.shape[-1])


class Linear(nnx.Linear):
    """nnx.Linear (same parameters, names, init and dtype promotion) computed with matmul_last."""

    def __call__(self, inputs, out_sharding=None):
        if out_sharding is not None or inputs.ndim <= 2 or self.dot_general is not jax.lax.dot_general:
            return super().__call__(inputs, out_sharding=out_sharding)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = matmul_last(x, kernel, precision=self.precision, preferred_element_type=self.preferred_element_type)
        return y if bias is None else y + bias


def linear(in_f: int, out_f: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """Linear with the SegFormer init (truncated normal std 0.02, zero bias)."""
    return Linear(
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
