"""Cross-entropy terms: the source labels, the mixed batch with its pseudo-label weights, and the
oracle's target labels. The segmentor defines the loss (EncoderDecoder: upsample + CE; HRDA:
fused + detail, docs/method.md §6.5)."""
from __future__ import annotations

from pipa_jax.terms.base import Term, TermOut, register_term


def supervised_loss_of(view_name: str, average: str = "all"):
    """A term function: the segmentor's supervised loss of the view `view_name` (its labels and
    pixel weights), averaged over all pixels or the labelled ones (`average`)."""
    def fn(ctx, state):
        v = ctx.get(view_name)
        return TermOut(ctx.model.supervised_loss(v.out, v.labels, v.weight, average=average))
    return fn


@register_term("source_ce")
def source_ce(config):
    # uda.source_ce_average: 'all' (mmseg, DAFormer-family) or 'valid' (DACS's CrossEntropy2d).
    return Term("source_ce", supervised_loss_of("source", config.uda.get("source_ce_average", "all")),
                needs=("source",))


@register_term("target_ce")
def target_ce(config):
    if not config.uda.target_supervised:
        return None
    return Term("target_ce", supervised_loss_of("target"), needs=("target",))


@register_term("mix_ce")
def mix_ce(config):
    # ProDA's self-training (uda.class_mix False) has no mixed batch.
    if not config.uda.self_training or not config.uda.get("class_mix", True):
        return None
    return Term("mix_ce", supervised_loss_of("mixed"), needs=("mixed",))
