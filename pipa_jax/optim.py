"""AdamW with DAFormer's parameter groups and the warmup x poly schedule (docs/method.md §3)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameters of these top-level modules learn at head_lr_mult x lr (official: decode_head; the
# PiPa pixel head sits inside the official decode head, the patch projector beside it).
HEAD_MODULES = ("decode_head", "pixel_head", "patch_head")


def learning_rate_schedule(c: ml_collections.ConfigDict, base_lr: float) -> optax.Schedule:
    """mmcv's linear warmup from base*ratio, multiplied with poly decay (1 - t/T)^p to 0."""
    total, warm, ratio, power = c.total_steps, c.optimizer.warmup_steps, c.optimizer.warmup_ratio, c.optimizer.poly_power

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        poly = ((total - jnp.minimum(t, total)) / total) ** power  # exact near the end in float32
        if warm <= 0:
            return base_lr * poly
        # mmcv's 1 - (1 - t/W)(1 - r), written without float32 cancellation at t = 0.
        warmup = ratio + (1.0 - ratio) * (t / warm)
        return base_lr * poly * jnp.where(t < warm, warmup, 1.0)
    return schedule


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def param_labels(params):
    """'head' | 'encoder' | 'encoder_no_decay' per leaf (LayerNorm scales/biases of the encoder)."""
    def label(path, _):
        names = _path_names(path)
        if names[0] in HEAD_MODULES:
            return "head"
        # Encoder LayerNorms: patch_embed*.norm, block*.norm1/norm2, attn.norm, norm1..4.
        if any(n.startswith("norm") for n in names[1:-1]) or (len(names) > 2 and names[-2] == "norm"):
            return "encoder_no_decay"
        return "encoder"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(c: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
    o = c.optimizer
    lr = learning_rate_schedule(c, o.learning_rate)
    head_lr = learning_rate_schedule(c, o.learning_rate * o.head_lr_mult)
    adamw = lambda sched, wd: optax.adamw(sched, b1=o.b1, b2=o.b2, eps=1e-8, weight_decay=wd)
    return optax.multi_transform(
        {"encoder": adamw(lr, o.weight_decay),
         "encoder_no_decay": adamw(lr, o.weight_decay if o.encoder_norm_decay else 0.0),
         "head": adamw(head_lr, o.weight_decay)},
        param_labels(params),
    )
