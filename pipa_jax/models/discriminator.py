"""ProDA's output-space discriminator for its adversarial warm-up (docs/method.md §15.2).

`FCDiscriminator` on class probabilities [B, H, W, K]: four 3x3 stride-2 convolutions (padding 1)
K -> 64 -> 128 -> 256 -> 512, ReLU after the first three and LeakyReLU(0.2) after the fourth, then a
1x1 convolution to one channel (ProDA's models/discriminator.py; not AdaptSegNet's 4x4 one).
PyTorch's default conv init (weights and biases U(+-1/sqrt(fan_in))): the official code does
not re-initialise it. Keys: conv1 .. conv4, classifier.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pipa_jax.models import layers
from pipa_jax.models.resnet import _uniform_bias as _torch_conv_init   # U(+-1/sqrt(fan_in))

WIDTHS = (64, 128, 256, 512)


class FCDiscriminator(nnx.Module):
    def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
        chans = (num_classes,) + WIDTHS
        for i in range(4):
            fan_in = chans[i] * 9
            setattr(self, f"conv{i + 1}", layers.Conv2d(
                chans[i], chans[i + 1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                kernel_init=_torch_conv_init(fan_in), bias_init=_torch_conv_init(fan_in), precision=None,
                impl="native", rngs=rngs))
        self.classifier = layers.Conv2d(WIDTHS[-1], 1, (1, 1), padding=((0, 0), (0, 0)),
                                        kernel_init=_torch_conv_init(WIDTHS[-1]),
                                        bias_init=_torch_conv_init(WIDTHS[-1]), precision=None, rngs=rngs)

    def __call__(self, probs):
        x = probs.astype(jnp.float32)
        for i in range(3):
            x = jax.nn.relu(getattr(self, f"conv{i + 1}")(x))
        x = jax.nn.leaky_relu(self.conv4(x), 0.2)
        return self.classifier(x)
