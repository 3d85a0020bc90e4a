"""The segmentor protocol that the train step and the evaluator call, and its single-scale
implementation `EncoderDecoder` (backbone + decode head + PiPa's training-only heads).

A segmentor (EncoderDecoder here, HRDA in pipa_jax/models/hrda.py) provides:
- `forward_train(x, *, rng, use_running_average=False) -> SegOutput`: the training forward
  (dropout and drop path on, BatchNorm on batch statistics). Whatever randomness the forward
  has (HRDA's detail crop box) is drawn from `rng` and returned in the output, never kept in
  module state.
- `supervised_loss(out, labels, weight=None, *, average='all') -> scalar`: the segmentation loss
  of a training forward against labels at the input resolution (docs/method.md §2.4; HRDA §6.5);
  `average` = 'valid' divides by the labelled pixels instead of all (DACS's source loss).
- `infer_logits(x, *, use_running_average=True) -> [B, H, W, K]` float32 logits at the input
  size: teacher pseudo-labels (with use_running_average=False: batch statistics) and evaluation.
- `pixel_view(out, labels)` and `patch_view(out)`: which features and aligned labels PiPa's two
  contrastive terms read (HRDA: the detail crop for the pixel term, the context for the patch term),
  with `decoder_stride` (the stride of `patch_view`'s map over the input).
All arrays are NHWC; inputs are normalised images [B, H, W, 3].
"""
from __future__ import annotations

from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pipa_jax import losses
from pipa_jax.models import layers, registry

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def default_model_config() -> ml_collections.ConfigDict:
    """Model fields shared by every config file (the DAFormer + PiPa network by default)."""
    c = ml_collections.ConfigDict()
    c.segmentor = "encoder_decoder"  # 'encoder_decoder' (single scale) or 'hrda' (multi-resolution)
    c.backbone = "mit_b5"          # a registered backbone: mit_b0 .. mit_b5 (docs/method.md §2.1),
                                   # resnet50 / resnet101 (DeepLab's dilated Caffe ResNet, §14)
    c.decode_head = "daformer"     # 'daformer' (context-aware ASPP fusion), 'segformer' (all-MLP),
                                   # 'deeplabv2' (the DACS classifier on a ResNet, §14) or 'proda'
                                   # (ProDA's GroupNorm + SE head with its 256-d feature, §15)
    c.num_classes = 19
    c.embed_dim = 256              # decoder channels
    c.drop_path_rate = 0.1         # stochastic depth over all encoder blocks
    c.dropout = 0.1                # classifier Dropout2d
    # Compute forms (layers.ComputeForms; same parameters and results whichever is chosen).
    # Depthwise conv: 'auto' (shift on CPU, native elsewhere), 'shift' (multiply-adds with a
    # hand-written VJP), 'native'; 'shift_autodiff' exists only to benchmark the VJP against.
    c.dwconv_impl = "auto"
    # 1x1 and kernel=stride (attention spatial reduction) convs: 'auto' (matmul on CPU, native
    # elsewhere), 'matmul', 'native'.
    c.conv_impl = "auto"
    # Encoder attention: 'auto' (chunked on CPU, dense elsewhere), 'chunked' (heads folded into the
    # batch, query chunks, hand-written VJP, memory linear in tokens), 'dense'.
    c.attention_impl = "auto"
    # Token-wise linear layers: 'auto' (flat on CPU, nd elsewhere), 'flat' (one 2-D dot over the
    # flattened map), 'nd' (a dot over the last axis; what spatial partitioning needs).
    c.dense_impl = "auto"
    # lax.scan over the blocks of each deep encoder stage: True, False or 'auto' (unrolled on CPU,
    # where the scan costs run time; scanned on GPU/TPU for compile time). Same parameters.
    c.scan_blocks = "auto"
    c.remat = False                # recompute encoder block activations in the backward pass (memory)
    c.pixel_head = True            # PiPa pixel projection head (training only)
    c.pixel_proj_dim = 256
    c.patch_head = True            # PiPa patch projection head (training only)
    c.patch_proj_dim = 128
    c.dtype = "float32"            # compute dtype; parameters are always float32
    # DeepLab ResNets (backbone resnet50 / resnet101, docs/method.md §14).
    c.resnet = ml_collections.ConfigDict()
    c.resnet.input_convention = "caffe_bgr"  # what the weights expect: 'caffe_bgr' (BGR - Caffe mean, DACS /
                                             # DeepLab COCO) or 'imagenet_rgb' (torchvision ImageNet)
    c.resnet.frozen_bn_affine = True   # DACS: BN scales / biases never trained (batch statistics still used)
    c.resnet.bn_weight_decay = True    # PyTorch SGD decays every parameter it trains, BN included
    c.resnet.frozen_bn_stats = False   # True: BN on running statistics in training too (ProDA's warm-up --freeze_bn)
    c.deeplabv2 = ml_collections.ConfigDict()
    c.deeplabv2.branches = 2           # 2: the official DACS forward (d=6 + d=12 only); 4: all four summed
    # HRDA (segmentor='hrda', docs/method.md §6); ignored by 'encoder_decoder'.
    c.hrda = ml_collections.ConfigDict()
    c.hrda.context_scale = 0.5         # the context view: the whole crop resized by this factor
    c.hrda.hr_crop_size = (512, 512)   # the detail view: a crop at full resolution (height, width)
    c.hrda.crop_coord_divisible = 8    # detail-crop offsets are multiples of this (head stride / context scale)
    c.hrda.hr_loss_weight = 0.1        # CE of the detail logits on the cropped label
    c.hrda.lr_loss_weight = 0.0        # CE of the attention-weighted context logits (official default 0)
    c.hrda.attention_classwise = True  # one scale-attention channel per class (False: one channel)
    c.hrda.hr_slide_stride = (256, 256)  # inference: detail windows of hr_crop_size every this many pixels
    return c


def dtype_of(name: str):
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@flax.struct.dataclass
class SegOutput:
    """What a training forward returns (one type for every segmentor).

    logits: [B, h, w, K] predictions over the whole input (stride 4; HRDA: the fused map).
    features: the encoder stage maps (HRDA: of the context view); the feature distance reads them.
    feature_input: the normalised images `features` were computed from (HRDA: the context image).
    decoder_features: the decode head's fused map over the whole input (HRDA: of the context view),
      at the segmentor's `decoder_stride`; PiPa's patch head reads it.
    extras: segmentor-specific arrays (HRDA: 'hr_logits', 'hr_features', 'lr_logits', 'attention',
      'crop_box' = the detail crop's top-left (y, x) in input pixels, int32 [2]).
    """
    logits: jax.Array
    features: tuple
    feature_input: jax.Array
    decoder_features: jax.Array
    extras: dict = flax.struct.field(default_factory=dict)


class Segmentor(Protocol):
    """The protocol of the module docstring (EncoderDecoder, HRDA)."""
    decoder_stride: int
    num_classes: int

    def forward_train(self, x, *, rng, use_running_average: bool = False) -> SegOutput: ...
    def supervised_loss(self, out: SegOutput, labels, weight=None, *, average: str = "all") -> jax.Array: ...
    def infer_logits(self, x, *, use_running_average: bool = True) -> jax.Array: ...
    def pixel_view(self, out: SegOutput, labels) -> tuple[Any, jax.Array, jax.Array]: ...
    def patch_view(self, out: SegOutput) -> tuple[jax.Array, jax.Array]: ...


def upsampled_cross_entropy(logits, labels, weight=None, *, align_corners: bool = False, average: str = "all"):
    """CE of logits bilinearly resized (float32; align_corners=False as mmseg, True for DeepLabV2)
    to the labels' size."""
    return losses.cross_entropy(layers.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3],
                                                       align_corners=align_corners), labels, weight,
                                average=average)


def build_pipa_heads(module, config, dims, kw) -> None:
    """PiPa's training-only projection heads on `module` (None when disabled)."""
    from pipa_jax.models import heads
    forms = kw["forms"]
    rest = {k: v for k, v in kw.items() if k != "forms"}
    module.pixel_head = (heads.PixelProjectionHead(dims, config.pixel_proj_dim, forms=forms, **rest)
                         if config.pixel_head else None)
    fused = getattr(module.decode_head, "fused_channels", config.embed_dim)
    module.patch_head = (heads.PatchProjectionHead(fused, config.patch_proj_dim, forms=forms, **rest)
                         if config.patch_head else None)


class EncoderDecoder(nnx.Module):
    """`backbone` + `decode_head` (+ `pixel_head`, `patch_head` when enabled), at one scale.

    Besides the protocol, `__call__(x, *, train, use_running_average, rng, return_features)` returns
    the decode head's logits at stride 4 [B, H/4, W/4, K] (with return_features also a dict of
    'stages' and 'fused'); `use_running_average` (BatchNorm) defaults to `not train`.
    """

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        kw = dict(forms=layers.ComputeForms.from_config(config), dtype=dtype_of(config.dtype),
                  param_dtype=jnp.float32, rngs=rngs)
        self.backbone = registry.build_backbone(config, **kw)
        dims = self.backbone.embed_dims
        self.decode_head = registry.build_head(config, dims, **kw)
        spec = registry.head_spec(config.decode_head)
        self.decoder_stride = spec.output_stride
        self.align_corners = spec.align_corners
        build_pipa_heads(self, config, dims, kw)
        self.num_classes = config.num_classes

    def __call__(self, x, *, train: bool = False, use_running_average: bool | None = None, rng=None,
                 return_features: bool = False):
        if use_running_average is None:
            use_running_average = not train
        k_enc, k_dec = jax.random.split(rng) if rng is not None else (None, None)
        stages = self.backbone(x, train=train, rng=k_enc, use_running_average=use_running_average)
        logits, fused = self.decode_head(stages, train=train, use_running_average=use_running_average,
                                         rng=k_dec, return_fused=True)
        if return_features:
            return logits, {"stages": stages, "fused": fused}
        return logits

    def forward_train(self, x, *, rng, use_running_average: bool = False) -> SegOutput:
        logits, feats = self(x, train=True, use_running_average=use_running_average, rng=rng, return_features=True)
        return SegOutput(logits=logits, features=tuple(feats["stages"]), feature_input=x,
                         decoder_features=feats["fused"])

    def supervised_loss(self, out: SegOutput, labels, weight=None, *, average: str = "all"):
        return upsampled_cross_entropy(out.logits, labels, weight, align_corners=self.align_corners, average=average)

    def infer_logits(self, x, *, use_running_average: bool = True):
        logits = self(x, train=False, use_running_average=use_running_average)
        return layers.resize_bilinear(logits.astype(jnp.float32), x.shape[1:3], align_corners=self.align_corners)

    def pixel_view(self, out: SegOutput, labels):
        return out.features, labels, out.logits

    def patch_view(self, out: SegOutput):
        return out.decoder_features, out.logits


def build_segmentor(config: ml_collections.ConfigDict, *, seed: int = 0):
    """The one factory: `config` is a model ConfigDict (see default_model_config); its
    `segmentor` field picks the class from registry.SEGMENTORS."""
    return registry.segmentor_class(config.get("segmentor", "encoder_decoder"))(config, rngs=nnx.Rngs(params=seed))
