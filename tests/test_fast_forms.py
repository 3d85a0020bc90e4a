"""The CPU fast forms compute exactly what the native lax convolutions compute, values and
gradients: the depthwise shift conv with its hand-written VJP, 1x1 convs and the attention's
kernel = stride spatial reduction as matmuls, and the remat option; then the whole Segmentor
with every fast form against every native form (jit, scanned stages, sharded batch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pipa_jax.models import build_segmentor, layers
from pipa_jax.models.mit import MiTVariant, MixVisionTransformer
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


def test_classifier_conv_same_padding_and_non_matmul_convs():
    """nnx.Conv-style 'SAME' 1x1 classifiers take the matmul form; 3x3 and strided 3x3 convs keep
    the lax convolution even with impl='matmul'."""
    x = normal(0, (2, 5, 7, 8))
    outs = []
    for impl in ("matmul", "native"):
        conv = layers.Conv2d(8, 3, (1, 1), impl=impl, rngs=nnx.Rngs(0))
        outs.append(module_vjp(conv, x, seed=1))
    assert_trees_close(outs[0], outs[1], atol=1e-4)
    assert layers.Conv2d(8, 3, (1, 1), impl="matmul", rngs=nnx.Rngs(0)).matmul_form() == "pointwise"
    assert layers.conv2d(8, 3, 3, padding=1, impl="matmul", rngs=nnx.Rngs(0)).matmul_form() is None
    assert layers.conv2d(8, 3, 3, stride=2, padding=1, impl="matmul", rngs=nnx.Rngs(0)).matmul_form() is None
    assert layers.conv2d(8, 3, 2, stride=2, padding=1, impl="matmul", rngs=nnx.Rngs(0)).matmul_form() is None
    with pytest.raises(ValueError, match="conv_impl"):
        layers.conv2d(8, 3, 1, impl="dot", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dwconv_impl"):
        layers.DepthwiseConv2d(8, impl="fast", rngs=nnx.Rngs(0))


def test_auto_forms_follow_the_backend():
    assert jax.default_backend() == "cpu"
    assert layers.resolve_conv_impl("auto") == "matmul"
    assert layers.resolve_dwconv_impl("auto") == "shift"


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
    for dw, conv, remat in [("shift", "matmul", True), ("native", "native", False)]:
        m = MixVisionTransformer(v, drop_path_rate=0.3, dwconv_impl=dw, conv_impl=conv, remat=remat,
                                 rngs=nnx.Rngs(2))
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
    for dw, conv in [("auto", "auto"), ("native", "native")]:
        model = build_segmentor(small_config(dwconv_impl=dw, conv_impl=conv), seed=1)
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
