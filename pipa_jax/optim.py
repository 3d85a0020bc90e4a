"""The optimizers of the recipes, their parameter groups and schedules (docs/method.md §3, §14.3).

- 'adamw' (DAFormer, HRDA, MIC, PiPa): AdamW, the head at head_lr_mult x lr, mmcv's linear
  warmup x poly schedule, no decay on the encoder's norm parameters unless encoder_norm_decay.
- 'sgd' (DACS, ProDA): PyTorch SGD (momentum on the decayed gradient, no dampening), the head at
  head_lr_mult x lr, poly 0.9. `sgd_duplicate_updates` reproduces the official DACS parameter
  list, which names every backbone conv several times (the stem once, block convs three times,
  shortcut convs four times): PyTorch then applies the update once per listing, sharing one
  momentum buffer, so those parameters move about 3-4x as far (`repeated_sgd`).
Which encoder parameters are norms, and which are frozen (DACS's BatchNorm affine), is each
backbone's rule (models/registry.py PARAM_RULES), not a name pattern shared by all.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameters of these top-level modules learn at head_lr_mult x lr (official: decode_head; the
# PiPa pixel head sits inside the official decode head, the patch projector beside it).
HEAD_MODULES = ("decode_head", "pixel_head", "patch_head")
OPTIMIZERS = ("adamw", "sgd")
GROUPS = ("head", "encoder", "encoder_no_decay", "encoder_frozen")


def learning_rate_schedule(c: ml_collections.ConfigDict, base_lr: float) -> optax.Schedule:
    """mmcv's linear warmup from base*ratio, multiplied with poly decay (1 - t/T)^p to 0.
    T = optimizer.schedule_steps when set (ProDA decays over 90k steps and stops at 62.4k), else
    total_steps."""
    total = int(c.optimizer.get("schedule_steps", 0)) or c.total_steps
    warm, ratio, power = c.optimizer.warmup_steps, c.optimizer.warmup_ratio, c.optimizer.poly_power

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
    """Module path names of a parameter leaf (without the Variable's trailing '.value')."""
    names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return names[:-1] if names and names[-1] in (".value", "value") else names


def _rules(model_config):
    from pipa_jax.models import registry
    return registry.param_rules(model_config.backbone)


def param_labels(params, model_config):
    """One of GROUPS per leaf: 'head', or for the encoder what its backbone's rule says ('frozen'
    -> 'encoder_frozen', 'no_decay' -> 'encoder_no_decay', None -> 'encoder')."""
    rule = _rules(model_config).param_group

    def label(path, _):
        names = _path_names(path)
        if names[0] in HEAD_MODULES:
            return "head"
        kind = rule(names[1:], model_config) if rule is not None and names[0] == "backbone" else None
        return {"frozen": "encoder_frozen", "no_decay": "encoder_no_decay", None: "encoder"}[kind]
    return jax.tree_util.tree_map_with_path(label, params)


def duplicate_counts(params, model_config):
    """Per leaf: how often the official SGD parameter list names it (1 without a backbone rule)."""
    rule = _rules(model_config).duplicates

    def count(path, _):
        names = _path_names(path)
        return int(rule(names[1:])) if rule is not None and names[0] == "backbone" else 1
    return jax.tree_util.tree_map_with_path(count, params)


class RepeatedSGDState(NamedTuple):
    count: jax.Array
    momentum: optax.Updates


def repeated_sgd(learning_rate: optax.Schedule, momentum: float, lr_mult, weight_decay,
                 repeats) -> optax.GradientTransformation:
    """PyTorch's SGD step (weight decay added to the gradient, then momentum, no dampening or
    Nesterov). Per leaf (trees matching the parameters): the rate lr_mult x learning_rate(step),
    the decay, and `repeats`: the step is applied that many times, each with the decay of the
    parameter as it stands, as torch.optim.SGD does for a parameter listed k times in one group
    (on the first step each listing starts its buffer afresh, since PyTorch reads every buffer
    before updating any; later listings share the one buffer). repeats 0 = frozen, 1 = plain SGD."""

    def init(params):
        return RepeatedSGDState(jnp.zeros((), jnp.int32), jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("repeated_sgd needs the parameters (weight decay reads them)")
        lr = learning_rate(state.count)
        first = state.count == 0

        def one(g, buf, p, mult, wd, k):
            p0 = p.astype(jnp.float32)
            q, g = p0, g.astype(jnp.float32)
            for _ in range(k):
                d = g + wd * q if wd else g
                buf = jnp.where(first, d, momentum * buf + d) if momentum else d
                q = q - (mult * lr) * buf
            return (q - p0).astype(p.dtype), buf

        out = jax.tree.map(one, grads, state.momentum, params, lr_mult, weight_decay, repeats)
        is_pair = lambda o: isinstance(o, tuple)
        return (jax.tree.map(lambda o: o[0], out, is_leaf=is_pair),
                RepeatedSGDState(state.count + 1, jax.tree.map(lambda o: o[1], out, is_leaf=is_pair)))

    return optax.GradientTransformation(init, update)


def make_optimizer(c: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
    o = c.optimizer
    name = o.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer.name = {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    lr = learning_rate_schedule(c, o.learning_rate)
    norm_wd = o.weight_decay if o.encoder_norm_decay else 0.0
    labels = param_labels(params, c.model)
    if name == "adamw":
        head_lr = learning_rate_schedule(c, o.learning_rate * o.head_lr_mult)
        adamw = lambda sched, wd: optax.adamw(sched, b1=o.b1, b2=o.b2, eps=1e-8, weight_decay=wd)
        groups = {"encoder": adamw(lr, o.weight_decay), "encoder_no_decay": adamw(lr, norm_wd),
                  "head": adamw(head_lr, o.weight_decay)}
    else:
        repeats = (duplicate_counts(params, c.model) if o.sgd_duplicate_updates
                   else jax.tree.map(lambda _: 1, params))
        mult = jax.tree.map(lambda lab: o.head_lr_mult if lab == "head" else 1.0, labels)
        wd = jax.tree.map(lambda lab: norm_wd if lab == "encoder_no_decay" else o.weight_decay, labels)
        reps = jax.tree.map(lambda lab, r: 0 if lab == "encoder_frozen" else r, labels, repeats)
        return repeated_sgd(lr, o.momentum, mult, wd, reps)
    # Only a backbone with frozen parameters gets the group, so the optimizer state of every other
    # network keeps the structure it had before the group existed (old checkpoints resume).
    if any(lab == "encoder_frozen" for lab in jax.tree.leaves(labels)):
        groups["encoder_frozen"] = optax.set_to_zero()
    return optax.multi_transform(groups, labels)
