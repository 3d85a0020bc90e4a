"""Training losses: segmentation cross-entropy (docs/method.md §2.4), pixel contrast (§4) and
patch contrast (§5)."""

from pipa_jax.losses.cross_entropy import cross_entropy
from pipa_jax.losses.patch_contrast import directional_contrast_loss
from pipa_jax.losses.pixel_contrast import (
    masked_logsumexp,
    pixel_contrast_from_maps,
    pixel_contrast_loss,
    sample_pixel_anchors,
)

__all__ = [
    "cross_entropy",
    "directional_contrast_loss",
    "masked_logsumexp",
    "pixel_contrast_from_maps",
    "pixel_contrast_loss",
    "sample_pixel_anchors",
]
