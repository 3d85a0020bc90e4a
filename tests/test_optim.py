"""Optimizers: parameter groups and the warmup x poly schedule against hand-computed values; the
SGD of DACS against torch.optim.SGD, its duplicated parameter list included."""
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
    labels = param_labels(params, c.model)
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


def dacs_config(duplicates: bool):
    c = config_lib.base_config()
    c.model.backbone, c.model.decode_head = "resnet50", "deeplabv2"
    c.model.pixel_head = c.model.patch_head = False
    c.total_steps = 100
    o = c.optimizer
    o.name, o.learning_rate, o.momentum, o.weight_decay = "sgd", 2.5e-4, 0.9, 5e-4
    o.head_lr_mult, o.warmup_steps, o.poly_power = 10.0, 0, 0.9
    o.sgd_duplicate_updates = duplicates
    return c


def _torch_dacs_param_groups(ref, torch):
    """DACS's optim_parameters, written as the official code builds it: every parameter of every
    module below conv1, bn1, layer1..4 (recursing, so repeated per enclosing module) that
    requires grad at 1x, then the classifier at 10x."""
    def one_x():
        for b in (ref.conv1, ref.bn1, ref.layer1, ref.layer2, ref.layer3, ref.layer4):
            for j in b.modules():
                for k in j.parameters():
                    if k.requires_grad:
                        yield k
    return [{"params": list(one_x()), "lr": 2.5e-4}, {"params": list(ref.layer5.parameters()), "lr": 2.5e-3}]


def _sgd_against_torch(duplicates: bool):
    import warnings
    import torch
    from test_resnet import RefDeepLabV2, randomised
    from pipa_jax import convert
    ref = randomised(RefDeepLabV2((3, 4, 6, 3)), seed=5)
    for name, p in ref.named_parameters():        # DACS: every backbone BN affine frozen
        if ".bn" in name or name.startswith("bn") or "downsample.1" in name:
            p.requires_grad_(False)
    c = dacs_config(duplicates)
    model = build_segmentor(c.model)
    convert.load_torch_weights(model, ref.state_dict())
    params = nnx.state(model, nnx.Param)
    tx = make_optimizer(c, params)
    opt = tx.init(params)
    groups = _torch_dacs_param_groups(ref, torch) if duplicates else [
        {"params": [p for n, p in ref.named_parameters() if p.requires_grad and not n.startswith("layer5")], "lr": 2.5e-4},
        {"params": list(ref.layer5.parameters()), "lr": 2.5e-3}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # PyTorch warns about the duplicates, as in DACS
        topt = torch.optim.SGD(groups, lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(0)
    update = jax.jit(tx.update)
    for step in range(3):
        grads = {}
        for n, p in ref.named_parameters():
            g = rng.normal(size=p.shape).astype(np.float32)
            p.grad = torch.from_numpy(g) if p.requires_grad else None
            grads[n] = g
        for g in topt.param_groups:              # DACS's poly schedule, set before each step
            g["lr"] = (2.5e-4 if g is topt.param_groups[0] else 2.5e-3) * (1 - step / 100) ** 0.9
        topt.step()
        flat = {}
        for path, var in nnx.to_flat_state(params):
            key = convert.official_key(model, path)
            g = grads[key]
            flat[path] = var.replace(jnp.asarray(convert.torch_to_flax(key, g, var[...].ndim)))
        updates, opt = update(nnx.from_flat_state(flat), opt, params)
        params = optax.apply_updates(params, updates)
    nnx.update(model, params)
    got = convert.export_torch_state_dict(model)
    return ref, got


def test_sgd_matches_torch_with_frozen_bn_and_ten_x_head():
    ref, got = _sgd_against_torch(duplicates=False)
    for k, v in ref.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_allclose(got[k], v.numpy(), rtol=1e-5, atol=1e-7, err_msg=k)


def test_sgd_duplicate_updates_match_the_official_parameter_list():
    ref, got = _sgd_against_torch(duplicates=True)
    for k, v in ref.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_allclose(got[k], v.numpy(), rtol=1e-5, atol=1e-7, err_msg=k)
    # The listing counts the official code produces: stem 1x, block convs 3x, shortcuts 4x, head 1x.
    from pipa_jax.optim import duplicate_counts
    c = dacs_config(True)
    from pipa_jax.optim import _path_names
    counts = {".".join(_path_names(p)): n for p, n in jax.tree_util.tree_flatten_with_path(
        duplicate_counts(nnx.state(build_segmentor(c.model), nnx.Param), c.model))[0]}
    assert counts["backbone.conv1.kernel"] == 1
    assert counts["backbone.layer3.5.conv2.kernel"] == 3 and counts["backbone.layer2.0.downsample.0.kernel"] == 4
    assert {n for k, n in counts.items() if k.startswith("decode_head")} == {1}


def test_resnet_groups_frozen_bn_no_norm_name_rule():
    c = dacs_config(False)
    model = build_segmentor(c.model)
    labels = jax.tree_util.tree_flatten_with_path(param_labels(nnx.state(model, nnx.Param), c.model))[0]
    by = collections.defaultdict(list)
    for path, lab in labels:
        by[lab].append(jax.tree_util.keystr(path))
    # 53 BNs in a ResNet-50 (stem, 16 x 3 in blocks, 4 shortcuts) x (scale, bias), all frozen.
    assert len(by["encoder_frozen"]) == 53 * 2 and all("bn" in p or "downsample" in p for p in by["encoder_frozen"])
    assert len(by["encoder"]) == 53 and not by["encoder_no_decay"]
    assert sorted(by["head"]) == sorted(p for p, _ in [(jax.tree_util.keystr(q), 0) for q, _ in labels]
                                        if p.startswith("['decode_head']"))
