"""PiPa's pixel-wise contrast on the source view (docs/method.md §4): the pixel head's embeddings of
the segmentor's `pixel_view` (EncoderDecoder: the encoder maps; HRDA: the detail crop's, with the
label cropped by the same box), anchors split into hard / easy by the student's own prediction."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pipa_jax import labels as L
from pipa_jax import losses
from pipa_jax.models import layers
from pipa_jax.terms.base import Term, TermOut, register_term


def _pixel(ctx, state):
    p = ctx.config.pipa.pixel
    source = ctx.get("source")
    stages, labels, logits = ctx.model.pixel_view(source.out, source.labels)
    emb = ctx.model.pixel_head(stages, use_running_average=False)
    lab = layers.resize_nearest(labels, emb.shape[1:3])
    pred = jnp.argmax(jax.lax.stop_gradient(layers.resize_nearest(logits, emb.shape[1:3])), axis=-1)
    return TermOut(losses.pixel_contrast_from_maps(
        ctx.key("pixel_anchors"), emb, lab, pred != lab, num_classes=L.NUM_CLASSES, max_samples=p.max_samples,
        max_views=p.max_views, min_pixels=p.min_pixels, include_ignore_class=p.include_ignore_class,
        temperature=p.temperature, base_temperature=p.base_temperature))


@register_term("pixel")
def pixel_contrast(config):
    if not config.pipa.pixel.enabled:
        return None
    return Term("pixel", _pixel, weight=float(config.pipa.pixel.weight), needs=("source",))
