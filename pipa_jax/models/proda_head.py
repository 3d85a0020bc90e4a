"""ProDA's classifier on the dilated ResNet (docs/method.md §15.1): the `layer5` of its DeepLabV2.

Not the DeepLabV2 sum of four dilated convs (models/resnet.py) but a feature head whose 256-d map
is the space of ProDA's class prototypes:
- `conv2d_list`: five branches on the layer4 map (2048 channels): a 1x1 conv and four 3x3 convs
  with dilation = padding = 6, 12, 18, 24, each 2048 -> 256 with a bias, then GroupNorm(32) and
  ReLU; the five outputs are concatenated (1280 channels);
- `bottleneck`: a squeeze-and-excitation block (global mean -> Linear 1280 -> 80 -> ReLU ->
  Linear 80 -> 1280 -> sigmoid, a channel scale), a 3x3 conv 1280 -> 256 (bias, padding 1) and
  GroupNorm(32), with NO ReLU after it;
- `head`: Dropout2d(0.1), then a 1x1 conv 256 -> classes without bias.
The feature (`fused`, SegOutput.decoder_features) is the 256-d map AFTER the dropout, as the
official forward returns it. Logits and feature are at stride 8, upsampled with align_corners.

Initialisation as the official code ends up (its head-level loop never fires, the ResNet-level one
re-initialises every conv): all conv weights N(0, 0.01); branch biases PyTorch's default uniform;
bottleneck conv bias 0; GroupNorm 1 / 0; SE linears PyTorch's default (uniform +-1/sqrt(fan_in)).

Official keys (under `layer5.`): conv2d_list.{k}.0 (conv) / .1 (GN), bottleneck.0.se.{0,2},
bottleneck.1 (conv), bottleneck.2 (GN), head.1 (classifier); `OFFICIAL_CHILDREN` maps our
attribute names onto them for pipa_jax.convert.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pipa_jax.models import layers
from pipa_jax.models.heads import channel_dropout
# PyTorch's default Linear / conv init, U(+-1/sqrt(fan_in)), for weights as for biases.
from pipa_jax.models.resnet import _uniform_bias as _torch_uniform

PRODA_DILATIONS = (6, 12, 18, 24)
FEATURE_DIM = 256
GN_GROUPS = 32
SE_REDUCTION = 16


def _group_norm(channels, *, dtype, param_dtype, rngs):
    return nnx.GroupNorm(channels, num_groups=GN_GROUPS, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class SEBlock(nnx.Module):
    """Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(mean_hw(x)))))."""

    OFFICIAL_CHILDREN = {"fc1": "se.0", "fc2": "se.2"}

    def __init__(self, channels: int, reduction: int = SE_REDUCTION, *, dtype, param_dtype, rngs: nnx.Rngs):
        hidden = channels // reduction
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = nnx.Linear(channels, hidden, kernel_init=_torch_uniform(channels),
                              bias_init=_torch_uniform(channels), **kw)
        self.fc2 = nnx.Linear(hidden, channels, kernel_init=_torch_uniform(hidden),
                              bias_init=_torch_uniform(hidden), **kw)

    def __call__(self, x):
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
        s = jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(s))))
        return x * s[:, None, None, :]


class ProDAHead(nnx.Module):
    """ProDA's `Classifier_Module2` (module docstring): (logits, 256-d feature) at stride 8."""

    OFFICIAL_NAME = "layer5"
    OFFICIAL_CHILDREN = {"se": "bottleneck.0", "fuse_conv": "bottleneck.1", "fuse_norm": "bottleneck.2",
                         "classifier": "head.1"}

    def __init__(self, in_channels, num_classes: int = 19, *, dropout: float = 0.1,
                 dilations=PRODA_DILATIONS, forms: layers.ComputeForms = layers.ComputeForms(),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = in_channels[-1]
        d = FEATURE_DIM
        conv = dict(impl=forms.conv, dtype=dtype, param_dtype=param_dtype, precision=None, rngs=rngs,
                    kernel_init=nnx.initializers.normal(0.01))
        norm = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        branches = [nnx.List([layers.Conv2d(c, d, (1, 1), padding=((0, 0), (0, 0)), use_bias=True,
                                            bias_init=_torch_uniform(c), **conv), _group_norm(d, **norm)])]
        for r in dilations:
            branches.append(nnx.List([
                layers.Conv2d(c, d, (3, 3), padding=((r, r), (r, r)), kernel_dilation=(r, r), use_bias=True,
                              bias_init=_torch_uniform(c * 9), **conv), _group_norm(d, **norm)]))
        self.conv2d_list = nnx.List(branches)
        cat = d * len(branches)
        self.se = SEBlock(cat, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fuse_conv = layers.Conv2d(cat, d, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                                       bias_init=nnx.initializers.zeros, **conv)
        self.fuse_norm = _group_norm(d, **norm)
        self.classifier = layers.Conv2d(d, num_classes, (1, 1), padding=((0, 0), (0, 0)), use_bias=False, **conv)
        self.dropout = dropout
        self.fused_channels = d

    def __call__(self, features, *, train: bool = False, use_running_average: bool | None = None, rng=None,
                 return_fused: bool = False):
        del use_running_average                      # GroupNorm has no statistics
        x = features[-1]
        x = jnp.concatenate([jax.nn.relu(norm(conv(x))) for conv, norm in self.conv2d_list], axis=-1)
        feat = self.fuse_norm(self.fuse_conv(self.se(x)))
        feat = channel_dropout(feat, self.dropout, rng, train=train)
        logits = self.classifier(feat)
        return (logits, feat) if return_fused else logits


def register(register_head) -> None:
    register_head("proda", lambda config, dims, **kw: ProDAHead(dims, config.num_classes, dropout=config.dropout,
                                                                **kw), output_stride=8, align_corners=True)
