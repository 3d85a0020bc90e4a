"""The CPU fast forms compute exactly what the native lax convolutions and the dense attention
compute, values and gradients: the depthwise shift conv with its hand-written VJP (and its
row-blocked tap gradient), 1x1 convs and the attention's kernel = stride spatial reduction as
matmuls, linear layers as one 2-D dot, the per-tap filter gradient of stride-1 k x k convs, the
chunked attention with its hand-written VJP, the erf GELU, and the remat option; then the whole
Segmentor with every fast form against every native form (jit, scanned stages, sharded batch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pipa_jax.models import build_segmentor, layers
from pipa_jax.models.layers import ComputeForms
from pipa_jax.models.mit import MiTVariant, MixVisionTransformer, resolve_scan_blocks
from test_convert import small_config  # the same small b0 Segmentor config

F32 = dict(rtol=1e-5, atol=1e-5)


def normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol)


def module_vjp(module, x, seed):
    """Output, and gradients w.r.t. every parameter and the input, of <module(x), cotangent>."""
    graphdef, params = nnx.split(module)

    def f(params, x):
        return nnx.merge(graphdef, params)(x)

    y, pull = jax.vjp(jax.jit(f), params, x)
    grads = pull(normal(seed, y.shape, y.dtype))
    return y, grads


# ---- depthwise 3x3 (and 5x5) conv: shift with custom VJP vs native grouped conv --------------

@pytest.mark.parametrize("shape,kernel_size,dilation", [
    ((2, 7, 9, 5), 3, 1),      # odd sizes
    ((1, 8, 6, 4), 3, 2),
    ((2, 11, 13, 3), 3, 6),    # ASPP dilation
    ((1, 7, 9, 3), 3, 12),     # dilation larger than the map: most taps read padding
    ((2, 9, 7, 4), 5, 1),      # wider kernel
])
def test_depthwise_shift_vjp_matches_native(shape, kernel_size, dilation):
    x = normal(0, shape)
    results = {}
    for impl in ("shift", "shift_autodiff", "native"):
        m = layers.DepthwiseConv2d(shape[-1], kernel_size=kernel_size, dilation=dilation, impl=impl,
                                   rngs=nnx.Rngs(3))
        m.bias[...] = normal(4, m.bias.shape)
        results[impl] = module_vjp(m, x, seed=5)
    y, (g_params, g_x) = results["shift"]
    for other in ("native", "shift_autodiff"):
        y_o, (gp_o, gx_o) = results[other]
        np.testing.assert_allclose(y, y_o, **F32)
        np.testing.assert_allclose(g_x, gx_o, **F32)
        # Kernel gradients sum over batch and space: absolute tolerance scaled by that count.
        np.testing.assert_allclose(g_params["kernel"][...], gp_o["kernel"][...], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(g_params["bias"][...], gp_o["bias"][...], rtol=1e-5, atol=1e-4)


def test_depthwise_functional_grads_under_jit_and_bfloat16():
    """The functional entry point under jit with both argument gradients, and bfloat16 compute."""
    x, k = normal(1, (2, 9, 11, 6)), normal(2, (3, 3, 1, 6))

    def loss(x, k, impl):
        y = layers.depthwise_conv2d(x, k, dilation=2, impl=impl)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    g_shift = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, k, "shift")
    g_native = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, k, "native")
    assert_trees_close(g_shift, g_native, atol=1e-4)
    xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    gb_shift = jax.grad(loss, argnums=(0, 1))(xb, kb, "shift")
    gb_native = jax.grad(loss, argnums=(0, 1))(xb, kb, "native")
    for a, b in zip(gb_shift, gb_native):
        assert a.dtype == jnp.bfloat16
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2


# ---- 1x1 and patch (kernel = stride) convolutions as matmuls --------------------------------

@pytest.mark.parametrize("kernel_size,stride,size,use_bias", [
    (1, 1, (7, 9), True),
    (1, 1, (5, 6), False),
    (8, 8, (19, 21), True),    # sr_ratio 8, sizes not divisible: PyTorch drops the remainder
    (4, 4, (13, 10), True),
    (2, 2, (9, 7), True),
    (2, 2, (8, 6), True),
])
def test_conv_matmul_forms_match_native(kernel_size, stride, size, use_bias):
    x = normal(0, (2,) + size + (6,))
    results = {}
    for impl in ("matmul", "native"):
        conv = layers.conv2d(6, 5, kernel_size, stride=stride, use_bias=use_bias, impl=impl, rngs=nnx.Rngs(1))
        if use_bias:
            conv.bias[...] = normal(2, conv.bias.shape)
        assert conv.matmul_form() == ("pointwise" if kernel_size == 1 else "patch")
        results[impl] = module_vjp(conv, x, seed=3)
    (y, (gp, gx)), (y_n, (gp_n, gx_n)) = results["matmul"], results["native"]
    assert y.shape == y_n.shape == (2, size[0] // stride, size[1] // stride, 5)
    np.testing.assert_allclose(y, y_n, **F32)
    np.testing.assert_allclose(gx, gx_n, **F32)
    assert_trees_close(gp, gp_n, atol=1e-4)


@pytest.mark.parametrize("shape,dtype", [
    ((2, 5, 7, 6), jnp.float32),
    ((3, 4, 6), jnp.float32),
    ((2, 5, 7, 6), jnp.bfloat16),
    ((4, 6), jnp.float32),   # 2-D input: nnx.Linear's own product
])
@pytest.mark.parametrize("impl", ["flat", "nd"])
def test_linear_flattened_product_matches_nnx_linear(shape, dtype, impl):
    """layers.Linear ('flat': one 2-D dot over the flattened leading axes; 'nd': a dot over the
    last axis, what spatial partitioning takes) computes what nnx.Linear computes: values and
    gradients, with the same parameters and dtype promotion."""
    x = normal(0, shape)
    fast = layers.Linear(6, 5, impl=impl, dtype=dtype, rngs=nnx.Rngs(1))
    ref = nnx.Linear(6, 5, dtype=dtype, rngs=nnx.Rngs(1))
    fast.kernel[...] = ref.kernel[...]
    fast.bias[...] = ref.bias[...] = normal(2, (5,))
    (y, grads), (y_ref, grads_ref) = module_vjp(fast, x, seed=3), module_vjp(ref, x, seed=3)
    assert y.dtype == y_ref.dtype == dtype and y.shape == shape[:-1] + (5,)
    tol = F32 if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), **tol)
    assert_trees_close(grads, grads_ref, **tol)


def test_classifier_conv_same_padding_and_non_matmul_convs():
    """nnx.Conv-style 'SAME' 1x1 classifiers take the matmul form; stride-1 3x3 convs take the
    per-tap filter gradient; strided 3x3 convs keep the lax convolution even with impl='matmul'."""
    x = normal(0, (2, 5, 7, 8))
    outs = []
    for impl in ("matmul", "native"):
        conv = layers.Conv2d(8, 3, (1, 1), impl=impl, rngs=nnx.Rngs(0))
        outs.append(module_vjp(conv, x, seed=1))
    assert_trees_close(outs[0], outs[1], atol=1e-4)
    assert layers.Conv2d(8, 3, (1, 1), impl="matmul", rngs=nnx.Rngs(0)).matmul_form() == "pointwise"
    assert layers.conv2d(8, 3, 3, padding=1, impl="matmul", rngs=nnx.Rngs(0)).matmul_form() == "taps"
    assert layers.conv2d(8, 3, 3, stride=2, padding=1, impl="matmul", rngs=nnx.Rngs(0)).matmul_form() is None
    assert layers.conv2d(8, 3, 2, stride=2, padding=1, impl="matmul", rngs=nnx.Rngs(0)).matmul_form() is None
    with pytest.raises(ValueError, match="conv_impl"):
        layers.conv2d(8, 3, 1, impl="dot", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dwconv_impl"):
        layers.DepthwiseConv2d(8, impl="fast", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("cin,cout,kernel_size,dilation,size", [
    (6, 5, 3, 1, (9, 7)),
    (4, 3, 3, 2, (8, 11)),
    (5, 4, 5, 1, (7, 6)),
])
def test_conv_tap_filter_gradient_matches_native(cin, cout, kernel_size, dilation, size):
    x = normal(0, (2,) + size + (cin,))
    results = {}
    for impl in ("matmul", "native"):
        conv = layers.conv2d(cin, cout, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation,
                             use_bias=False, impl=impl, rngs=nnx.Rngs(1))
        results[impl] = module_vjp(conv, x, seed=3)
    assert layers.conv2d(cin, cout, kernel_size, padding=1, impl="matmul", rngs=nnx.Rngs(0)).matmul_form() == "taps"
    (y, (gp, gx)), (y_n, (gp_n, gx_n)) = results["matmul"], results["native"]
    assert y.shape == y_n.shape == (2,) + size + (cout,)
    np.testing.assert_allclose(y, y_n, **F32)
    np.testing.assert_allclose(gx, gx_n, **F32)
    assert_trees_close(gp, gp_n, atol=1e-4)


@pytest.mark.parametrize("size,kernel_size,dilation,pad,live,kept", [
    ((12, 12), 3, 24, (24, 24), ((1, 1), (1, 1)), (1, 1)),   # ProDA's d = 24 branch on a 12 x 12 map
    ((12, 9), 3, 12, (12, 12), ((1, 1), (1, 1)), (1, 1)),    # d = map rows: the off-centre taps just miss
    ((13, 6), 3, 6, (6, 6), ((0, 2), (1, 1)), (3, 1)),       # rows all live, columns only the centre
    ((5, 8), 5, 3, (6, 6), ((1, 3), (0, 4)), (3, 5)),        # a 5x5 kernel, its outer rows dead
    ((5, 8), 5, 3, (6, 2), ((2, 3), (1, 4)), (5, 4)),        # asymmetric: trimmed rows would pad -1, stay whole
    ((1, 6), 3, 2, (2, 2), ((1, 1), (0, 2)), (1, 3)),        # a one-row map
])
@pytest.mark.parametrize("impl", ["matmul", "native"])
def test_dead_taps_dropped_exactly(size, kernel_size, dilation, pad, live, kept, impl):
    """Stride-1 convolutions drop the taps that read only zero padding (layers.conv.live_taps);
    values and every gradient equal the untrimmed lax convolution of the full kernel."""
    cin, cout = 6, 5
    x = normal(0, (2,) + size + (cin,))
    conv = layers.Conv2d(cin, cout, (kernel_size,) * 2, padding=(pad, pad), kernel_dilation=(dilation,) * 2,
                         use_bias=True, impl=impl, rngs=nnx.Rngs(1))
    bias = normal(2, (cout,))
    conv.bias[...] = bias
    spans = [layers.conv.live_taps(n, kernel_size, dilation, pad) for n in size]
    assert spans == list(live)
    trimmed, _ = layers.conv.trim_dead_taps(conv.kernel[...], (pad, pad), (dilation,) * 2, size)
    assert trimmed.shape[:2] == kept

    def full(kernel, bias, x):      # the reference: the whole kernel, no trimming
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), (pad, pad), rhs_dilation=(dilation,) * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        return y + bias

    y_ref, pull = jax.vjp(full, conv.kernel[...], bias, x)
    g = normal(3, y_ref.shape)
    dk_ref, db_ref, dx_ref = pull(g)
    (y, (gp, gx)) = module_vjp(conv, x, seed=3)
    np.testing.assert_allclose(y, y_ref, **F32)
    np.testing.assert_allclose(gx, dx_ref, **F32)
    np.testing.assert_allclose(gp["kernel"][...], dk_ref, **F32)
    np.testing.assert_allclose(gp["bias"][...], db_ref, rtol=1e-5, atol=1e-4)
    (a0, a1), (b0, b1) = live
    dead = np.ones(dk_ref.shape[:2], bool)
    dead[a0:a1 + 1, b0:b1 + 1] = False
    assert np.all(np.asarray(dk_ref)[dead] == 0)     # what was dropped had no gradient to lose


@pytest.mark.parametrize("shape,dilation,block", [
    ((2, 13, 9, 4), 1, 9 * 2 * 4),     # 1-row blocks
    ((1, 11, 7, 3), 2, 3 * 7 * 3),     # 3-row blocks, last block padded (11 = 3 * 4 - 1)
    ((2, 10, 6, 5), 6, 2 * 2 * 6 * 5),  # dilation wider than a block
])
def test_depthwise_tap_gradient_blocks_match_native(monkeypatch, shape, dilation, block):
    """The shift VJP's tap gradient walks the rows in blocks (in the full-size model: blocks of
    TAP_GRAD_BLOCK_ELEMENTS); small blocks here make several blocks and a padded last block."""
    monkeypatch.setattr(layers.conv, "TAP_GRAD_BLOCK_ELEMENTS", block)
    x = normal(0, shape)
    results = {}
    for impl in ("shift", "native"):
        m = layers.DepthwiseConv2d(shape[-1], dilation=dilation, impl=impl, rngs=nnx.Rngs(3))
        results[impl] = module_vjp(m, x, seed=5)
    assert_trees_close(results["shift"], results["native"], atol=1e-5)


def dense_attention_reference(q, k, v):
    """Plain softmax attention in float64 NumPy: [B, N, h, d] x [B, M, h, d] -> [B, N, h, d]."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("n,m,heads,chunk", [
    (37, 9, 2, 8),      # 5 chunks, last one padded with 3 zero rows
    (64, 16, 1, 16),    # exact chunks
    (20, 7, 3, None),   # default chunk: one chunk
    (10, 5, 1, 64),     # chunk larger than n
])
def test_chunked_attention_matches_dense(n, m, heads, chunk):
    q, k, v = normal(0, (2, n, heads, 8)), normal(1, (2, m, heads, 8)), normal(2, (2, m, heads, 8))
    w = normal(3, (2, n, heads, 8))
    ref = dense_attention_reference(q, k, v)
    results = {}
    for impl in ("chunked", "dense"):
        def f(q, k, v, impl=impl):
            return jnp.sum(layers.attention(q, k, v, impl=impl, chunk=chunk) * w)

        out = jax.jit(lambda q, k, v, impl=impl: layers.attention(q, k, v, impl=impl, chunk=chunk))(q, k, v)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        results[impl] = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    assert_trees_close(results["chunked"], results["dense"], atol=1e-5)
    # Gradients against central finite differences of the float64 reference (one coordinate each).
    eps = 1e-4
    for arg in range(3):
        args = [np.asarray(t, np.float64) for t in (q, k, v)]
        idx = (1, min(3, args[arg].shape[1] - 1), heads - 1, 5)
        hi, lo = [a.copy() for a in args], [a.copy() for a in args]
        hi[arg][idx] += eps
        lo[arg][idx] -= eps
        fd = (np.sum(dense_attention_reference(*hi) * np.asarray(w)) -
              np.sum(dense_attention_reference(*lo) * np.asarray(w))) / (2 * eps)
        np.testing.assert_allclose(float(results["chunked"][arg][idx]), fd, rtol=1e-3, atol=1e-4)


def test_chunked_attention_bfloat16_and_chunk_sizes():
    q, k, v = (normal(s, (2, 50, 2, 16)) for s in (0, 1, 2))
    ref = layers.attention(q, k, v, impl="dense")
    out = layers.attention(*(t.astype(jnp.bfloat16) for t in (q, k, v)), impl="chunked", chunk=16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)
    grads = jax.grad(lambda q: jnp.sum(layers.attention(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                                                        impl="chunked", chunk=16).astype(jnp.float32)))(
        q.astype(jnp.bfloat16))
    assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads.astype(jnp.float32))))
    # A chunk's logits per (image, head) hold at most ATTENTION_CHUNK_ELEMENTS values; small
    # problems are one chunk.
    assert layers.attention_chunk_size(16384, 256) == 2048
    assert layers.attention_chunk_size(1024, 256) == 1024
    assert layers.attention_chunk_size(4096, 256, elements=1 << 18) == 1024
    assert layers.attention_chunk_size(100, 10, elements=64) == 64   # never below 64 rows
    with pytest.raises(ValueError, match="attention_impl"):
        layers.attention(q, k, v, impl="flash")


def test_gelu_erf_matches_exact_gelu():
    x = normal(0, (1000,)) * 4
    np.testing.assert_allclose(layers.gelu_erf(x), jax.nn.gelu(x, approximate=False), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(jax.grad(lambda t: jnp.sum(layers.gelu_erf(t)))(x),
                               jax.grad(lambda t: jnp.sum(jax.nn.gelu(t, approximate=False)))(x), atol=2e-6)


def test_auto_forms_follow_the_backend():
    assert jax.default_backend() == "cpu"
    assert layers.resolve_conv_impl("auto") == "matmul"
    assert layers.resolve_dwconv_impl("auto") == "shift"
    assert layers.resolve_attention_impl("auto") == "chunked"
    assert layers.resolve_dense_impl("auto") == "flat"
    with pytest.raises(ValueError, match="dense_impl must be one of"):
        layers.linear(2, 2, impl="wide", rngs=nnx.Rngs(0))
    assert resolve_scan_blocks("auto") is False
    assert resolve_scan_blocks("True") is True and resolve_scan_blocks(False) is False
    with pytest.raises(ValueError, match="scan_blocks"):
        resolve_scan_blocks("sometimes")


# ---- encoder with scanned stages and remat ---------------------------------------------------

def test_encoder_scan_remat_fast_forms_match_native():
    """A stage of 4 blocks (scanned) and stages of 1-2 blocks (unrolled), sr ratios 8, 4, 2, 1 on
    a 75x69 image (no stage size divisible by its ratio), train mode with drop path."""
    v = MiTVariant((16, 32, 40, 64), (2, 1, 4, 1))
    x = normal(0, (2, 75, 69, 3))
    rng = jax.random.key(7)
    results = []
    # Fast forms with remat (custom VJP inside jax.checkpoint inside lax.scan) vs native without;
    # the Segmentor test below covers the fast forms without remat.
    for dw, conv, att, remat in [("shift", "matmul", "chunked", True), ("native", "native", "dense", False)]:
        forms = ComputeForms(dwconv=dw, conv=conv, attention=att, remat=remat, scan_blocks=True)
        m = MixVisionTransformer(v, drop_path_rate=0.3, forms=forms, rngs=nnx.Rngs(2))
        graphdef, params = nnx.split(m)

        def loss(params, x, graphdef=graphdef):
            outs = nnx.merge(graphdef, params)(x, train=True, rng=rng)
            return sum(jnp.mean(jnp.sin(o) * (i + 1)) for i, o in enumerate(outs)), outs

        (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
        results.append((outs, grads))
    for outs, grads in results[1:]:
        assert_trees_close(results[0][0], outs, atol=2e-5)
        assert_trees_close(results[0][1], grads, rtol=1e-4, atol=1e-6)


# ---- the whole Segmentor ---------------------------------------------------------------------

def test_segmentor_fast_forms_match_native():
    """Logits, PiPa head outputs, BatchNorm statistics and all parameter gradients of a train
    step's forward/backward (DAFormer head), jitted with the batch sharded over the 8 test
    devices. (The SegFormer head's convs are 1x1 Conv2d, covered above; remat is covered by the
    encoder test: each Segmentor compile costs ~10-20 s here.)"""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.device_put(normal(0, (8, 64, 96, 3)), NamedSharding(mesh, P("data")))
    rng = jax.random.key(3)
    results = []
    for dw, conv, att in [("auto", "auto", "auto"), ("native", "native", "dense")]:
        model = build_segmentor(small_config(dwconv_impl=dw, conv_impl=conv, attention_impl=att), seed=1)
        graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

        def loss(params, stats, x, graphdef=graphdef):
            # The identity map rebuilds the Variables under this trace (BatchNorm writes its stats).
            m = nnx.merge(graphdef, *jax.tree.map(lambda v: v, (params, stats)))
            logits, feats = m(x, train=True, rng=rng, return_features=True)
            pix = m.pixel_head(feats["stages"], use_running_average=False)
            patch = m.patch_head(feats["fused"])
            value = jnp.mean(jnp.sin(logits)) + jnp.mean(pix * pix[..., :1]) + jnp.mean(patch * patch[..., :1])
            return value, (logits, pix, patch, nnx.state(m, nnx.BatchStat))

        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (_, aux), grads = step(params, stats, x)
        results.append((aux, grads))
    (aux, grads), (aux_n, grads_n) = results
    assert_trees_close(aux, aux_n, rtol=1e-4, atol=2e-5)
    assert_trees_close(grads, grads_n, rtol=1e-4, atol=1e-6)
