"""Networks of docs/method.md §2 and §6: MiT encoder, DAFormer / SegFormer decoders, PiPa
projection heads, the single-scale EncoderDecoder and the segmentor protocol (segmentor.py);
networks are looked up in registry.py."""
from pipa_jax.models.heads import (DAFormerHead, PatchProjectionHead, PixelProjectionHead,
                                   SegFormerHead)
from pipa_jax.models.layers import ComputeForms
from pipa_jax.models.mit import MIT_VARIANTS, MixVisionTransformer
from pipa_jax.models.segmentor import (EncoderDecoder, SegOutput, Segmentor, build_segmentor,
                                       default_model_config)

__all__ = [
    "ComputeForms", "DAFormerHead", "EncoderDecoder", "MIT_VARIANTS", "MixVisionTransformer",
    "PatchProjectionHead", "PixelProjectionHead", "SegFormerHead", "SegOutput", "Segmentor",
    "build_segmentor", "default_model_config",
]
