"""One DAFormer + PiPa training iteration as a pure function (METHOD.md §3-5).

`make_train_step(config, graphdef, tx, imnet_graphdef)` returns
`train_step(state, batch, imnet_params) -> (state, metrics)`: EMA teacher update, teacher
pseudo-labels, ClassMix, strong augmentation, source CE, pixel contrast, ImageNet feature
distance, mixed CE, patch contrast and one AdamW update, with no host round trip. The frozen
ImageNet encoder is an argument (not a closure constant, not part of the checkpointed state).
Randomness: `fold_in(key(seed), step)`, split by purpose, so a resumed run draws the same numbers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from pipa_jax import labels as L
from pipa_jax import losses, uda
from pipa_jax.models import layers
from pipa_jax.optim import learning_rate_schedule
from pipa_jax.state import TrainState
from pipa_jax.uda import patch as patch_ops

# Loss terms in a fixed order: the non-finite bitmask indexes this tuple.
TERMS = ("source_ce", "pixel", "fd", "mix_ce", "patch", "target_ce")


def normalize(images):
    """uint8 RGB [B, H, W, 3] -> float32 normalised with the ImageNet mean/std."""
    return (images.astype(jnp.float32) - jnp.asarray(L.IMAGE_MEAN)) / jnp.asarray(L.IMAGE_STD)


def _upsample(logits, size):
    return layers.resize_bilinear(logits.astype(jnp.float32), size)


def make_train_step(config: ml_collections.ConfigDict, graphdef, tx: optax.GradientTransformation,
                    imnet_graphdef=None):
    c = config
    st = c.uda.self_training
    pixel_on, patch_on, fd_on = c.pipa.pixel.enabled, c.pipa.patch.enabled, c.uda.fd
    if fd_on and imnet_graphdef is None:
        raise ValueError("uda.fd needs the frozen ImageNet encoder (imnet_graphdef)")
    if patch_on and not st:
        raise ValueError("pipa.patch.enabled needs uda.self_training (see config.validate)")
    crop_hw = tuple(c.pipa.patch.crop_size)
    patch_gate = resolve_patch_gate(c.pipa.patch.get("gate", "auto"))
    schedule = learning_rate_schedule(c, c.optimizer.learning_rate)
    root_key = jax.random.key(c.seed)

    def merge(params, batch_stats):
        # Rebuild the Variables at the current trace level (the identity tree.map does that):
        # BatchNorm updates its statistics in place, and NNX refuses to mutate a Variable that
        # was created under an outer trace (jit outside, grad or cond inside).
        return nnx.merge(graphdef, *jax.tree.map(lambda v: v, (params, batch_stats)))

    def patch_term(params, batch_stats, key, images, labels_img, bank):
        """Two overlapping crops through the student; returns (loss, counted, push items)."""
        kb, kf1, kf2, kr1, kr2 = jax.random.split(key, 5)
        h, w = images.shape[1:3]
        box1, box2 = patch_ops.sample_crop_pair(kb, (h, w), crop_hw, stride=8,
                                                iou_range=tuple(c.pipa.patch.iou_range))
        # A separate merge: BatchNorm runs on batch statistics, but the crops' statistics do
        # not enter the running averages (official training has no such forward).
        model = merge(params, batch_stats)
        outs = []
        for box, kf, kr in ((box1, kf1, kr1), (box2, kf2, kr2)):
            x = patch_ops.crop(images, box, crop_hw)
            flag = jnp.zeros((), bool)
            if c.pipa.patch.flip:
                x, flag = patch_ops.maybe_flip(kf, x)
            logits, feats = model(x, train=True, rng=kr, return_features=True)
            emb = patch_ops.unflip(model.patch_head(feats["fused"]), flag)
            # Stride-4 logits: the confidence of a cell is read at its top-left pixel, like its label.
            outs.append((emb, patch_ops.unflip(jax.lax.stop_gradient(logits), flag)))
        labels1, labels2 = (patch_ops.cell_labels(patch_ops.crop(labels_img, b, crop_hw), stride=8)
                            for b in (box1, box2))
        return patch_ops.patch_contrast_loss(
            outs[0][0], outs[1][0], outs[0][1], outs[1][1], labels1, box1, box2, crop_hw, 8, bank,
            labels2=labels2, temperature=c.pipa.patch.temperature,
            confidence_threshold=c.pipa.patch.confidence_threshold, chunk_size=c.pipa.patch.chunk_size)

    def train_step(state: TrainState, batch: dict, imnet_params=None):
        rng = jax.random.fold_in(root_key, state.step)
        (k_src, k_mix, k_aug, k_mixfwd, k_pix, k_patch, k_bank, k_tgt) = jax.random.split(rng, 8)
        xs = normalize(batch["source_image"])
        ys = batch["source_label"].astype(jnp.int32)
        size = ys.shape[1:3]
        metrics = {}

        teacher = state.teacher_params
        if st:
            teacher = uda.ema_update(state.teacher_params, state.params, state.step, alpha=c.uda.ema_alpha)
            metrics["ema_alpha"] = uda.ema_alpha(state.step, alpha=c.uda.ema_alpha)
            xt = normalize(batch["target_image"])
            t_logits = merge(teacher, state.batch_stats)(xt, train=False, use_running_average=False)
            t_logits = jax.lax.stop_gradient(_upsample(t_logits, size))
            margin = uda.crop_margin_mask(xt.shape[0], size[0], size[1], top=c.uda.margin_top,
                                          bottom=c.uda.margin_bottom)
            pl, pw, share = uda.pseudo_labels(t_logits, threshold=c.uda.pseudo_threshold, valid_mask=margin)
            metrics["pseudo_confident_share"] = share
            mix_mask = uda.class_mix_masks(k_mix, ys, include_ignore=c.uda.mix_ignore_class)
            xm = uda.mix(mix_mask, xs, xt)
            ym = uda.mix(mix_mask, ys, pl)
            wm = uda.mix(mix_mask, jnp.ones_like(pw), pw)
            if c.uda.strong_augment:
                xm = uda.strong_augment(k_aug, xm, jitter_p=c.uda.jitter_p,
                                        jitter_strength=c.uda.jitter_strength, blur_p=c.uda.blur_p)
        if fd_on:
            imnet = nnx.merge(imnet_graphdef, imnet_params)
            f_imnet = jax.lax.stop_gradient(imnet(xs)[-1])

        def loss_fn(params):
            model = merge(params, state.batch_stats)
            terms, aux = {}, {}
            logits_s, feats_s = model(xs, train=True, rng=k_src, return_features=True)
            terms["source_ce"] = losses.cross_entropy(_upsample(logits_s, size), ys)
            if pixel_on:
                emb = model.pixel_head(feats_s["stages"], use_running_average=False)
                lab4 = layers.resize_nearest(ys, emb.shape[1:3])
                hard = jnp.argmax(jax.lax.stop_gradient(logits_s), axis=-1) != lab4
                p = c.pipa.pixel
                terms["pixel"] = losses.pixel_contrast_from_maps(
                    k_pix, emb, lab4, hard, num_classes=L.NUM_CLASSES, max_samples=p.max_samples,
                    max_views=p.max_views, min_pixels=p.min_pixels,
                    include_ignore_class=p.include_ignore_class, temperature=p.temperature,
                    base_temperature=p.base_temperature)
            if fd_on:
                terms["fd"], _ = uda.feature_distance_loss(
                    feats_s["stages"][-1], f_imnet, ys, min_ratio=c.uda.fd_min_ratio, weight=c.uda.fd_weight)
            if c.uda.target_supervised:
                logits_t = model(normalize(batch["target_image"]), train=True, rng=k_tgt)
                terms["target_ce"] = losses.cross_entropy(
                    _upsample(logits_t, size), batch["target_label"].astype(jnp.int32))
            if st:
                logits_m = model(xm, train=True, rng=k_mixfwd)
                terms["mix_ce"] = losses.cross_entropy(_upsample(logits_m, size), ym, wm)
            new_bs = nnx.state(model, nnx.BatchStat)
            if patch_on:
                active = state.step >= c.pipa.patch.start_step

                def on(_):
                    return patch_term(params, state.batch_stats, k_patch, xm, ym, state.bank)

                if patch_gate == "cond":
                    zero_push = jax.tree.map(jnp.zeros_like, jax.eval_shape(on, None)[2])

                    def off(_):
                        return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), zero_push
                    loss_p, counted, push = jax.lax.cond(active, on, off, None)
                else:
                    # Computed every step and masked before start_step; the bank update below
                    # is gated by `active` as well.
                    loss_p, counted, push = on(None)
                    loss_p = jnp.where(active, loss_p, 0.0)
                    counted = jnp.where(active, counted, 0)
                terms["patch"] = loss_p
                aux["patch_counted"] = counted
                aux["patch_push"] = push
                aux["patch_active"] = active
            weights = {"source_ce": 1.0, "pixel": c.pipa.pixel.weight, "fd": 1.0, "mix_ce": 1.0,
                       "patch": c.pipa.patch.weight, "target_ce": 1.0}
            total = sum(weights[k] * v for k, v in terms.items())
            return total, (terms, new_bs, aux)

        (total, (terms, new_bs, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        tx_updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, tx_updates)

        bank = state.bank
        if patch_on:
            push = aux["patch_push"]
            pushed = patch_ops.push_bank(bank, k_bank, *push, num=c.pipa.patch.bank_cells)
            bank = jax.tree.map(lambda new, old: jnp.where(aux["patch_active"], new, old), pushed, bank)
            metrics["patch_counted"] = aux["patch_counted"]

        # A non-finite loss or gradient skips the update, so the state (and any checkpoint of it)
        # stays the last good one; the host reads `nonfinite` at log steps and stops the run.
        gnorm = optax.global_norm(grads)
        term_ok = [jnp.isfinite(terms[t]) if t in terms else jnp.array(True) for t in TERMS]
        ok = jnp.all(jnp.stack(term_ok)) & jnp.isfinite(gnorm) & jnp.isfinite(total)
        bad_mask = sum(jnp.where(f, 0, 1 << i) for i, f in enumerate(term_ok + [jnp.isfinite(gnorm)]))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = state.replace(
            step=jnp.where(ok, state.step + 1, state.step),
            params=keep(new_params, state.params),
            batch_stats=keep(new_bs, state.batch_stats),
            teacher_params=keep(teacher, state.teacher_params),
            opt_state=keep(new_opt, state.opt_state),
            bank=keep(bank, state.bank),
        )
        metrics.update({f"loss/{k}": v for k, v in terms.items()})
        metrics["loss/total"] = total
        metrics["grad_norm"] = gnorm
        metrics["learning_rate"] = schedule(state.step)
        metrics["nonfinite_mask"] = jnp.asarray(bad_mask, jnp.int32)
        return new_state, metrics

    return train_step


def resolve_patch_gate(gate: str) -> str:
    """How the patch term is switched on at `pipa.patch.start_step`.

    'cond' runs it under lax.cond, so no work is done before the start step (GPU / TPU).
    'mask' computes it every step and zeroes it before the start step: XLA:CPU runs the large
    convolutions and matmuls inside a conditional's branch far slower than at top level
    (measured on this 2-core CPU, MiT-b0 DAFormer + PiPa step at 256x256, batch 2 + 2:
    95 s with cond, 6.6 s without), so computing it unconditionally is much cheaper there.
    'auto' picks 'mask' on CPU and 'cond' elsewhere. Both give the same updates.
    """
    if gate not in ("auto", "cond", "mask"):
        raise ValueError(f"config.pipa.patch.gate = {gate!r}: expected 'auto', 'cond' or 'mask'")
    if gate == "auto":
        return "mask" if jax.default_backend() == "cpu" else "cond"
    return gate


def describe_nonfinite(mask: int) -> list[str]:
    """Names of the non-finite terms in a `nonfinite_mask` (the last bit: the gradient)."""
    return [t for i, t in enumerate(TERMS + ("gradient",)) if mask & (1 << i)]
