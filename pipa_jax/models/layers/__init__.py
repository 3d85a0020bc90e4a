"""Building blocks shared by the encoders, the decoders and the PiPa heads, by concern:
forms (how each block computes, `ComputeForms`), attention, conv, dense (linear, LayerNorm,
GELU, drop path), norm (BatchNorm) and resize.

Layout conventions: activations NHWC; convolution kernels [kh, kw, in / groups, out] (Flax);
linear kernels [in, out]. The converter (pipa_jax/convert.py) relies on exactly these layouts.
"""
from pipa_jax.models.layers.attention import ATTENTION_CHUNK_ELEMENTS, attention, attention_chunk_size
from pipa_jax.models.layers.conv import (TAP_GRAD_BLOCK_ELEMENTS, Conv2d, DepthwiseConv2d, conv2d,
                                         depthwise_conv2d)
from pipa_jax.models.layers.dense import Linear, drop_path, gelu_erf, layer_norm, linear, matmul_last
from pipa_jax.models.layers.forms import (ACCELERATOR_FORMS, ATTENTION_IMPLS, CONV_IMPLS, DENSE_IMPLS, DWCONV_IMPLS, ComputeForms,
                                          resolve_attention_impl, resolve_conv_impl, resolve_dense_impl,
                                          resolve_dwconv_impl, resolve_scan_blocks)
from pipa_jax.models.layers.norm import BatchNorm
from pipa_jax.models.layers.resize import resize_bilinear, resize_nearest

__all__ = [
    "ACCELERATOR_FORMS", "ATTENTION_CHUNK_ELEMENTS", "ATTENTION_IMPLS", "BatchNorm", "CONV_IMPLS", "ComputeForms", "Conv2d",
    "DENSE_IMPLS", "DWCONV_IMPLS", "DepthwiseConv2d", "Linear", "TAP_GRAD_BLOCK_ELEMENTS", "attention", "attention_chunk_size",
    "conv2d", "depthwise_conv2d", "drop_path", "gelu_erf", "layer_norm", "linear", "matmul_last",
    "resize_bilinear", "resize_nearest", "resolve_attention_impl", "resolve_conv_impl", "resolve_dense_impl",
    "resolve_dwconv_impl",
    "resolve_scan_blocks",
]
