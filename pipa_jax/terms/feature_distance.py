"""The ImageNet feature distance on thing classes of the source (docs/method.md §3.4), weighted
by uda.fd_weight (0.005)."""
from __future__ import annotations

from pipa_jax import uda
from pipa_jax.terms.base import Term, TermOut, register_term


def _fd(ctx, state):
    source = ctx.get("source")
    loss, _ = uda.feature_distance_loss(source.out.features[-1], ctx.get("imnet_source"), source.labels,
                                        min_ratio=ctx.config.uda.fd_min_ratio, weight=1.0)
    return TermOut(loss)


@register_term("fd")
def feature_distance(config):
    if not config.uda.fd:
        return None
    return Term("fd", _fd, weight=float(config.uda.fd_weight), needs=("source", "imnet_source"))
