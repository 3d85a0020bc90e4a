"""Segmentor: encoder + decoder (+ PiPa's training-only heads), built from config by one factory."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pipa_jax.models import heads, mit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DECODE_HEADS = ("daformer", "segformer")


def default_model_config() -> ml_collections.ConfigDict:
    """Model fields shared by every config file (the DAFormer + PiPa network by default)."""
    c = ml_collections.ConfigDict()
    c.backbone = "mit_b5"          # mit_b0 .. mit_b5 (METHOD.md §2.1)
    c.decode_head = "daformer"     # 'daformer' (context-aware ASPP fusion) or 'segformer' (all-MLP)
    c.num_classes = 19
    c.embed_dim = 256              # decoder channels
    c.drop_path_rate = 0.1         # stochastic depth over all encoder blocks
    c.dropout = 0.1                # classifier Dropout2d
    # Depthwise conv form: 'auto' (shift on CPU, native elsewhere), 'shift' (multiply-adds with a
    # hand-written VJP), 'native'; 'shift_autodiff' exists only to benchmark the VJP against.
    c.dwconv_impl = "auto"
    # 1x1 and kernel=stride (attention spatial reduction) convs: 'auto' (matmul on CPU, native
    # elsewhere), 'matmul', 'native'. Same parameters and results either way (layers.Conv2d).
    c.conv_impl = "auto"
    # Encoder attention: 'auto' (chunked on CPU, dense elsewhere), 'chunked' (heads folded into the
    # batch, query chunks, hand-written VJP, memory linear in tokens), 'dense'. Same results (layers.attention).
    c.attention_impl = "auto"
    # lax.scan over the blocks of each deep encoder stage: True, False or 'auto' (unrolled on CPU,
    # where the scan costs run time; scanned on GPU/TPU for compile time). Same parameters.
    c.scan_blocks = "auto"
    c.remat = False                # recompute encoder block activations in the backward pass (memory)
    c.pixel_head = True            # PiPa pixel projection head (training only)
    c.pixel_proj_dim = 256
    c.patch_head = True            # PiPa patch projection head (training only)
    c.patch_proj_dim = 128
    c.dtype = "float32"            # compute dtype; parameters are always float32
    return c


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class Segmentor(nnx.Module):
    """`backbone` (MiT) + `decode_head` (+ `pixel_head`, `patch_head` when enabled).

    `__call__(x [B, H, W, 3] normalised, *, train, use_running_average, rng, return_features)`
    returns logits at stride 4 [B, H/4, W/4, K]; with return_features also a dict holding
    'stages' (the 4 encoder maps) and 'fused' (the decoder's fused map at stride 4).
    `use_running_average` (BatchNorm) defaults to `not train`; the EMA teacher runs with
    train=False, use_running_average=False (batch statistics, no dropout, no drop path).
    """

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        dtype = _dtype(config.dtype)
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        backbone = str(config.backbone)
        if not backbone.startswith("mit_"):
            raise ValueError(f"model.backbone must be one of mit_b0..mit_b5, got {backbone!r}")
        self.backbone = mit.MixVisionTransformer(
            backbone, drop_path_rate=config.drop_path_rate, dwconv_impl=config.dwconv_impl,
            conv_impl=config.conv_impl, attention_impl=config.attention_impl,
            scan_blocks=config.scan_blocks, remat=config.remat, **kw)
        dims = self.backbone.embed_dims
        if config.decode_head == "daformer":
            self.decode_head = heads.DAFormerHead(dims, config.num_classes, config.embed_dim,
                                                  dropout=config.dropout, dwconv_impl=config.dwconv_impl,
                                                  conv_impl=config.conv_impl, **kw)
        elif config.decode_head == "segformer":
            self.decode_head = heads.SegFormerHead(dims, config.num_classes, config.embed_dim,
                                                   dropout=config.dropout, conv_impl=config.conv_impl, **kw)
        else:
            raise ValueError(f"model.decode_head must be one of {DECODE_HEADS}, got {config.decode_head!r}")
        self.pixel_head = (heads.PixelProjectionHead(dims, config.pixel_proj_dim, conv_impl=config.conv_impl, **kw)
                           if config.pixel_head else None)
        self.patch_head = (heads.PatchProjectionHead(config.embed_dim, config.patch_proj_dim,
                                                     conv_impl=config.conv_impl, **kw)
                           if config.patch_head else None)
        self.num_classes = config.num_classes

    def __call__(self, x, *, train: bool = False, use_running_average: bool | None = None, rng=None,
                 return_features: bool = False):
        if use_running_average is None:
            use_running_average = not train
        k_enc, k_dec = jax.random.split(rng) if rng is not None else (None, None)
        stages = self.backbone(x, train=train, rng=k_enc)
        logits, fused = self.decode_head(stages, train=train, use_running_average=use_running_average,
                                         rng=k_dec, return_fused=True)
        if return_features:
            return logits, {"stages": stages, "fused": fused}
        return logits


def build_segmentor(config: ml_collections.ConfigDict, *, seed: int = 0) -> Segmentor:
    """The one factory: `config` is a model ConfigDict (see default_model_config)."""
    return Segmentor(config, rngs=nnx.Rngs(params=seed))
