"""Shared values of a self-training step (docs/method.md §3): the student's views of the source,
target and mixed batches, the EMA teacher's pseudo-labels, the ClassMix batch and the frozen
ImageNet features. Registered in the order they are computed, which is the official order of
the student's BatchNorm updates (source, then target, then mixed)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pipa_jax import labels as L
from pipa_jax import uda
from pipa_jax.terms.base import StepContext, View, register_value


@dataclasses.dataclass(frozen=True)
class PseudoLabels:
    labels: jax.Array        # [B, H, W] int32 teacher argmax on the target crop
    weight: jax.Array        # [B, H, W] float32: the confident share q, 0 outside the valid mask


@dataclasses.dataclass(frozen=True)
class MixedBatch:
    images: jax.Array        # [B, H, W, 3] normalised ClassMix images (strongly augmented)
    labels: jax.Array        # [B, H, W] int32 source labels where pasted, pseudo-labels elsewhere
    weight: jax.Array        # [B, H, W] float32: 1 on source pixels, the pseudo weight elsewhere


def source_input(ctx: StepContext):
    return L.normalize(ctx.batch["source_image"]), ctx.batch["source_label"].astype(jnp.int32)


def target_images(ctx: StepContext):
    return L.normalize(ctx.batch["target_image"])


@register_value("source")
def source_view(ctx: StepContext) -> View:
    xs, ys = source_input(ctx)
    return View(xs, ys, None, ctx.model.forward_train(xs, rng=ctx.key("forward/source")))


@register_value("target")
def target_view(ctx: StepContext) -> View:
    """The student on the labelled target batch (the oracle's supervision)."""
    xt = target_images(ctx)
    return View(xt, ctx.batch["target_label"].astype(jnp.int32), None,
                ctx.model.forward_train(xt, rng=ctx.key("forward/target")))


def target_valid_mask(ctx: StepContext, shape) -> jax.Array:
    """[B, H, W] bool: where target pseudo-labels may count. DAFormer's crop margins (rows of the
    crop, uda.margin_top / margin_bottom) and, when the batch carries one, the data pipeline's
    `target_valid` mask (HRDA's margins of the full frame, carried through resize, crop and flip)."""
    u = ctx.config.uda
    b, h, w = shape
    valid = uda.crop_margin_mask(b, h, w, top=u.margin_top, bottom=u.margin_bottom)
    if "target_valid" in ctx.batch:
        valid = valid & (ctx.batch["target_valid"] > 0)
    return valid


@register_value("pseudo")
def teacher_pseudo_labels(ctx: StepContext) -> PseudoLabels:
    """The EMA teacher's pseudo-labels on the target crop: its full inference (HRDA: both scales)
    with BatchNorm on the batch's statistics, no dropout (docs/method.md §3.5)."""
    logits = ctx.teacher().infer_logits(target_images(ctx), use_running_average=False)
    logits = jax.lax.stop_gradient(logits)
    labels, weight, share = uda.pseudo_labels(logits, threshold=ctx.config.uda.pseudo_threshold,
                                              valid_mask=target_valid_mask(ctx, logits.shape[:3]))
    ctx.record("pseudo_confident_share", share)
    return PseudoLabels(labels, weight)


@register_value("mixed_batch")
def class_mix_batch(ctx: StepContext) -> MixedBatch:
    """ClassMix of source and target, then the DACS strong augmentation (docs/method.md §3.6)."""
    u = ctx.config.uda
    xs, ys = source_input(ctx)
    pseudo = ctx.get("pseudo")
    mask = uda.class_mix_masks(ctx.key("class_mix"), ys, include_ignore=u.mix_ignore_class,
                               per_image_classes=bool(u.get("mix_per_image_classes", False)))
    images = uda.mix(mask, xs, target_images(ctx))
    if u.strong_augment:
        images = uda.strong_augment(ctx.key("strong_augment"), images, jitter_p=u.jitter_p,
                                    jitter_strength=u.jitter_strength, blur_p=u.blur_p)
    return MixedBatch(images, uda.mix(mask, ys, pseudo.labels),
                      uda.mix(mask, jnp.ones_like(pseudo.weight), pseudo.weight))


@register_value("mixed")
def mixed_view(ctx: StepContext) -> View:
    m = ctx.get("mixed_batch")
    return View(m.images, m.labels, m.weight, ctx.model.forward_train(m.images, rng=ctx.key("forward/mixed")))


@register_value("imnet_source")
def imagenet_source_features(ctx: StepContext):
    """The frozen ImageNet encoder's last stage on the image the source features came from
    (HRDA: the context view), detached."""
    if ctx.imnet is None:
        raise ValueError("the feature distance needs the frozen ImageNet encoder (imnet_graphdef)")
    return jax.lax.stop_gradient(ctx.imnet(ctx.get("source").out.feature_input)[-1])
