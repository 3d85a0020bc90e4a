"""MIC (docs/method.md §7): the block mask against NumPy, the masked term against a hand-built
forward + weighted CE (value and gradient), the teacher never seeing the masked image, MIC leaving
the other terms' random draws alone, and clear errors for bad mask settings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipa_jax import config as config_lib
from pipa_jax import labels as L
from pipa_jax import step as step_lib
from pipa_jax import terms as terms_lib
from pipa_jax import train, uda
from pipa_jax.data import pipeline
from pipa_jax.models import layers
from pipa_jax.uda import masking
from test_step_composition import assert_close, capture_grads, ce, key_for, median_confidence, merge
from test_train import tiny_config


def np_block_mask(uniforms, hw, ratio):
    """NumPy: cells kept where u > ratio, PyTorch-nearest upsampled (cell floor(i * rows / H))."""
    b, rows, cols = uniforms.shape
    h, w = hw
    keep = uniforms > ratio
    ri = np.floor(np.arange(h) * rows / h).astype(int)
    ci = np.floor(np.arange(w) * cols / w).astype(int)
    return keep[:, ri][:, :, ci].astype(np.float32)


@pytest.mark.parametrize("hw,block,grid", [((1024, 1024), 64, (16, 16)), ((512, 512), 32, (16, 16)),
                                           ((100, 60), 32, (3, 2)), ((96, 192), 6, (16, 32))])
def test_block_mask_matches_numpy(hw, block, grid):
    assert masking.block_grid(hw, block) == grid
    key = jax.random.key(3)
    mask = np.asarray(masking.block_mask(key, 4, hw, block, 0.7))
    uniforms = np.asarray(jax.random.uniform(key, (4,) + grid))
    assert mask.shape == (4,) + hw + (1,)
    np.testing.assert_array_equal(mask[..., 0], np_block_mask(uniforms, hw, 0.7))


def test_block_mask_ratio_and_independence():
    cells = np.asarray(masking.block_mask(jax.random.key(0), 64, (64, 64), 4, 0.7))[:, ::4, ::4, 0]  # 16x16 cells
    assert abs(1 - cells.mean() - 0.7) < 0.02                      # 70 % of the cells masked
    flat = cells.reshape(64, -1)
    corr = np.corrcoef(flat)[np.triu_indices(64, 1)]
    assert np.abs(corr).mean() < 0.1 and not (flat[0] == flat[1]).all()   # per image, independent
    x = jax.random.normal(jax.random.key(1), (64, 64, 64, 3))
    y = np.asarray(masking.mask_images(jax.random.key(0), x, 4, 0.7))
    m = np.asarray(masking.block_mask(jax.random.key(0), 64, (64, 64), 4, 0.7)) > 0
    np.testing.assert_array_equal(y, np.where(m, np.asarray(x), 0.0))    # 0 = the mean in normalised space
    assert (np.asarray(masking.block_mask(jax.random.key(0), 2, (32, 32), 4, 0.0)) == 1).all()


def mic_setup(xla_cache_dir, **mic):
    c = tiny_config(xla_cache_dir, "method=mic,tiny")
    c.mesh_shape = 1
    c.mic.update(mic)
    graphdef, _, state, imnet = train.build_model_and_state(c, train.make_mesh(c))
    return c, graphdef, state, imnet


def test_mic_term_equals_hand_built_masked_forward(xla_cache_dir):
    """With MIC as the only term: its loss and gradient equal jax.grad of the student on the
    augmented, block-masked target against the teacher's pseudo-labels of the unmasked target,
    with their weight (confident share q, margins 0)."""
    c, graphdef, state, _ = mic_setup(xla_cache_dir)
    c.uda.margin_top, c.uda.margin_bottom = 4, 8
    c.uda.jitter_p = c.uda.blur_p = -1.0     # jitter and blur on every step: their draws are checked too
    term = next(t for t in terms_lib.build_terms(c) if t.name == "mic")
    assert term.weight == c.mic.weight == 1.0 and term.needs == ("masked",)
    tx = capture_grads()
    state = state.replace(opt_state=tx.init(state.params))
    batch = next(pipeline.train_iterator(c, 0))
    c.uda.pseudo_threshold = median_confidence(graphdef, state, batch)    # q about 0.5
    step = jax.jit(step_lib.make_train_step(c, graphdef, tx, terms=(term,)))
    new, metrics = step(state, batch, None)

    u, m = c.uda, c.mic

    def reference(params, stats, batch):
        xt = L.normalize(batch["target_image"])
        probs = jax.nn.softmax(layers.resize_bilinear(
            merge(graphdef, params, stats)(xt, train=False, use_running_average=False), xt.shape[1:3]), -1)
        pl = jnp.argmax(probs, -1)
        q = jnp.mean(jnp.max(probs, -1) >= u.pseudo_threshold)
        rows = jnp.arange(xt.shape[1])[None, :, None]
        pw = jnp.broadcast_to(jnp.where((rows >= 4) & (rows < xt.shape[1] - 8), q, 0.0), pl.shape)
        x = uda.strong_augment(key_for(c.seed, 0, "mic/augment"), xt, jitter_p=u.jitter_p,
                               jitter_strength=u.jitter_strength, blur_p=u.blur_p, per_image_order=False,
                               per_image_sigma=False)
        keep = jax.random.uniform(key_for(c.seed, 0, "mic/mask"), (x.shape[0],) + masking.block_grid(x.shape[1:3], m.block_size))
        x = x * layers.resize_nearest((keep > m.mask_ratio).astype(jnp.float32), x.shape[1:3])[..., None]

        def loss(p):
            return ce(merge(graphdef, p, stats)(x, train=True, rng=key_for(c.seed, 0, "forward/masked")), pl, pw)
        return jax.value_and_grad(loss)(params)

    ref_loss, ref_grads = jax.jit(reference)(state.params, state.batch_stats, batch)
    assert 0 < float(metrics["pseudo_confident_share"]) < 1 and float(ref_loss) > 0
    np.testing.assert_allclose(metrics["loss/mic"], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/total"], ref_loss, rtol=1e-5)
    assert_close(new.opt_state["g"], ref_grads, rtol=5e-5, atol=1e-6)


def test_teacher_sees_the_unmasked_target_and_other_draws_stay(xla_cache_dir):
    """Switching MIC on (or changing its mask) leaves the pseudo-labels, the source view and the
    ClassMix batch exactly as they were; the masked view is what changes."""
    def values(mic_enabled, ratio):
        c, graphdef, state, _ = mic_setup(xla_cache_dir, enabled=mic_enabled, mask_ratio=ratio)
        batch = next(pipeline.train_iterator(c, 1))

        @jax.jit
        def run(state, batch):
            ctx = terms_lib.StepContext(
                c, step=state.step + 1, keys=terms_lib.NamedKeys(jax.random.key(c.seed), state.step + 1), batch=batch,
                graphdef=graphdef, model=merge(graphdef, state.params, state.batch_stats), params=state.params,
                batch_stats=state.batch_stats, teacher_params=state.teacher_params)
            out = {"source": ctx.get("source").out.logits, "pseudo": ctx.get("pseudo").labels,
                   "pseudo_weight": ctx.get("pseudo").weight, "mixed": ctx.get("mixed_batch").images}
            if mic_enabled:
                out["masked"] = ctx.get("masked").images
            return out
        return jax.device_get(run(state, batch))

    off, on, other = values(False, 0.7), values(True, 0.7), values(True, 0.0)
    for k in ("source", "pseudo", "pseudo_weight", "mixed"):
        np.testing.assert_array_equal(off[k], on[k], err_msg=k)
        np.testing.assert_array_equal(on[k], other[k], err_msg=k)
    assert (on["masked"] == 0).mean() > 0.3 and not (other["masked"] == 0).any()


def test_bad_mask_settings_are_clear_errors(xla_cache_dir):
    c = tiny_config(xla_cache_dir, "method=mic,tiny")
    for ratio in (1.0, -0.1):
        c.mic.mask_ratio = ratio
        with pytest.raises(ValueError, match=r"config.mic.mask_ratio = .*: expected a value in \[0, 1\)"):
            config_lib.validate(c, 8)
    c.mic.mask_ratio = 0.7
    c.mic.block_size = 5
    with pytest.raises(ValueError, match=r"config.mic.block_size = 5: expected a divisor of the training crop "
                                         r"\(64, 64\)"):
        config_lib.validate(c, 8)
    c.mic.block_size = 128
    with pytest.raises(ValueError, match="config.mic.block_size = 128"):
        config_lib.validate(c, 8)
    c.mic.block_size = 4
    config_lib.validate(c, 8)
    c.uda.self_training = False
    with pytest.raises(ValueError, match="mic.enabled = True: expected False when uda.self_training is False"):
        config_lib.validate(c, 8)
