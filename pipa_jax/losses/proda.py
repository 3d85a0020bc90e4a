"""ProDA's losses and prototype operations (docs/method.md §15), as pure JAX functions on NHWC maps.

Shapes: features [B, H, W, D], logits [B, H, W, K], prototypes [K, D], labels [B, H, W] int
(IGNORE = 255). Everything is computed in float32. The distance to the prototypes uses the
expanded form |f|^2 - 2 f.p + |p|^2 (one [BHW, K] matrix product, never a [BHW, K, D] difference).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = 255
RCE_ONEHOT_FLOOR = 1e-4      # log(1e-4) = -9.2103: RCE = 9.2103 (1 - p_y) on a clamped softmax
RCE_PROB_FLOOR = 1e-7


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def prototype_distances(feat, prototypes):
    """[B, H, W, K] Euclidean distance of every feature to every prototype."""
    f, p = _f32(feat), _f32(prototypes)
    d2 = (jnp.sum(f * f, -1, keepdims=True) - 2.0 * jnp.einsum("bhwd,kd->bhwk", f, p)
          + jnp.sum(p * p, -1))
    # The floor keeps the gradient of sqrt finite where a feature sits on a prototype.
    return jnp.sqrt(jnp.maximum(d2, 1e-12))


def prototype_weights(feat, prototypes, temperature: float):
    """ProDA's rectification weights: softmax_k(-(d_k - min_j d_j) * T) [B, H, W, K]."""
    d = prototype_distances(feat, prototypes)
    return jax.nn.softmax(-(d - jnp.min(d, -1, keepdims=True)) * temperature, axis=-1)


def rectified_pseudo_labels(ema_feat, prototypes, soft_labels, *, temperature: float = 1.0,
                            threshold: float = 0.0):
    """Prototype-rectified pseudo-labels: argmax_k(w_k * p_k) with w = prototype_weights of the
    EMA features and p the soft pseudo-label [B, H, W, K]. Pixels whose renormalised maximum
    max_k(w p) / sum_k(w p) is below `threshold` become IGNORE (official --train_thred, 0: none).
    Returns (labels int32 [B, H, W], the renormalised rectified distribution [B, H, W, K])."""
    rect = prototype_weights(ema_feat, prototypes, temperature) * _f32(soft_labels)
    rect = rect / jnp.maximum(jnp.sum(rect, -1, keepdims=True), 1e-12)
    labels = jnp.argmax(rect, -1).astype(jnp.int32)
    if threshold > 0:
        labels = jnp.where(jnp.max(rect, -1) < threshold, IGNORE, labels)
    return labels, rect


def reverse_cross_entropy(logits, labels):
    """RCE of symmetric CE: mean over labelled pixels of -sum_k p_k log(clamp(onehot_k, 1e-4, 1)),
    p = clamp(softmax, 1e-7, 1) (= 9.2103 * sum of the clamped p off the label)."""
    p = jnp.clip(jax.nn.softmax(_f32(logits), -1), RCE_PROB_FLOOR, 1.0)
    valid = labels != IGNORE
    onehot = jax.nn.one_hot(jnp.where(valid, labels, 0), logits.shape[-1], dtype=jnp.float32)
    per_pixel = -jnp.sum(p * jnp.log(jnp.clip(onehot, RCE_ONEHOT_FLOOR, 1.0)), -1)
    v = valid.astype(jnp.float32)
    return jnp.sum(per_pixel * v) / (jnp.sum(v) + 1e-6)


def kl_regulariser(logits):
    """MRKLD: -mean over every element (N*K*H*W) of log_softmax (a KL to the uniform distribution
    up to a constant), ProDA's `regular_type='MRKLD'`."""
    return -jnp.mean(jax.nn.log_softmax(_f32(logits), -1))


def prototype_consistency(teacher_feat, student_feat, prototypes, mask, *, temperature: float = 1.0):
    """ProDA's structure-learning KL: teacher q = softmax(-d(teacher_feat) T), student
    log s = log_softmax(-d(student_feat) T), summed KL(q || s) over the masked pixels divided by
    (masked pixels x K), the official mean over masked N*K*H*W elements. `mask` [B, H, W] bool."""
    q = jax.lax.stop_gradient(jax.nn.softmax(-prototype_distances(teacher_feat, prototypes) * temperature, -1))
    log_s = jax.nn.log_softmax(-prototype_distances(student_feat, prototypes) * temperature, -1)
    kl = jnp.sum(jnp.where(q > 0, q * (jnp.log(jnp.where(q > 0, q, 1.0)) - log_s), 0.0), -1)
    m = _f32(mask)
    return jnp.sum(kl * m) / jnp.maximum(jnp.sum(m) * prototypes.shape[0], 1.0)


def class_means(feat, labels, num_classes: int, *, min_pixels: int = 10):
    """Per image and class: the mean feature over the pixels labelled k and whether there are at
    least `min_pixels` of them. Returns (means [B, K, D], present [B, K] bool)."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)          # IGNORE -> zeros
    counts = jnp.sum(onehot, axis=(1, 2))                                       # [B, K]
    sums = jnp.einsum("bhwk,bhwd->bkd", onehot, _f32(feat))
    means = sums / jnp.maximum(counts, 1.0)[..., None]
    return means, counts >= min_pixels


def update_prototypes(prototypes, feat, labels, *, momentum: float = 1e-4, min_pixels: int = 10):
    """ProDA's moving prototypes: for each image in order and each class with >= min_pixels pixels
    of that (EMA argmax) label, eta_k <- (1 - momentum) eta_k + momentum * mean feature."""
    means, present = class_means(feat, labels, prototypes.shape[0], min_pixels=min_pixels)

    def one(protos, x):
        m, ok = x
        return jnp.where(ok[:, None], (1.0 - momentum) * protos + momentum * m, protos), None

    out, _ = jax.lax.scan(one, _f32(prototypes), (means, present))
    return out


def distillation_kl(student_logits, teacher_logits, *, reproduce_softmax_bug: bool = False):
    """Self-distillation KD: F.kl_div(input, softmax(teacher), 'sum') / (N*K*H*W), input =
    log_softmax(student) (the intended loss) or softmax(student) with `reproduce_softmax_bug`
    (what the official code computes and its published numbers used)."""
    t = jax.lax.stop_gradient(jax.nn.softmax(_f32(teacher_logits), -1))
    s = (jax.nn.softmax if reproduce_softmax_bug else jax.nn.log_softmax)(_f32(student_logits), -1)
    return jnp.mean(jnp.where(t > 0, t * (jnp.log(jnp.where(t > 0, t, 1.0)) - s), 0.0))


def lsgan_loss(d_out, target: float):
    """Least-squares GAN loss: mean((D - target)^2)."""
    return jnp.mean(jnp.square(_f32(d_out) - target))
