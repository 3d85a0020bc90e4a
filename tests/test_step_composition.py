"""What the train step composes, pinned against hand-written steps that do not use pipa_jax's
term machinery (pipa_jax.terms, pipa_jax.step):

- a source-only step's gradient equals jax.grad of a hand-built forward + cross-entropy;
- a DACS-style step (self-training, ClassMix, strong augmentation; FD, pixel and patch off)
  equals a hand-written mean-teacher step over two steps: gradients, parameters, teacher and
  BatchNorm statistics;
- named randomness: switching the pixel term on leaves the source forward, ClassMix and the
  augmentation draws unchanged.

The hand-written steps reuse only the building blocks that have their own reference tests
(the network, ClassMix masks, the strong augmentation) and the documented key derivation
`fold_in(fold_in(key(seed), step), stable_hash(name))`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pipa_jax import labels as L
from pipa_jax import step as step_lib
from pipa_jax import terms as terms_lib
from pipa_jax import train, uda
from pipa_jax.data import pipeline
from pipa_jax.models import layers
from test_train import tiny_config


def capture_grads():
    """An optax transformation that passes the gradient through and keeps it in its state."""
    return optax.GradientTransformation(lambda p: {"g": jax.tree.map(jnp.zeros_like, p)},
                                        lambda g, s, p=None: (g, {"g": g}))


def key_for(seed, step, name):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), terms_lib.stable_hash(name))


def ce(logits, labels, weight=None):
    """Hand-written mmseg mean CE: logits upsampled to the labels, sum over valid / all pixels."""
    logits = layers.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
    logp = jax.nn.log_softmax(logits, axis=-1)
    valid = labels != 255
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    w = valid.astype(jnp.float32) if weight is None else jnp.where(valid, weight, 0.0)
    return jnp.sum(nll * w) / labels.size


def median_confidence(graphdef, state, batch):
    """The median max-softmax of the initial teacher on a target batch: as pseudo_threshold it
    makes the confident share q about 0.5, so that q's part in the weights is tested."""
    model = merge(graphdef, state.teacher_params, state.batch_stats)
    probs = jax.nn.softmax(model.infer_logits(L.normalize(batch["target_image"]), use_running_average=False), -1)
    return float(np.median(np.asarray(probs.max(-1))))


def merge(graphdef, params, stats):
    # nnx.merge at this trace level (BatchNorm mutates its statistics in place).
    return nnx.merge(graphdef, *jax.tree.map(lambda v: v, (params, stats)))


def setup(c, tx):
    c.mesh_shape = 1
    mesh = train.make_mesh(c)
    graphdef, _, state, imnet = train.build_model_and_state(c, mesh)
    state = state.replace(opt_state=tx.init(state.params))
    step = jax.jit(step_lib.make_train_step(c, graphdef, tx, imnet[0] if imnet else None))
    return graphdef, state, step


def assert_close(a, b, rtol=2e-5, atol=2e-7):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def test_source_only_gradient_is_grad_of_forward_plus_ce(xla_cache_dir):
    c = tiny_config(xla_cache_dir, "method=source_only,tiny")
    graphdef, state, step = setup(c, capture_grads())
    batch = next(pipeline.train_iterator(c, 0))
    xs = L.normalize(batch["source_image"])
    ys = jnp.asarray(batch["source_label"], jnp.int32)
    params0, stats0 = state.params, state.batch_stats

    def loss(p):
        model = merge(graphdef, p, stats0)
        logits = model(xs, train=True, rng=key_for(c.seed, 0, "forward/source"))
        return ce(logits, ys), nnx.state(model, nnx.BatchStat)

    (ref_loss, ref_stats), ref_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params0)
    new, metrics = step(state, batch, None)
    assert set(k for k in metrics if k.startswith("loss/")) == {"loss/source_ce", "loss/total"}
    np.testing.assert_allclose(metrics["loss/total"], ref_loss, rtol=1e-6)
    assert_close(new.opt_state["g"], ref_grads)
    assert_close(new.batch_stats, ref_stats, rtol=1e-6, atol=1e-7)
    assert int(new.step) == 1


def test_dacs_step_equals_hand_written_mean_teacher(xla_cache_dir):
    c = tiny_config(xla_cache_dir, "method=dacs,tiny")
    assert not (c.uda.fd or c.pipa.pixel.enabled or c.pipa.patch.enabled)
    c.uda.margin_top, c.uda.margin_bottom = 8, 16       # the crop margins are part of the step
    lr = 0.05
    tx = optax.chain(capture_grads(), optax.sgd(lr))
    graphdef, state, step = setup(c, tx)
    c.uda.pseudo_threshold = median_confidence(graphdef, state, next(pipeline.train_iterator(c, 0)))
    u = c.uda

    def reference(params, stats, teacher, t, batch):
        a = jnp.minimum(1.0 - 1.0 / (t + 1.0), u.ema_alpha)
        teacher = jax.tree.map(lambda tp, sp: a * tp + (1 - a) * sp, teacher, params)
        xs, xt = L.normalize(batch["source_image"]), L.normalize(batch["target_image"])
        ys = jnp.asarray(batch["source_label"], jnp.int32)
        t_logits = merge(graphdef, teacher, stats)(xt, train=False, use_running_average=False)
        probs = jax.nn.softmax(layers.resize_bilinear(t_logits, ys.shape[1:3]), axis=-1)
        pl = jnp.argmax(probs, -1)
        q = jnp.mean(jnp.max(probs, -1) >= u.pseudo_threshold)
        rows = jnp.arange(ys.shape[1])[None, :, None]
        pw = jnp.where((rows >= u.margin_top) & (rows < ys.shape[1] - u.margin_bottom), q, 0.0)
        pw = jnp.broadcast_to(pw, ys.shape)
        ti = t.astype(jnp.int32)
        mask = uda.class_mix_masks(key_for(c.seed, ti, "class_mix"), ys, include_ignore=u.mix_ignore_class)
        xm = jnp.where(mask[..., None], xs, xt)
        ym = jnp.where(mask, ys, pl)
        wm = jnp.where(mask, 1.0, pw)
        xm = uda.strong_augment(key_for(c.seed, ti, "strong_augment"), xm, jitter_p=u.jitter_p,
                                jitter_strength=u.jitter_strength, blur_p=u.blur_p)

        def loss(p):
            model = merge(graphdef, p, stats)
            src = ce(model(xs, train=True, rng=key_for(c.seed, ti, "forward/source")), ys)
            mix = ce(model(xm, train=True, rng=key_for(c.seed, ti, "forward/mixed")), ym, wm)
            return src + mix, nnx.state(model, nnx.BatchStat)

        (total, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
        params = jax.tree.map(lambda p, d: p - lr * d, params, g)
        return params, stats, teacher, g, total

    reference = jax.jit(reference)
    params, stats, teacher = state.params, state.batch_stats, state.teacher_params
    for t in range(2):
        batch = next(pipeline.train_iterator(c, t))
        params, stats, teacher, ref_grads, ref_total = reference(params, stats, teacher, jnp.float32(t), batch)
        state, metrics = step(state, batch, None)
        np.testing.assert_allclose(metrics["loss/total"], ref_total, rtol=2e-6)
        assert 0 < float(metrics["pseudo_confident_share"]) < 1
        assert_close(state.opt_state[0]["g"], ref_grads, rtol=5e-5, atol=1e-6)
        assert_close(state.params, params, rtol=1e-5, atol=1e-7)
        assert_close(state.teacher_params, teacher, rtol=1e-5, atol=1e-7)
        assert_close(state.batch_stats, stats, rtol=1e-5, atol=1e-6)
    assert float(metrics["ema_alpha"]) == 0.5


def test_named_randomness_does_not_redraw_when_a_term_is_added(xla_cache_dir):
    """The keys of the source forward, ClassMix and the augmentation are the same whichever terms
    are on: the shared values computed with the pixel term on equal those computed without it."""
    def shared(arg):
        c = tiny_config(xla_cache_dir, arg)
        c.mesh_shape = 1
        graphdef, _, state, imnet = train.build_model_and_state(c, train.make_mesh(c))
        batch = next(pipeline.train_iterator(c, 3))

        @jax.jit
        def values(state, batch):
            ctx = terms_lib.StepContext(
                c, step=state.step + 3, keys=terms_lib.NamedKeys(jax.random.key(c.seed), state.step + 3),
                batch=batch, graphdef=graphdef, model=terms_lib.merge(graphdef, state.params, state.batch_stats),
                params=state.params, batch_stats=state.batch_stats, teacher_params=state.teacher_params)
            m = ctx.get("mixed_batch")
            return ctx.get("source").out.logits, m.images, m.labels, m.weight

        return jax.device_get(values(state, batch))

    base, more = shared("method=dacs,tiny"), shared("method=pixel_only,tiny")
    for a, b in zip(base, more):
        np.testing.assert_array_equal(a, b)
