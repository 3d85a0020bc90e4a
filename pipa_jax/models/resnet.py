"""DeepLabV2: the dilated Caffe-style ResNet and its ASPP-sum classifier, as DACS and ProDA build
them (docs/method.md §14).

Backbone (`ResNet`, depths 50 = [3, 4, 6, 3] and 101 = [3, 4, 23, 3] bottlenecks, expansion 4):
- stem: 7x7/2 conv (pad 3, no bias) -> BN -> ReLU -> 3x3/2 max-pool with pad 1 in CEIL mode;
- Caffe ("v1") bottleneck: the stride sits on the first 1x1 conv, the 3x3 conv has stride 1 and
  padding = dilation; every conv is bias-free and followed by BN; ReLU after bn1, bn2 and the add;
- stages: layer1 stride 1, layer2 stride 2, layer3 dilation 2 and layer4 dilation 4 in EVERY block
  (first included; torchvision's replace_stride_with_dilation differs), a 1x1 conv + BN shortcut in
  the first block of every stage. Output stride 8: 512 -> 65, 720 -> 91, 1024 -> 129, 2048 -> 257.
- BatchNorm (PyTorch semantics, layers.BatchNorm): batch statistics in training, running ones at
  test. DACS freezes every backbone BN's affine parameters: `param_group` labels them 'frozen' and
  the optimizer leaves them untouched (pipa_jax.optim).
- Input: the official DeepLab weights expect BGR images minus the Caffe mean (no std). pipa_jax's
  pipeline delivers ImageNet-normalised RGB (labels.normalize) to every network; with
  input_convention='caffe_bgr' the backbone maps that to the Caffe convention first (an exact affine
  change, so the same pixels reach the first conv as in the official code). 'imagenet_rgb' feeds
  it unchanged (torchvision ImageNet weights); 'unit_rgb' gives RGB in [0, 1] with no mean or std
  (ProDA's loaders, whatever the weights).
- `frozen_stats=True` (ProDA's warm-up, `--freeze_bn`): BatchNorm always on its running
  statistics, in training too.

Classifier (`DeepLabV2Head`, official `layer5`): four 3x3 convs 2048 -> classes with dilation =
padding = 6, 12, 18, 24 and a bias, weights N(0, 0.01). The official DACS / AdaptSegNet forward
returns from inside its loop, so only the d=6 and d=12 branches are summed (`branches=2`, the
setting of the published DACS numbers); `branches=4` is the intended sum of all four.

Attribute names mirror the official keys (conv1, bn1, layer{1..4}.{i}.conv{1,2,3} / bn{1,2,3},
layer{i}.0.downsample.{0,1}, layer5.conv2d_list.{k}); `OFFICIAL_NAME` tells pipa_jax.convert that
the backbone's keys sit at the checkpoint root and the head's under `layer5`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipa_jax.models import layers

# 14 = one bottleneck per stage: not a published network, the reduced ResNet of the synthetic ProDA
# rows and the CI runs (same stem, dilations, widths and output stride).
RESNET_DEPTHS = {14: (1, 1, 1, 1), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)       # bottleneck widths; outputs are 4x
EXPANSION = 4
STAGE_STRIDES = (1, 2, 1, 1)
STAGE_DILATIONS = (1, 1, 2, 4)
# The Caffe / DeepLab BGR mean on 0..255 values (DACS IMG_MEAN).
CAFFE_BGR_MEAN = np.array((104.00698793, 116.66876762, 122.67891434), np.float32)
INPUT_CONVENTIONS = ("caffe_bgr", "imagenet_rgb", "unit_rgb")


def output_size(n: int) -> int:
    """The backbone's (and DeepLabV2's logits') side for an input side n: 7x7/2 conv, ceil-mode
    3x3/2 pool, stride-2 layer2 (512 -> 65, 1024 -> 129)."""
    n = (n + 2 * 3 - 7) // 2 + 1
    n = _ceil_pool_size(n, 3, 2, 1)
    return (n - 1) // 2 + 1


def _ceil_pool_size(n: int, k: int, s: int, p: int) -> int:
    """PyTorch's ceil_mode output size (the last window must start inside the input or its left pad)."""
    out = math.ceil((n + 2 * p - k) / s) + 1
    if (out - 1) * s >= n + p:
        out -= 1
    return out


def max_pool_ceil(x, k: int = 3, s: int = 2, p: int = 1):
    """nn.MaxPool2d(k, s, p, ceil_mode=True) on NHWC (padding never wins: it is -inf)."""
    pads = [(0, 0)]
    for n in x.shape[1:3]:
        out = _ceil_pool_size(n, k, s, p)
        pads.append((p, (out - 1) * s + k - n - p))
    pads.append((0, 0))
    # A concrete -inf init makes JAX use its differentiable max-window primitive.
    init = np.array(-np.inf, x.dtype)
    return jax.lax.reduce_window(x, init, jax.lax.max, (1, k, k, 1), (1, s, s, 1), pads)


def _conv(in_ch, out_ch, k, *, stride=1, padding=0, dilation=1, forms, dtype, param_dtype, rngs):
    # Kaiming-normal fan-out init (torchvision / DeepLab ResNets); pretrained weights replace it.
    return layers.conv2d(in_ch, out_ch, k, stride=stride, padding=padding, dilation=dilation, use_bias=False,
                         impl=forms.conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Bottleneck(nnx.Module):
    """Caffe-style bottleneck: 1x1 (stride) -> 3x3 (dilation) -> 1x1 (x4), BN after each."""

    def __init__(self, in_ch: int, width: int, *, stride: int, dilation: int, downsample: bool,
                 forms: layers.ComputeForms, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(forms=forms, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bn = dict(dtype=dtype, param_dtype=param_dtype)
        out_ch = width * EXPANSION
        self.stride = stride
        # A strided 1x1 conv equals the stride-1 conv of the subsampled map (same parameters);
        # written so, it runs as one matrix product (layers.Conv2d's pointwise form).
        self.conv1 = _conv(in_ch, width, 1, **kw)
        self.bn1 = layers.BatchNorm(width, **bn)
        self.conv2 = _conv(width, width, 3, padding=dilation, dilation=dilation, **kw)
        self.bn2 = layers.BatchNorm(width, **bn)
        self.conv3 = _conv(width, out_ch, 1, **kw)
        self.bn3 = layers.BatchNorm(out_ch, **bn)
        self.downsample = nnx.List([_conv(in_ch, out_ch, 1, **kw), layers.BatchNorm(out_ch, **bn)]) if downsample else None

    def __call__(self, x, *, use_running_average: bool):
        ura = dict(use_running_average=use_running_average)
        xs = x[:, ::self.stride, ::self.stride] if self.stride > 1 else x
        h = jax.nn.relu(self.bn1(self.conv1(xs), **ura))
        h = jax.nn.relu(self.bn2(self.conv2(h), **ura))
        h = self.bn3(self.conv3(h), **ura)
        shortcut = self.downsample[1](self.downsample[0](xs), **ura) if self.downsample is not None else x
        return jax.nn.relu(h + shortcut)


class ResNet(nnx.Module):
    """The dilated DeepLab ResNet-50 / 101 (module docstring); returns the four stage maps
    [B, h, w, 256 / 512 / 1024 / 2048], layer1 at stride 4 and layers 2-4 at stride 8."""

    OFFICIAL_NAME = ""          # its keys start at the checkpoint root (conv1.weight, layer1.0...)

    def __init__(self, depth: int = 101, *, input_convention: str = "caffe_bgr", frozen_stats: bool = False,
                 forms: layers.ComputeForms = layers.ComputeForms(), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth {depth}: expected one of {sorted(RESNET_DEPTHS)}")
        if input_convention not in INPUT_CONVENTIONS:
            raise ValueError(f"input_convention={input_convention!r}: expected one of {INPUT_CONVENTIONS}")
        self.depth = depth
        self.depths = RESNET_DEPTHS[depth]
        self.input_convention = input_convention
        self.frozen_stats = frozen_stats
        self.embed_dims = tuple(w * EXPANSION for w in STAGE_WIDTHS)
        self.dtype = dtype
        kw = dict(forms=forms, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = _conv(3, 64, 7, stride=2, padding=3, **kw)
        self.bn1 = layers.BatchNorm(64, dtype=dtype, param_dtype=param_dtype)
        in_ch = 64
        for s, (n, width) in enumerate(zip(self.depths, STAGE_WIDTHS)):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(in_ch, width, stride=STAGE_STRIDES[s] if i == 0 else 1,
                                         dilation=STAGE_DILATIONS[s], downsample=i == 0, **kw))
                in_ch = width * EXPANSION
            setattr(self, f"layer{s + 1}", nnx.List(blocks))

    def prepare_input(self, x):
        """ImageNet-normalised RGB (labels.normalize) -> what the weights expect (module docstring)."""
        if self.input_convention == "imagenet_rgb":
            return x
        from pipa_jax.labels import IMAGE_MEAN, IMAGE_STD
        rgb = x.astype(jnp.float32) * jnp.asarray(IMAGE_STD) + jnp.asarray(IMAGE_MEAN)
        if self.input_convention == "unit_rgb":
            return rgb / 255.0
        return rgb[..., ::-1] - jnp.asarray(CAFFE_BGR_MEAN)

    def __call__(self, x, *, train: bool = False, rng=None, use_running_average: bool | None = None):
        del rng                                       # no stochastic layers
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"ResNet expects NHWC images [B, H, W, 3], got shape {tuple(x.shape)}")
        ura = dict(use_running_average=(not train) if use_running_average is None else use_running_average)
        if self.frozen_stats:
            ura["use_running_average"] = True
        x = self.prepare_input(x).astype(self.dtype)
        x = max_pool_ceil(jax.nn.relu(self.bn1(self.conv1(x), **ura)))
        outs = []
        for s in range(4):
            for block in getattr(self, f"layer{s + 1}"):
                x = block(x, **ura)
            outs.append(x)
        return outs


def _uniform_bias(fan_in: int):
    """PyTorch's default conv bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class DeepLabV2Head(nnx.Module):
    """The DeepLabV2 classifier on the last stage (module docstring): logits at stride 8.

    `fused` (what PiPa's patch head would read) is the layer4 map it classifies."""

    OFFICIAL_NAME = "layer5"

    def __init__(self, in_channels, num_classes: int = 19, *, dilations=(6, 12, 18, 24), branches: int = 2,
                 forms: layers.ComputeForms = layers.ComputeForms(), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = in_channels[-1]
        if not 1 <= branches <= len(dilations):
            raise ValueError(f"deeplabv2 branches={branches}: expected 1..{len(dilations)} (2 = the official "
                             f"DACS forward, {len(dilations)} = the intended sum of all)")
        self.branches = branches
        self.fused_channels = c
        self.conv2d_list = nnx.List([
            layers.Conv2d(c, num_classes, (3, 3), padding=((d, d), (d, d)), kernel_dilation=(d, d), use_bias=True,
                          kernel_init=nnx.initializers.normal(0.01), bias_init=_uniform_bias(c * 9),
                          impl=forms.conv, dtype=dtype, param_dtype=param_dtype, precision=None, rngs=rngs)
            for d in dilations])

    def __call__(self, features, *, train: bool = False, use_running_average: bool | None = None, rng=None,
                 return_fused: bool = False):
        del train, use_running_average, rng               # no BN, no dropout
        x = features[-1]
        logits = sum(conv(x) for conv in list(self.conv2d_list)[:self.branches])
        return (logits, x) if return_fused else logits


def register(register_backbone, register_head) -> None:
    """Adds resnet14 / resnet50 / resnet101 and the deeplabv2 head to the registries (models/registry.py)."""
    for depth in RESNET_DEPTHS:
        register_backbone(f"resnet{depth}", lambda config, *, d=depth, **kw: ResNet(
            d, input_convention=config.resnet.input_convention,
            frozen_stats=bool(config.resnet.get("frozen_bn_stats", False)), **kw), param_group=param_group,
            duplicates=duplicate_counts)
    register_head("deeplabv2", lambda config, dims, **kw: DeepLabV2Head(
        dims, config.num_classes, branches=config.deeplabv2.branches, **kw), output_stride=8, align_corners=True)


def param_group(names: list[str], config) -> str | None:
    """The optimizer group of a backbone parameter (path below `backbone`): 'frozen' for every
    BatchNorm scale / bias when config.resnet.frozen_bn_affine (DACS), else None (the default group).
    BN parameters are recognised by their module (bn1..3, downsample.1), not by a name prefix."""
    is_bn = any(n.startswith("bn") for n in names[:-1]) or (len(names) >= 3 and names[-3] == "downsample"
                                                              and names[-2] == "1")
    if is_bn and config.resnet.frozen_bn_affine:
        return "frozen"
    return "no_decay" if is_bn and not config.resnet.bn_weight_decay else None


def duplicate_counts(names: list[str]) -> int:
    """How often the official DACS / ProDA `get_1x_lr_params_NOscale` lists a backbone parameter
    (path below `backbone`): once per enclosing module, so the stem 1x, block convs / BNs 3x
    (layerX, layerX[i], the leaf) and the shortcut 4x (also `downsample`). SGD then applies its
    update that many times per step (docs/method.md §14.3)."""
    if names[0].startswith("layer"):
        return 4 if "downsample" in names else 3
    return 1
