"""PiPa's patch-wise contrast (docs/method.md §5): two overlapping crops of the mixed image through
the student (a separate merge: their BatchNorm statistics do not enter the running averages),
the patch head on the segmentor's `patch_view` (EncoderDecoder: the decoder's fused map; HRDA:
the context view's), and a FIFO bank of detached cells from the last steps as the term's state."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pipa_jax.terms.base import Term, TermOut, register_term
from pipa_jax.uda import patch as patch_ops


def _patch(ctx, bank):
    p = ctx.config.pipa.patch
    mixed = ctx.get("mixed_batch")
    model = ctx.fresh_model()
    stride = 2 * model.decoder_stride      # the patch head pools the decoder's map 2x2
    crop_hw = tuple(p.crop_size)
    boxes = patch_ops.sample_crop_pair(ctx.key("patch/boxes"), mixed.images.shape[1:3], crop_hw, stride=stride,
                                       iou_range=tuple(p.iou_range))
    outs = []
    for i, box in enumerate(boxes):
        x = patch_ops.crop(mixed.images, box, crop_hw)
        flag = jnp.zeros((), bool)
        if p.flip:
            x, flag = patch_ops.maybe_flip(ctx.key(f"patch/flip{i}"), x)
        out = model.forward_train(x, rng=ctx.key(f"patch/forward{i}"))
        feats, logits = model.patch_view(out)
        # The confidence of a cell is read at its top-left pixel, like its label.
        outs.append((patch_ops.unflip(model.patch_head(feats), flag),
                     patch_ops.unflip(jax.lax.stop_gradient(logits), flag)))
    labels1, labels2 = (patch_ops.cell_labels(patch_ops.crop(mixed.labels, b, crop_hw), stride=stride)
                        for b in boxes)
    loss, counted, push = patch_ops.patch_contrast_loss(
        outs[0][0], outs[1][0], outs[0][1], outs[1][1], labels1, boxes[0], boxes[1], crop_hw, stride, bank,
        labels2=labels2, temperature=p.temperature, confidence_threshold=p.confidence_threshold,
        chunk_size=p.chunk_size)
    bank = patch_ops.push_bank(bank, ctx.key("patch/bank"), *push, num=p.bank_cells)
    return TermOut(loss, bank, {"patch_counted": counted})


@register_term("patch")
def patch_contrast(config):
    p = config.pipa.patch
    if not p.enabled:
        return None
    size = p.bank_steps * 2 * p.bank_cells  # steps x 2 crops x cells
    return Term("patch", _patch, weight=float(p.weight), start_step=int(p.start_step), needs=("mixed_batch",),
                init_state=lambda: patch_ops.init_bank(size, config.model.patch_proj_dim))
