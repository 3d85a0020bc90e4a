"""MIC: masked image consistency (docs/method.md §7), one view and one term on the step's seams.

The masked view: the target batch, colour-augmented with the DACS strong augmentation as one
batch call (jitter with p 0.8, factors per image and one order; blur with p 0.5 and one sigma for
the batch), then block-masked (grid round(H/b) x round(W/b), each cell masked with probability
mic.mask_ratio, per image; masked pixels 0 in normalised space), through the student's training
forward (HRDA: the full two-scale forward with its own detail box). Its target: the EMA teacher's
pseudo-labels of the UNMASKED target and their unmixed weight (the confident share q with the
margins), the same ones ClassMix uses. The term is the segmentor's supervised loss on it, weighted
by mic.weight (1.0).
"""
from __future__ import annotations

from pipa_jax import uda
from pipa_jax.terms.base import StepContext, Term, View, register_term, register_value
from pipa_jax.terms.supervised import supervised_loss_of
from pipa_jax.terms.views import target_images
from pipa_jax.uda import masking


@register_value("masked")
def masked_view(ctx: StepContext) -> View:
    m, u = ctx.config.mic, ctx.config.uda
    pseudo = ctx.get("pseudo")
    x = target_images(ctx)
    if m.color_augment:
        x = uda.strong_augment(ctx.key("mic/augment"), x, jitter_p=u.jitter_p, jitter_strength=u.jitter_strength,
                               blur_p=u.blur_p, per_image_order=False, per_image_sigma=False)
    x = masking.mask_images(ctx.key("mic/mask"), x, int(m.block_size), float(m.mask_ratio))
    # mic.pseudo_weight=False: every pixel of the masked view counts with weight 1 (the official
    # mask_pseudo_threshold=None ablation).
    weight = pseudo.weight if m.pseudo_weight else None
    return View(x, pseudo.labels, weight, ctx.model.forward_train(x, rng=ctx.key("forward/masked")))


@register_term("mic")
def masked_consistency(config):
    if not config.mic.enabled:
        return None
    return Term("mic", supervised_loss_of("masked"), weight=float(config.mic.weight), needs=("masked",))
