"""Tests of pipa_jax.uda against independent references: NumPy re-implementations of the official
formulas, PyTorch autograd, and kornia (the library DACS/DAFormer call) for the photometric ops."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipa_jax import uda
from pipa_jax.labels import IMAGE_MEAN, IMAGE_STD, THING_CLASSES


def _kornia():
    # A hard import: kornia is a test extra, and a reference test must fail, not skip, without it.
    import kornia
    return kornia


def _torch():
    import torch
    return torch


# ----------------------------------------------------------------------------------------- EMA


def test_ema_alpha_ramp():
    steps = [0, 1, 9, 99, 998, 999, 1000, 123456]
    got = np.array([float(uda.ema_alpha(s)) for s in steps])
    want = np.array([min(1 - 1 / (s + 1), 0.999) for s in steps])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert got[0] == 0.0 and abs(got[2] - 0.9) < 1e-7 and got[-1] == np.float32(0.999)
    assert uda.ema_alpha(5).dtype == jnp.float32
    # Traced step, custom ceiling (DACS used 0.99).
    traced = jax.jit(lambda s: uda.ema_alpha(s, alpha=0.99))(jnp.int32(500))
    assert abs(float(traced) - 0.99) < 1e-7


def test_ema_update_matches_numpy():
    rng = np.random.default_rng(0)
    teacher = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": [rng.normal(size=(5,))]}
    student = jax.tree.map(lambda x: (x + rng.normal(size=x.shape)).astype(np.float32), teacher)
    update = jax.jit(uda.ema_update)
    # Step 0: a = 0, so the teacher becomes an exact copy of the student (official init).
    first = update(teacher, student, jnp.int32(0))
    for t, s in zip(jax.tree.leaves(first), jax.tree.leaves(student)):
        np.testing.assert_array_equal(np.asarray(t), s)
    for step in (1, 9, 5000):
        a = min(1 - 1 / (step + 1), 0.999)
        out = update(teacher, student, jnp.int32(step))
        assert jax.tree.structure(out) == jax.tree.structure(teacher)
        leaves = zip(*(jax.tree.leaves(tree) for tree in (out, teacher, student)))
        for o, t, s in leaves:
            assert o.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(o), a * t + (1 - a) * s, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ pseudo-labels


def _logit_for_prob(p, num_classes=19):
    """Logit L of one class (others 0) so that its softmax probability is p."""
    return math.log(p * (num_classes - 1) / (1 - p))


def test_pseudo_labels_share_weight_and_margins():
    rng = np.random.default_rng(1)
    batch, h, w, c = 2, 6, 5, 19
    logits = rng.normal(scale=0.1, size=(batch, h, w, c)).astype(np.float32)
    # Image 0: 4 confident pixels, image 1: 3 (2 + the borderline one): a per-image share would
    # give 4/30 and 3/30; DAFormer's batch share is 7/60 for both.
    confident = [
        (0, 0, 0, 3), (0, 2, 4, 11), (0, 5, 1, 0), (0, 3, 3, 9), (1, 1, 1, 18), (1, 3, 2, 7)
    ]
    for b, i, j, k in confident:
        logits[b, i, j] = 0.0
        logits[b, i, j, k] = 20.0
    # Just above / just below the 0.968 threshold.
    logits[1, 4, 4] = 0.0
    logits[1, 4, 4, 5] = _logit_for_prob(0.9700)
    logits[1, 0, 3] = 0.0
    logits[1, 0, 3, 6] = _logit_for_prob(0.9660)
    share = 7 / (batch * h * w)

    valid = uda.crop_margin_mask(batch, h, w, top=1, bottom=2)
    labels, weight, q = jax.jit(uda.pseudo_labels)(jnp.asarray(logits), valid_mask=valid)
    assert labels.dtype == jnp.int32 and weight.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(labels), logits.argmax(-1))
    assert abs(float(q) - share) < 1e-7
    want = np.full((batch, h, w), share, np.float32)
    want[:, :1] = 0.0
    want[:, h - 2 :] = 0.0
    np.testing.assert_allclose(np.asarray(weight), want, atol=1e-7)

    # No mask: q everywhere; the mask does not change q itself. bfloat16 logits (the compute
    # dtype on accelerators) keep both borderline pixels on their side of the threshold.
    labels_bf, weight_all, q_all = uda.pseudo_labels(jnp.asarray(logits, jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(weight_all), share, atol=1e-7)
    assert abs(float(q_all) - float(q)) < 1e-7 and weight_all.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(labels_bf)[1, 4, 4], 5)

    # A different threshold changes the share the way NumPy counts it.
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    _, _, q_low = uda.pseudo_labels(jnp.asarray(logits), threshold=0.5)
    assert abs(float(q_low) - (p.max(-1) >= 0.5).mean()) < 1e-7

    # Everything is stop-gradient.
    grad = jax.grad(lambda x: jnp.sum(uda.pseudo_labels(x)[1]) + uda.pseudo_labels(x)[2])(
        jnp.asarray(logits)
    )
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_crop_margin_mask_rows():
    mask = np.asarray(uda.crop_margin_mask(2, 200, 3))  # DAFormer: top 15, bottom 120
    assert mask.shape == (2, 200, 3) and mask.dtype == bool
    rows = mask.all(axis=(0, 2))
    np.testing.assert_array_equal(rows, (np.arange(200) >= 15) & (np.arange(200) < 80))
    assert not mask[:, :15].any() and not mask[:, 80:].any()
    assert np.asarray(uda.crop_margin_mask(1, 10, 4, top=0, bottom=0)).all()
    assert not np.asarray(uda.crop_margin_mask(1, 10, 4, top=6, bottom=5)).any()


# ---------------------------------------------------------------------------------- ClassMix


def _np_slots(labels, num_classes=19):
    return np.where((labels >= 0) & (labels < num_classes), labels, num_classes)


def _mixed_labels():
    labels = np.full((3, 8, 10), 255, np.int64)
    labels[0, :4] = 0
    labels[0, 4:, :5] = 13
    labels[0, 4:, 5:7] = 2
    labels[1, :, :3] = 8
    labels[1, :, 3:] = 10
    labels[1, 0, 0] = 18
    labels[2, :5] = 13
    labels[2, 5:, :2] = 5  # rows 5..7 of image 2 keep some 255
    return labels


@pytest.mark.parametrize("per_image_classes", [False, True])
@pytest.mark.parametrize("include_ignore", [True, False])
def test_class_mix_counts_and_masks(per_image_classes, include_ignore):
    labels = _mixed_labels()
    slots = _np_slots(labels)
    fn = jax.jit(
        lambda k, l: (
            uda.class_mix_choice(
                k, l, include_ignore=include_ignore, per_image_classes=per_image_classes
            ),
            uda.class_mix_masks(
                k, l, include_ignore=include_ignore, per_image_classes=per_image_classes
            ),
        )
    )
    seen = set()
    ignore_chosen = 0
    for seed in range(12):
        chosen, mask = (np.asarray(a) for a in fn(jax.random.key(seed), jnp.asarray(labels)))
        assert chosen.shape == (3, 20) and mask.shape == labels.shape and mask.dtype == bool
        for i in range(3):
            source = slots[i] if per_image_classes else slots
            present = set(np.unique(source).tolist())
            if not include_ignore:
                present.discard(19)
            picked = set(np.flatnonzero(chosen[i]).tolist())
            assert picked <= present
            assert len(picked) == math.ceil(len(present) / 2)
            np.testing.assert_array_equal(mask[i], np.isin(slots[i], sorted(picked)))
            ignore_chosen += 19 in picked
            seen.add((i, tuple(sorted(picked))))
        if not include_ignore:
            assert not mask[labels == 255].any()
    if include_ignore:
        assert ignore_chosen > 0  # 255 is a candidate (official quirk)
    else:
        assert ignore_chosen == 0
    # Different keys give different choices.
    assert len(seen) > 3 + 3


def test_class_mix_batch_union_is_default():
    # Image 0 holds only class 1, image 1 only class 2: with DAFormer's batch-wide candidates
    # image 0 can pick class 2 (mask all False); with DACS per-image candidates it cannot.
    labels = jnp.asarray(np.stack([np.full((4, 4), 1), np.full((4, 4), 2)]))
    both = jax.jit(
        lambda k: (
            uda.class_mix_masks(k, labels, include_ignore=False),
            uda.class_mix_masks(k, labels, include_ignore=False, per_image_classes=True),
        )
    )
    empty_masks = 0
    for seed in range(20):
        mask, own = (np.asarray(m) for m in both(jax.random.key(seed)))
        empty_masks += int(not mask[0].any())
        assert own.all()  # n = 1 -> ceil(1/2) = 1 -> the only class, everywhere
    assert 0 < empty_masks < 20


def test_class_mix_subset_is_uniform():
    labels = jnp.asarray(np.array([[[0, 4, 7], [11, 0, 4]]]))  # 4 classes -> choose 2
    keys = jax.random.split(jax.random.key(3), 2000)
    chosen = np.asarray(
        jax.vmap(lambda k: uda.class_mix_choice(k, labels, include_ignore=False)[0])(keys)
    )
    assert (chosen.sum(1) == 2).all()
    np.testing.assert_allclose(chosen[:, [0, 4, 7, 11]].mean(0), 0.5, atol=0.04)
    pairs = {}
    for row in chosen:
        pairs[tuple(np.flatnonzero(row))] = pairs.get(tuple(np.flatnonzero(row)), 0) + 1
    assert len(pairs) == 6
    np.testing.assert_allclose(np.array(list(pairs.values())) / len(keys), 1 / 6, atol=0.03)


def test_class_mix_compiles_once():
    traces = []

    def fn(key, labels):
        traces.append(1)
        return uda.class_mix_masks(key, labels)

    jitted = jax.jit(fn)
    rng = np.random.default_rng(0)
    for seed in range(3):
        labels = rng.choice([0, 3, 9, 17, 255], size=(2, 6, 7))
        labels[:, : seed + 1] = seed  # different class sets each call
        jitted(jax.random.key(seed), jnp.asarray(labels, jnp.int32)).block_until_ready()
    assert len(traces) == 1


def test_mix_broadcasts():
    rng = np.random.default_rng(0)
    mask = rng.random((2, 5, 6)) > 0.5
    a_img, b_img = rng.normal(size=(2, 2, 5, 6, 3)).astype(np.float32)
    a_lbl, b_lbl = rng.integers(0, 19, size=(2, 2, 5, 6))
    np.testing.assert_array_equal(
        np.asarray(uda.mix(mask, a_img, b_img)), np.where(mask[..., None], a_img, b_img)
    )
    np.testing.assert_array_equal(
        np.asarray(uda.mix(mask, a_lbl, b_lbl)), np.where(mask, a_lbl, b_lbl)
    )
    weight = np.asarray(uda.mix(mask, jnp.ones((2, 5, 6)), jnp.full((2, 5, 6), 0.3)))
    np.testing.assert_allclose(weight, np.where(mask, 1.0, 0.3), rtol=1e-7)


# ------------------------------------------------------------------------------ augmentation


def _test_images(batch=2, height=16, width=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (batch, height, width, 3)).astype(np.float32)
    x[0, 0, :5] = 0.5  # grey pixels: saturation 0, hue undefined
    x[1, 1, :4] = 0.0  # black
    x[0, 2, :3] = 1.0  # white
    x[1, 3, :2] = [0.2, 0.2, 0.9]  # two equal channels
    x[0, 4, :2] = [0.9, 0.1, 0.9]
    return x


def _to_torch(x):
    return _torch().from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _from_torch(x):
    return x.permute(0, 2, 3, 1).numpy()


_COLOR_OPS = jax.jit(
    lambda x, f: {
        "brightness": uda.adjust_brightness(x, f),
        "contrast": uda.adjust_contrast(x, f),
        "saturation": uda.adjust_saturation(x, f),
        "hue": uda.adjust_hue(x, f),
    }
)


@pytest.mark.parametrize(
    "op, factors, atol",
    [
        ("brightness", [0.15, -0.2], 1e-6),
        ("contrast", [0.8, 1.2], 1e-6),
        ("saturation", [0.8, 1.2], 1e-5),
        ("saturation", [0.0, 2.5], 1e-5),
        ("hue", [-0.2 * 2 * math.pi, 0.17 * 2 * math.pi], 1e-5),
        ("hue", [3.1, -3.1], 1e-5),
    ],
)
def test_color_ops_match_kornia(op, factors, atol):
    kornia, torch = _kornia(), _torch()
    x = _test_images()
    ref = getattr(kornia.enhance, f"adjust_{op}")
    got = np.asarray(_COLOR_OPS(jnp.asarray(x), jnp.asarray(factors, jnp.float32))[op])
    want = _from_torch(ref(_to_torch(x), torch.tensor(factors, dtype=torch.float32)))
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    assert np.abs(got - x).max() > 1e-2  # the op did something


def test_color_ops_scalar_factor():
    x = jnp.asarray(_test_images())
    np.testing.assert_allclose(
        np.asarray(uda.adjust_contrast(x, 1.1)),
        np.asarray(_COLOR_OPS(x, jnp.full((2,), 1.1, jnp.float32))["contrast"]),
        rtol=1e-7,
    )


def _kornia_jiggle(x01, brightness_delta, contrast, saturation, hue_radians, order):
    """kornia's ColorJiggle (= kornia 0.5 ColorJitter) replayed with given factors, image by
    image as DAFormer calls it."""
    kornia, torch = _kornia(), _torch()
    aug = kornia.augmentation.ColorJiggle(0.2, 0.2, 0.2, 0.2, p=1.0)
    out = []
    for i in range(x01.shape[0]):
        xi = _to_torch(x01[i : i + 1])
        aug(xi)  # draws a parameter set with every key, then overwritten below
        params = dict(aug._params)
        params["brightness_factor"] = torch.tensor([1.0 + float(brightness_delta[i])])
        params["contrast_factor"] = torch.tensor([float(contrast[i])])
        params["saturation_factor"] = torch.tensor([float(saturation[i])])
        params["hue_factor"] = torch.tensor([float(hue_radians[i]) / (2 * math.pi)])
        params["order"] = torch.tensor(np.asarray(order[i]), dtype=torch.int64)
        out.append(_from_torch(aug(xi, params=params)))
    return np.concatenate(out)


def test_color_jitter_matches_kornia_colorjiggle():
    x = _test_images(batch=3, seed=1)
    factors = dict(
        brightness_delta=np.array([0.18, -0.15, 0.05], np.float32),
        contrast=np.array([1.15, 0.85, 1.0], np.float32),
        saturation=np.array([0.82, 1.19, 1.1], np.float32),
        hue_radians=np.array([0.3, -1.1, 1.2], np.float32),
        order=np.array([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]], np.int32),
    )
    got = np.asarray(jax.jit(uda.color_jitter)(jnp.asarray(x), **factors))
    want = _kornia_jiggle(x, **factors)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # The order matters (clamping makes the ops non-commuting): a different order differs.
    swapped = dict(factors, order=factors["order"][:, ::-1].copy())
    other = np.asarray(uda.color_jitter(jnp.asarray(x), **swapped))
    assert np.abs(other - got).max() > 1e-3


def test_gaussian_blur_matches_kornia():
    kornia, torch = _kornia(), _torch()
    x = _test_images(batch=2, height=12, width=19)
    blur = jax.jit(uda.gaussian_blur, static_argnums=2)
    for sigma, ks in [([0.5, 1.1], (3, 7)), ([0.15, 0.9], (5, 5)), ([1.15, 0.3], (11, 1))]:
        got = np.asarray(blur(jnp.asarray(x), jnp.asarray(sigma), ks))
        want = _from_torch(
            kornia.filters.gaussian_blur2d(
                _to_torch(x), ks, torch.tensor([[s, s] for s in sigma]), border_type="reflect"
            )
        )
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="odd"):
        uda.gaussian_blur(jnp.asarray(x), 1.0, (4, 3))


def test_blur_kernel_size_rule():
    def dacs(n):
        return int(np.floor(np.ceil(0.1 * n) - 0.5 + np.ceil(0.1 * n) % 2))

    known = {512: 51, 1024: 103, 640: 63, 64: 7, 40: 3, 33: 3, 25: 3, 10: 1, 2048: 205}
    for n, k in known.items():
        assert uda.blur_kernel_size(n) == dacs(n) == k
    for n in range(1, 1500):
        k = uda.blur_kernel_size(n)
        assert k == dacs(n) and k % 2 == 1


def _normalise(x01):
    return (x01 * 255.0 - IMAGE_MEAN) / IMAGE_STD


def _kornia_strong(images, params, jitter_p, blur_p):
    """DAFormer's strong_transform (after mixing) with kornia, given our random draws."""
    kornia, torch = _kornia(), _torch()
    p = {k: np.asarray(v) for k, v in params.items()}
    x = images.copy()
    if p["u"] > jitter_p:
        x01 = (x * IMAGE_STD + IMAGE_MEAN) / 255.0
        x01 = _kornia_jiggle(
            x01, p["brightness_delta"], p["contrast"], p["saturation"], p["hue_radians"], p["order"]
        )
        x = _normalise(x01).astype(np.float32)
    if p["v"] > blur_p:
        ks = tuple(
            int(np.floor(np.ceil(0.1 * n) - 0.5 + np.ceil(0.1 * n) % 2)) for n in x.shape[1:3]
        )
        sig = torch.tensor([[s, s] for s in p["sigma"]], dtype=torch.float32)
        x = _from_torch(
            kornia.filters.gaussian_blur2d(_to_torch(x), ks, sig, border_type="reflect")
        )
    return x


@pytest.mark.parametrize("u, v", [(0.9, 0.9), (0.3, 0.4), (0.1, 0.8), (0.15, 0.2)])
def test_strong_augment_matches_kornia(u, v):
    images = _normalise(_test_images(batch=2, height=40, width=72, seed=2)).astype(np.float32)
    params = uda.sample_strong_augment_params(jax.random.key(7), 2)
    params = dict(params, u=jnp.float32(u), v=jnp.float32(v))
    got = np.asarray(jax.jit(uda.apply_strong_augment)(jnp.asarray(images), params))
    want = _kornia_strong(images, params, jitter_p=0.2, blur_p=0.5)
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)
    if u <= 0.2 and v <= 0.5:
        np.testing.assert_array_equal(got, images)  # both skipped: bit-exact
    else:
        assert np.abs(got - images).max() > 1e-2


def test_strong_augment_sampling_and_single_compile():
    traces = []

    def step(key, images):
        traces.append(1)
        params = uda.sample_strong_augment_params(key, images.shape[0])
        out = uda.strong_augment(key, images, jitter_p=0.0, blur_p=0.0)
        same = uda.apply_strong_augment(images, params, jitter_p=0.0, blur_p=0.0)
        return params, out, same

    jitted = jax.jit(step)
    batch = 256
    images = np.tile(_normalise(_test_images(batch=2, height=12, width=10)), (batch // 2, 1, 1, 1))
    images = jnp.asarray(images, jnp.float32)
    results = [jitted(jax.random.key(s), images) for s in range(3)]
    assert len(traces) == 1
    outs = [np.asarray(r[1]) for r in results]
    assert all(o.shape == images.shape and np.isfinite(o).all() for o in outs)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3
    np.testing.assert_array_equal(outs[0], np.asarray(results[0][2]))  # = apply(sample(key))

    p = {k: np.asarray(v) for k, v in results[0][0].items()}
    for name, lo, hi in [
        ("brightness_delta", -0.2, 0.2),
        ("contrast", 0.8, 1.2),
        ("saturation", 0.8, 1.2),
        ("hue_radians", -0.4 * math.pi, 0.4 * math.pi),
        ("sigma", 0.15, 1.15),
    ]:
        assert p[name].shape == (batch,)
        assert p[name].min() >= lo - 1e-6 and p[name].max() <= hi + 1e-6
        span = hi - lo
        assert p[name].min() < lo + 0.05 * span and p[name].max() > hi - 0.05 * span
    assert 0 <= p["u"] < 1 and 0 <= p["v"] < 1 and p["u"].shape == ()
    assert (np.sort(p["order"], axis=1) == np.arange(4)).all()
    assert len({tuple(o) for o in p["order"]}) == 24  # per-image orders, all permutations occur


# ------------------------------------------------------------------------- feature distance


def _np_downscale(labels, scale, min_ratio=0.75, num_classes=19):
    batch, height, width = labels.shape
    h, w = height // scale, width // scale
    slots = _np_slots(labels, num_classes)
    out = np.zeros((batch, h, w), np.int64)
    for b in range(batch):
        for i in range(h):
            for j in range(w):
                block = slots[b, i * scale : (i + 1) * scale, j * scale : (j + 1) * scale]
                counts = np.bincount(block.ravel(), minlength=num_classes + 1)
                best = int(np.argmax(counts))
                ok = counts[best] / block.size >= min_ratio
                out[b, i, j] = 255 if (best == num_classes or not ok) else best
    return out


def _fd_labels():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 19, size=(2, 16, 20))
    labels[0, :4, :4] = 13  # pure thing block
    labels[0, :4, 4:8] = 7
    labels[0, :1, 4:8] = 2  # 12/16 = 0.75 exactly -> kept
    labels[0, :4, 8:12] = 11
    labels[0, :1, 8:12] = 3
    labels[0, 1, 8] = 3  # 11/16 < 0.75 -> 255
    labels[0, 4:8, :4] = 255
    labels[0, 4:5, :3] = 13  # 13/16 of 255 -> 255 (the ignore slot wins)
    labels[1, :4, :4] = 255
    labels[1, :2, :3] = 13  # 10/16 of 255, 6/16 of 13
    labels[1, 4:8, 4:8] = 19  # out of range -> counts as ignore
    labels[1, 8:12, :4] = 6
    labels[1, 15, 19] = 255  # ragged edges (16 x 20 with scale 3) are dropped
    return labels


@pytest.mark.parametrize("scale, min_ratio", [(4, 0.75), (4, 0.3), (3, 0.75), (2, 0.75)])
def test_downscale_label_ratio_matches_numpy(scale, min_ratio):
    labels = _fd_labels()
    got = np.asarray(
        jax.jit(uda.downscale_label_ratio, static_argnums=1, static_argnames="min_ratio")(
            jnp.asarray(labels, jnp.int32), scale, min_ratio=min_ratio
        )
    )
    want = _np_downscale(labels, scale, min_ratio)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    if scale == 4:
        assert got[0, 0, 0] == 13 and got[0, 0, 1] == 7
        assert got[0, 0, 2] == (255 if min_ratio == 0.75 else 11)  # 11/16 of class 11
        assert got[0, 1, 0] == 255
        # min_ratio 0.3: the 255 slot (10/16) still beats class 13 (6/16, >= 0.3).
        assert got[1, 0, 0] == 255
        assert got[1, 1, 1] == 255 and got[1, 2, 0] == 6


def _np_fd(student, imnet, labels, weight=0.005, min_ratio=0.75):
    scale = labels.shape[2] // student.shape[2]
    down = _np_downscale(labels, scale, min_ratio)
    mask = np.isin(down, THING_CLASSES)
    dist = np.sqrt(((student.astype(np.float64) - imnet) ** 2).sum(-1))
    return weight * dist[mask].mean() if mask.any() else 0.0, int(mask.sum())


def test_feature_distance_loss_value_and_gradient():
    torch = _torch()
    rng = np.random.default_rng(5)
    labels = _fd_labels()  # 16 x 20 labels, 4 x 5 features: scale 4
    student = rng.normal(size=(2, 4, 5, 8)).astype(np.float32)
    imnet = rng.normal(size=(2, 4, 5, 8)).astype(np.float32)
    imnet[0, 0, 0] = student[0, 0, 0]  # zero distance at a thing position: no NaN gradient

    fn = jax.jit(uda.feature_distance_loss)
    loss, num = fn(jnp.asarray(student), jnp.asarray(imnet), jnp.asarray(labels))
    want_loss, want_num = _np_fd(student, imnet, labels)
    assert int(num) == want_num > 2
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)

    grad_s, grad_i = jax.grad(lambda s, i: fn(s, i, jnp.asarray(labels))[0], argnums=(0, 1))(
        jnp.asarray(student), jnp.asarray(imnet)
    )
    assert np.isfinite(np.asarray(grad_s)).all()
    np.testing.assert_array_equal(np.asarray(grad_i), 0.0)  # the ImageNet features are frozen

    # Reference: the DAFormer formula in PyTorch autograd (NCHW), at the same mask.
    mask = np.isin(_np_downscale(labels, 4), THING_CLASSES)
    s_t = torch.tensor(student.transpose(0, 3, 1, 2), requires_grad=True)
    diff = s_t - torch.tensor(imnet.transpose(0, 3, 1, 2))
    dist = torch.norm(diff, dim=1, p=2)
    ref = 0.005 * torch.mean(dist[torch.tensor(mask)])
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    ref_grad = np.nan_to_num(s_t.grad.numpy().transpose(0, 2, 3, 1))  # torch: 0 at the zero diff
    np.testing.assert_allclose(np.asarray(grad_s), ref_grad, rtol=1e-4, atol=1e-8)

    # Central finite differences of the float64 NumPy reference at a few coordinates.
    for idx in [(0, 0, 1, 3), (1, 2, 0, 5), (0, 3, 4, 0), (1, 0, 0, 7)]:
        eps = 1e-4
        plus, minus = student.astype(np.float64), student.astype(np.float64)
        plus[idx] += eps
        minus[idx] -= eps
        fd = (_np_fd(plus, imnet, labels)[0] - _np_fd(minus, imnet, labels)[0]) / (2 * eps)
        np.testing.assert_allclose(float(grad_s[idx]), fd, rtol=1e-3, atol=1e-9)


def test_feature_distance_empty_mask_is_zero():
    rng = np.random.default_rng(6)
    labels = np.full((2, 8, 8), 255)
    labels[:, :4] = 0  # stuff only: no thing positions
    student = jnp.asarray(rng.normal(size=(2, 2, 2, 4)), jnp.float32)
    imnet = jnp.asarray(rng.normal(size=(2, 2, 2, 4)), jnp.float32)
    value_and_grad = jax.jit(
        jax.value_and_grad(lambda s, i, l: uda.feature_distance_loss(s, i, l), has_aux=True)
    )
    (loss, num), grad = value_and_grad(student, imnet, labels)
    assert float(loss) == 0.0 and int(num) == 0
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    # Identical features at thing positions: loss 0 with 8 positions, gradient finite (zero).
    labels[:] = 13
    (loss, num), grad = value_and_grad(student, student, labels)
    assert float(loss) == 0.0 and int(num) == 8
    assert np.isfinite(np.asarray(grad)).all()


def test_feature_distance_shape_errors():
    feat = jnp.zeros((1, 2, 3, 4))
    with pytest.raises(ValueError, match="feature grid"):
        uda.feature_distance_loss(feat, feat, jnp.zeros((1, 16, 12), jnp.int32))
    with pytest.raises(ValueError, match="equal shapes"):
        uda.feature_distance_loss(feat, jnp.zeros((1, 2, 3, 5)), jnp.zeros((1, 8, 12), jnp.int32))
