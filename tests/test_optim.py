"""Optimizer: parameter groups and the warmup x poly schedule against hand-computed values."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pipa_jax import config as config_lib
from pipa_jax.models import build_segmentor
from pipa_jax.optim import learning_rate_schedule, make_optimizer, param_labels


def small_config():
    c = config_lib.base_config()
    c.model.backbone = "mit_b0"
    c.model.embed_dim = 16
    c.model.pixel_proj_dim = 8
    c.model.patch_proj_dim = 8
    c.total_steps = 10000
    return c


def test_schedule_matches_mmcv_warmup_times_poly():
    c = small_config()
    lr = learning_rate_schedule(c, 6e-5)
    T, W, r = 10000, 1500, 1e-6
    for t in (0, 1, 750, 1499, 1500, 5000, 9999, 10000):
        warm = 1 - (1 - t / W) * (1 - r) if t < W else 1.0
        expected = 6e-5 * (1 - t / T) * warm
        np.testing.assert_allclose(float(lr(t)), expected, rtol=1e-5, atol=1e-14)


def test_parameter_groups():
    c = small_config()
    model = build_segmentor(c.model)
    params = nnx.state(model, nnx.Param)
    labels = param_labels(params)
    flat = jax.tree_util.tree_flatten_with_path(labels)[0]
    by_label = collections.defaultdict(list)
    for path, lab in flat:
        by_label[lab].append(jax.tree_util.keystr(path))
    assert all(p.startswith(("['decode_head']", "['pixel_head']", "['patch_head']")) for p in by_label["head"])
    assert all(p.startswith("['backbone']") for p in by_label["encoder"] + by_label["encoder_no_decay"])
    # b0: 4 patch-embed norms, 8 blocks x 2 norms, 6 attention norms (sr > 1), 4 stage norms; x (scale, bias)
    assert len(by_label["encoder_no_decay"]) == (4 + 16 + 6 + 4) * 2
    assert not any("norm" in p for p in by_label["encoder"])
    # The decoder's BatchNorm keeps weight decay (official: only names containing 'norm' lose it).
    assert any("['bn']" in p for p in by_label["head"])


def test_head_learns_ten_times_faster_and_norms_skip_decay():
    c = small_config()
    c.optimizer.warmup_steps = 0
    model = build_segmentor(c.model)
    params = nnx.state(model, nnx.Param)
    tx = make_optimizer(c, params)
    opt = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, opt, params)
    # With zero gradients AdamW's update is -lr * wd * param: decay only, scaled by the group lr.
    lr = 6e-5
    enc_w = params["backbone"]["block1"][0]["attn"]["q"]["kernel"][...]
    upd = updates["backbone"]["block1"][0]["attn"]["q"]["kernel"][...]
    np.testing.assert_allclose(upd, -lr * 0.01 * enc_w, rtol=1e-5, atol=1e-12)
    head_w = params["decode_head"]["conv_seg"]["kernel"][...]
    upd = updates["decode_head"]["conv_seg"]["kernel"][...]
    np.testing.assert_allclose(upd, -10 * lr * 0.01 * head_w, rtol=1e-5, atol=1e-12)
    upd = updates["backbone"]["norm1"]["scale"][...]
    np.testing.assert_array_equal(upd, np.zeros_like(upd))
    assert isinstance(tx, optax.GradientTransformation)
