"""ProDA (docs/method.md §15): its warm-up, stage 1 and stages 2-3 as values and terms on the
step's seams. `config.proda.stage` picks them ('' = not ProDA):

- 'warmup': the source CE plus, with proda.warmup='adversarial', the output-space LS-GAN term
  `proda_adv` (an FCDiscriminator kept, with its own Adam, in the term's state and trained inside
  the same pure step); proda.warmup='source_only' is the source CE alone.
- 'stage1': prototype-based pseudo-label denoising and target structure learning: the EMA teacher's
  features rectify the frozen warm-up model's soft pseudo-labels (`proda_cts`: 0.1 CE + 1.0 RCE
  of the weak-view student), the KL regulariser (`proda_reg`), the prototype consistency between the
  teacher's weak and the student's strong view (`proda_consist`, x10), and the moving prototypes
  (`proda_prototypes`, the term state the others read; loss 0).
- 'stage2' / 'stage3': self-distillation from a frozen teacher (the previous stage): its hard,
  flip-averaged pseudo-labels with the 0.95 confidence cut (`proda_target_ce` on the strong view)
  and the KL of its soft predictions (`proda_kd`; the official softmax-for-log_softmax bug behind
  proda.kd_softmax_bug).

Everything ProDA computes on the target is at a quarter of the crop (its 128x224 of 512x896
crops): the student's and teacher's logits and 256-d features are resized there (bilinear,
align_corners as the official code). The frozen network (warm-up model, stage teacher) is the
step's frozen argument (ctx.imnet), in evaluation mode.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pipa_jax import uda
from pipa_jax.labels import IMAGE_MEAN, IMAGE_STD
from pipa_jax.losses import cross_entropy
from pipa_jax.losses import proda as P
from pipa_jax.models.layers import resize_bilinear, resize_nearest
from pipa_jax.terms.base import StepContext, Term, TermOut, View, register_term, register_value
from pipa_jax.terms.views import target_images

STAGES = ("", "warmup", "stage1", "stage2", "stage3")
LABEL_STRIDE = 4
CUTOUT_GREY = 127.0
SOURCE_DOMAIN, TARGET_DOMAIN = 0.0, 1.0     # LS-GAN labels of the official warm-up


def stage_of(config) -> str:
    return str(config.get("proda", {}).get("stage", ""))


def label_size(x) -> tuple[int, int]:
    return x.shape[1] // LABEL_STRIDE, x.shape[2] // LABEL_STRIDE


def at_label_size(x, size):
    return resize_bilinear(jnp.asarray(x, jnp.float32), size, align_corners=True)


def _frozen(ctx: StepContext):
    if ctx.imnet is None:
        raise ValueError(f"ProDA {stage_of(ctx.config)} needs its frozen network (config.proda.frozen_from)")
    return ctx.imnet


# ----------------------------------------------------------------------------- views

@register_value("proda/weak")
def weak_target_view(ctx: StepContext) -> View:
    """The student on the target batch as the pipeline delivers it (ProDA's weak view: resize,
    crop, flip)."""
    x = target_images(ctx)
    return View(x, None, None, ctx.model.forward_train(x, rng=ctx.key("forward/proda_weak")))


@dataclasses.dataclass(frozen=True)
class StrongBatch:
    images: jax.Array     # [B, H, W, 3] normalised strong view
    keep: jax.Array       # [B, h, w] bool at label size: False inside the cutout


def cutout_mask(key, batch: int, hw, side: int) -> jax.Array:
    """[B, H, W] bool: a side x side square per image at a uniformly drawn centre, clipped to the
    image (FixMatch's CutoutAbs)."""
    h, w = hw
    cy, cx = (jax.random.uniform(key, (2, batch)) * jnp.asarray([[h], [w]], jnp.float32)).astype(jnp.int32)
    y0, x0 = jnp.maximum(cy - side // 2, 0), jnp.maximum(cx - side // 2, 0)
    y1, x1 = jnp.minimum(y0 + side, h), jnp.minimum(x0 + side, w)
    ys, xs = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    return ((ys >= y0[:, None, None]) & (ys < y1[:, None, None]) & (xs >= x0[:, None, None])
            & (xs < x1[:, None, None]))


@register_value("proda/strong_batch")
def strong_batch(ctx: StepContext) -> StrongBatch:
    """The strong view: the DACS colour jitter and blur (uda.jitter_* / blur_p) of the weak view,
    then (proda.cutout) a grey square of side min(H, W) // 3 whose pixels no target counts."""
    p, u = ctx.config.proda, ctx.config.uda
    x = uda.strong_augment(ctx.key("proda/strong_augment"), target_images(ctx), jitter_p=u.jitter_p,
                           jitter_strength=u.jitter_strength, blur_p=u.blur_p)
    b, h, w = x.shape[:3]
    keep = jnp.ones((b, h, w), bool)
    if p.cutout:
        hole = cutout_mask(ctx.key("proda/cutout"), b, (h, w), min(h, w) // 3)
        grey = jnp.asarray((CUTOUT_GREY - IMAGE_MEAN) / IMAGE_STD, jnp.float32)
        x = jnp.where(hole[..., None], grey, x)
        keep = ~hole
    return StrongBatch(x, resize_nearest(keep, label_size(x)))


@register_value("proda/strong")
def strong_view(ctx: StepContext) -> View:
    s = ctx.get("proda/strong_batch")
    return View(s.images, None, None, ctx.model.forward_train(s.images, rng=ctx.key("forward/proda_strong")))


@dataclasses.dataclass(frozen=True)
class Outputs:
    logits: jax.Array     # [B, h, w, K] at label size
    feat: jax.Array       # [B, h, w, D] at label size


@register_value("proda/ema")
def ema_outputs(ctx: StepContext) -> Outputs:
    """The EMA teacher on the weak target view, detached. As the official code, it stays in
    training mode (BatchNorm on the batch's statistics, proda.teacher_dropout: Dropout2d on)."""
    x = target_images(ctx)
    teacher = ctx.teacher()
    if ctx.config.proda.teacher_dropout:
        out = teacher.forward_train(x, rng=ctx.key("forward/proda_ema"))
        logits, feat = out.logits, out.decoder_features
    else:
        logits, f = teacher(x, train=False, use_running_average=False, return_features=True)
        feat = f["fused"]
    size = label_size(x)
    return Outputs(jax.lax.stop_gradient(at_label_size(logits, size)), jax.lax.stop_gradient(at_label_size(feat, size)))


@register_value("proda/soft")
def soft_pseudo_labels(ctx: StepContext) -> jax.Array:
    """[B, h, w, K]: the frozen warm-up model's softmax on the weak target view at label size."""
    x = target_images(ctx)
    logits = _frozen(ctx)(x, train=False)
    return jax.lax.stop_gradient(at_label_size(jax.nn.softmax(logits.astype(jnp.float32), -1), label_size(x)))


@register_value("proda/rectified")
def rectified_labels(ctx: StepContext) -> jax.Array:
    p = ctx.config.proda
    soft = ctx.get("proda/soft")
    labels, _ = P.rectified_pseudo_labels(ctx.get("proda/ema").feat, ctx.term_states["proda_prototypes"], soft,
                                          temperature=p.temperature, threshold=p.rectify_threshold)
    ctx.record("proda/rectified_changed", jnp.mean((labels != jnp.argmax(soft, -1)).astype(jnp.float32)))
    return labels


@register_value("proda/hard")
def hard_pseudo_labels(ctx: StepContext) -> jax.Array:
    """[B, h, w] int32: the frozen teacher's flip-averaged prediction on the weak target view, IGNORE
    where its confidence is <= proda.pl_threshold or in the strong view's cutout."""
    p = ctx.config.proda
    x = target_images(ctx)
    teacher = _frozen(ctx)
    prob = jax.nn.softmax(teacher.infer_logits(x), -1)
    if p.pl_flip:
        prob = 0.5 * (prob + jax.nn.softmax(teacher.infer_logits(x[:, :, ::-1]), -1)[:, :, ::-1])
    labels = jnp.where(jnp.max(prob, -1) > p.pl_threshold, jnp.argmax(prob, -1), P.IGNORE).astype(jnp.int32)
    labels = resize_nearest(labels, label_size(x))
    labels = jnp.where(ctx.get("proda/strong_batch").keep, labels, P.IGNORE)
    ctx.record("proda/pseudo_labelled_share", jnp.mean((labels != P.IGNORE).astype(jnp.float32)))
    return jax.lax.stop_gradient(labels)


# ----------------------------------------------------------------------------- terms

def _student_logits(ctx, view: str):
    v = ctx.get(view)
    return at_label_size(v.out.logits, label_size(v.images))


def _cts(ctx: StepContext, state) -> TermOut:
    p = ctx.config.proda
    logits = _student_logits(ctx, "proda/weak")
    labels = ctx.get("proda/rectified")
    ce = cross_entropy(logits, labels, average="valid")
    if not p.rce:
        return TermOut(ce)
    rce = P.reverse_cross_entropy(logits, labels)
    return TermOut(p.rce_alpha * ce + p.rce_beta * rce, None, {"proda/ce": ce, "proda/rce": rce})


def _consist(ctx: StepContext, state) -> TermOut:
    p = ctx.config.proda
    v = ctx.get("proda/strong")
    feat = at_label_size(v.out.decoder_features, label_size(v.images))
    return TermOut(P.prototype_consistency(ctx.get("proda/ema").feat, feat, ctx.term_states["proda_prototypes"],
                                           ctx.get("proda/strong_batch").keep, temperature=p.temperature))


def load_prototypes(path: str, num_classes: int) -> np.ndarray:
    """The initial prototypes [K, 256] written by `python -m pipa_jax.proda prototypes`."""
    import os
    if not path or not os.path.exists(path):
        raise FileNotFoundError(
            f"ProDA stage 1 needs its initial prototypes (config.proda.prototypes = {path!r} does not exist); "
            "make them from the warm-up run with: python -m pipa_jax.proda prototypes --config <config>:stage=stage1 "
            "--workdir <workdir> (or run every stage in order: python -m pipa_jax.proda run ...)")
    with np.load(path) as f:
        protos = np.asarray(f["prototypes"], np.float32)
    if protos.ndim != 2 or protos.shape[0] != num_classes:
        raise ValueError(f"{path}: prototypes of shape {protos.shape}; expected [{num_classes}, feature dim]")
    return protos


def _update_prototypes(ctx: StepContext, state) -> TermOut:
    p = ctx.config.proda
    ema = ctx.get("proda/ema")
    new = P.update_prototypes(state, ema.feat, jnp.argmax(ema.logits, -1), momentum=p.proto_momentum,
                              min_pixels=p.proto_min_pixels)
    return TermOut(jnp.zeros((), jnp.float32), new, {"proda/prototype_shift": jnp.max(jnp.abs(new - state))})


def _target_ce(ctx: StepContext, state) -> TermOut:
    return TermOut(cross_entropy(_student_logits(ctx, "proda/strong"), ctx.get("proda/hard"), average="valid"))


def _kd(ctx: StepContext, state) -> TermOut:
    s = ctx.get("proda/strong_batch").images
    teacher = jax.lax.stop_gradient(at_label_size(_frozen(ctx)(s, train=False), label_size(s)))
    return TermOut(P.distillation_kl(_student_logits(ctx, "proda/strong"), teacher,
                                     reproduce_softmax_bug=bool(ctx.config.proda.kd_softmax_bug)))


def _adversarial(config):
    """The warm-up's LS-GAN term: the student's target softmax (at the crop size) is pushed
    towards the discriminator's source label (weight proda.adv_weight); inside the same step the
    discriminator (term state) takes one Adam step on MSE(D(source), 0) + MSE(D(target), 1) of the
    detached probabilities, with the poly schedule of the run."""
    from pipa_jax.models.discriminator import FCDiscriminator
    from pipa_jax.optim import learning_rate_schedule
    p = config.proda
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: FCDiscriminator(config.model.num_classes,
                                                                             rngs=nnx.Rngs(0))), nnx.Param)
    tx = optax.adam(learning_rate_schedule(config, p.disc_lr), b1=p.disc_b1, b2=p.disc_b2)

    def init_state():
        _, params = nnx.split(FCDiscriminator(config.model.num_classes, rngs=nnx.Rngs(config.seed + 7919)), nnx.Param)
        return {"params": params, "opt": tx.init(params)}

    def probs(ctx, view):
        v = ctx.get(view)
        return jax.nn.softmax(resize_bilinear(v.out.logits.astype(jnp.float32), v.images.shape[1:3],
                                              align_corners=True), -1)

    def fn(ctx: StepContext, state) -> TermOut:
        src, tgt = probs(ctx, "source"), probs(ctx, "proda/weak")
        disc = lambda params, x: nnx.merge(graphdef, params)(x)  # noqa: E731
        g_loss = P.lsgan_loss(disc(state["params"], tgt), SOURCE_DOMAIN)
        src_d, tgt_d = jax.lax.stop_gradient(src), jax.lax.stop_gradient(tgt)

        def d_loss_fn(params):
            return P.lsgan_loss(disc(params, src_d), SOURCE_DOMAIN) + P.lsgan_loss(disc(params, tgt_d), TARGET_DOMAIN)
        d_loss, grads = jax.value_and_grad(d_loss_fn)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return TermOut(g_loss, {"params": optax.apply_updates(state["params"], updates), "opt": opt},
                       {"proda/d_loss": d_loss})

    return Term("proda_adv", fn, weight=float(p.adv_weight), needs=("source", "proda/weak"), init_state=init_state)


@register_term("proda_adv")
def adversarial_term(config):
    if stage_of(config) != "warmup" or config.proda.warmup != "adversarial":
        return None
    return _adversarial(config)


@register_term("proda_prototypes")
def prototypes_term(config):
    if stage_of(config) != "stage1":
        return None
    path, k = config.proda.prototypes, config.model.num_classes
    return Term("proda_prototypes", _update_prototypes, weight=0.0, needs=("proda/ema",),
                init_state=lambda: jnp.asarray(load_prototypes(path, k)))


@register_term("proda_cts")
def cts_term(config):
    if stage_of(config) != "stage1":
        return None
    return Term("proda_cts", _cts, needs=("proda/weak", "proda/ema", "proda/soft", "proda/rectified"))


@register_term("proda_reg")
def regulariser_term(config):
    if stage_of(config) != "stage1" or not config.proda.regular_weight:
        return None
    return Term("proda_reg", lambda ctx, s: TermOut(P.kl_regulariser(_student_logits(ctx, "proda/weak"))),
                weight=float(config.proda.regular_weight), needs=("proda/weak",))


@register_term("proda_consist")
def consistency_term(config):
    if stage_of(config) != "stage1" or not config.proda.consist_weight:
        return None
    return Term("proda_consist", _consist, weight=float(config.proda.consist_weight),
                needs=("proda/ema", "proda/strong_batch", "proda/strong"))


@register_term("proda_target_ce")
def target_ce_term(config):
    if stage_of(config) not in ("stage2", "stage3"):
        return None
    return Term("proda_target_ce", _target_ce, needs=("proda/strong_batch", "proda/strong", "proda/hard"))


@register_term("proda_kd")
def kd_term(config):
    if stage_of(config) not in ("stage2", "stage3") or not config.proda.kd_weight:
        return None
    return Term("proda_kd", _kd, weight=float(config.proda.kd_weight), needs=("proda/strong_batch", "proda/strong"))
