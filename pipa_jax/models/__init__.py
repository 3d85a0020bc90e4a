"""Networks of METHOD.md §2: MiT encoder, DAFormer / SegFormer decoders, PiPa projection heads."""
from pipa_jax.models.heads import (DAFormerHead, PatchProjectionHead, PixelProjectionHead,
                                   SegFormerHead)
from pipa_jax.models.mit import MIT_VARIANTS, MixVisionTransformer
from pipa_jax.models.segmentor import Segmentor, build_segmentor, default_model_config

__all__ = [
    "DAFormerHead", "MIT_VARIANTS", "MixVisionTransformer", "PatchProjectionHead",
    "PixelProjectionHead", "SegFormerHead", "Segmentor", "build_segmentor", "default_model_config",
]
