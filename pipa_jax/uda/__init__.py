"""On-device UDA operations of one DAFormer/PiPa step: EMA teacher, pseudo-labels, ClassMix,
DACS strong augmentation and the ImageNet feature distance. All pure and jittable."""
from pipa_jax.uda.augment import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_strong_augment,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    sample_strong_augment_params,
    strong_augment,
)
from pipa_jax.uda.class_mix import class_mix_choice, class_mix_masks, mask_from_choice, mix
from pipa_jax.uda.ema import ema_alpha, ema_update
from pipa_jax.uda.feature_distance import downscale_label_ratio, feature_distance_loss
from pipa_jax.uda.pseudo_label import crop_margin_mask, pseudo_labels

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "apply_strong_augment",
    "blur_kernel_size",
    "class_mix_choice",
    "class_mix_masks",
    "color_jitter",
    "crop_margin_mask",
    "downscale_label_ratio",
    "ema_alpha",
    "ema_update",
    "feature_distance_loss",
    "gaussian_blur",
    "mask_from_choice",
    "mix",
    "pseudo_labels",
    "sample_strong_augment_params",
    "strong_augment",
]
