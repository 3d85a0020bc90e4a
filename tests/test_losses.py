"""Losses against independent, naive float64 NumPy references (docs/method.md §2.4, §4, §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipa_jax import losses
from pipa_jax.labels import IGNORE_INDEX

# The tests call the functions jitted, as the train step does (eager op-by-op dispatch of the
# chunked loops is also slow on 2 CPU cores).
cross_entropy = jax.jit(losses.cross_entropy, static_argnames=("ignore_index",))
pixel_contrast_loss = jax.jit(
    losses.pixel_contrast_loss, static_argnames=("temperature", "base_temperature", "chunk_size")
)
directional_contrast_loss = jax.jit(
    losses.directional_contrast_loss,
    static_argnames=("temperature", "confidence_threshold", "chunk_size"),
)
_SAMPLER_ARGS = ("num_classes", "max_samples", "max_views", "min_pixels", "include_ignore_class")
sample_pixel_anchors = jax.jit(losses.sample_pixel_anchors, static_argnames=_SAMPLER_ARGS)
pixel_contrast_from_maps = jax.jit(
    losses.pixel_contrast_from_maps,
    static_argnames=_SAMPLER_ARGS + ("temperature", "base_temperature", "chunk_size"),
)

TAU, BASE_TAU = 0.1, 0.07


def _unit(rng, *shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _finite_difference(f, x, eps=1e-6):
    """Central differences of a float64 NumPy function f at x."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += eps
        minus[i] -= eps
        grad[i] = (f(plus) - f(minus)) / (2 * eps)
    return grad


# ----------------------------------------------------------------------------- references


def ref_cross_entropy(logits, labels, weight=None, ignore_index=IGNORE_INDEX):
    logits = np.asarray(logits, np.float64)
    total = 0.0
    for idx in np.ndindex(labels.shape):
        label = labels[idx]
        if label == ignore_index:
            continue
        row = logits[idx]
        nll = np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[label]
        total += nll * (1.0 if weight is None else weight[idx])
    return total / labels.size


def ref_pixel_contrast(z, y, valid, tau=TAU, base_tau=BASE_TAU):
    """ContrastiveSeg's dense formula (row max subtracted), restricted to valid rows."""
    keep = np.nonzero(valid)[0]
    z, y = np.asarray(z, np.float64)[keep], np.asarray(y)[keep]
    logits = z @ z.T / tau
    logits = logits - logits.max(axis=1, keepdims=True)
    same = y[:, None] == y[None, :]
    exp_logits = np.exp(logits)
    neg_sum = np.sum(exp_logits * ~same, axis=1, keepdims=True)
    log_prob = logits - np.log(exp_logits + neg_sum)
    losses = []
    for i in range(len(keep)):
        positives = [j for j in range(len(keep)) if j != i and y[j] == y[i]]
        if positives:
            losses.append(-(tau / base_tau) * np.mean([log_prob[i, j] for j in positives]))
    return float(np.mean(losses)) if losses else 0.0


def ref_directional(a1, a2, y, c1, c2, av, f, yf, fv, tau=TAU, thr=0.9, p1=None, p2=None):
    """CAC's directional loss, one term at a time. p1/p2 are the (detached) positives of
    crop 1 / crop 2 anchors; they default to a2 / a1."""
    p1 = a2 if p1 is None else p1
    p2 = a1 if p2 is None else p2
    terms = []
    for k in range(len(y)):
        if not av[k]:
            continue
        for anchor, positive, own, other in (
            (a1[k], p1[k], c1[k], c2[k]),
            (a2[k], p2[k], c2[k], c1[k]),
        ):
            if other > thr and own < other:
                pos = np.exp(anchor @ positive / tau)
                neg = sum(
                    np.exp(anchor @ f[m] / tau) for m in range(len(yf)) if fv[m] and yf[m] != y[k]
                )
                terms.append(-np.log(pos / (pos + neg)))
    return (float(np.mean(terms)) if terms else 0.0), len(terms)


def ref_sampler_plan(labels, hard, num_classes, max_samples, max_views, min_pixels, with_ignore):
    """Expected pairs (image, class) in order, n_view and per-pair (hard_keep, easy_keep)."""
    pairs = []
    for b in range(labels.shape[0]):
        classes = list(range(num_classes)) + ([IGNORE_INDEX] if with_ignore else [])
        for c in classes:
            if np.sum(labels[b] == c) > min_pixels:
                pairs.append((b, c))
    n_view = min(max_samples // len(pairs), max_views) if pairs else 0
    keeps = []
    for b, c in pairs:
        num_hard = int(np.sum((labels[b] == c) & hard[b]))
        num_easy = int(np.sum((labels[b] == c) & ~hard[b]))
        if num_hard >= n_view / 2 and num_easy >= n_view / 2:
            hard_keep = n_view // 2
            easy_keep = n_view - hard_keep
        elif num_hard >= n_view / 2:
            easy_keep = num_easy
            hard_keep = n_view - easy_keep
        else:
            hard_keep = num_hard
            easy_keep = n_view - hard_keep
        # Only reachable when a pair has fewer than n_view pixels: the slots stay empty.
        hard_keep = min(hard_keep, num_hard)
        easy_keep = min(easy_keep, num_easy)
        keeps.append((hard_keep, easy_keep))
    return pairs, n_view, keeps


# ----------------------------------------------------------------------------- cross-entropy


def test_cross_entropy_matches_reference_with_weights_and_ignore():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 4, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, (2, 3, 4))
    labels[0, 0, :] = IGNORE_INDEX
    labels[1, 2, 1] = IGNORE_INDEX
    weight = rng.uniform(0.1, 1.0, (2, 3, 4)).astype(np.float32)
    weight[0, 0, 0] = np.nan  # an ignored pixel's weight must not leak into the mean

    for w in (None, weight):
        got = cross_entropy(
            jnp.asarray(logits), jnp.asarray(labels), None if w is None else jnp.asarray(w)
        )
        want = ref_cross_entropy(logits, labels, w)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)

    grad = jax.grad(cross_entropy)(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weight))
    fd = _finite_difference(
        lambda x: ref_cross_entropy(x, labels, weight), logits.astype(np.float64)
    )
    np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-3, atol=1e-5)


def test_cross_entropy_denominator_counts_ignored_pixels():
    logits = jnp.zeros((1, 1, 4, 3))  # CE = log 3 per valid pixel
    labels = jnp.array([[[0, 1, IGNORE_INDEX, IGNORE_INDEX]]])
    np.testing.assert_allclose(float(cross_entropy(logits, labels)), 2 * np.log(3) / 4, rtol=1e-6)


def test_cross_entropy_all_ignored_is_zero_with_finite_grads():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((2, 2, 2, 4)), jnp.float32)
    labels = jnp.full((2, 2, 2), IGNORE_INDEX)
    value, grad = jax.value_and_grad(cross_entropy)(logits, labels)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_cross_entropy_bfloat16_logits_computed_in_float32():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((1, 4, 4, 19)).astype(np.float32) * 5
    labels = rng.integers(0, 19, (1, 4, 4))
    got = cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert got.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(float(got), ref_cross_entropy(rounded, labels), rtol=1e-5)


# ----------------------------------------------------------------------------- pixel contrast


def _pixel_case(seed=0, n=12, d=5):
    rng = np.random.default_rng(seed)
    z = _unit(rng, n, d)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 3, 0, 2, 1])[:n]  # class 3 has one sample: no positive
    valid = np.ones(n, bool)
    valid[[4, 10]] = False
    return z, y, valid


def test_pixel_contrast_matches_reference_values_and_grads():
    z, y, valid = _pixel_case()
    want = ref_pixel_contrast(z, y, valid)
    for chunk in (5, 12, 256):  # 5 does not divide 12
        got = pixel_contrast_loss(
            jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(valid), chunk_size=chunk
        )
        np.testing.assert_allclose(float(got), want, rtol=1e-5)

    fd = _finite_difference(lambda x: ref_pixel_contrast(x, y, valid), z)
    loss = lambda x, chunk: pixel_contrast_loss(
        x, jnp.asarray(y), jnp.asarray(valid), chunk_size=chunk
    )
    grad32 = jax.grad(loss)(jnp.asarray(z, jnp.float32), 5)
    np.testing.assert_allclose(np.asarray(grad32), fd, rtol=1e-3, atol=1e-4)
    with jax.enable_x64(True):
        grad64 = jax.grad(loss)(jnp.asarray(z, jnp.float64), 5)
        assert grad64.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(grad64), fd, rtol=1e-6, atol=1e-8)
    # Invalid rows take no part at all.
    assert np.all(np.asarray(grad32)[~valid] == 0.0)
    assert np.any(np.abs(np.asarray(grad32)[valid]) > 1e-3)


def test_pixel_contrast_single_class_has_no_negatives_and_stays_finite():
    z, _, valid = _pixel_case(seed=3)
    y = np.zeros(len(z), int)
    value, grad = jax.value_and_grad(pixel_contrast_loss)(
        jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(valid)
    )
    # log_prob_ij = s_ij - log(exp(s_ij)) = 0 without negatives.
    assert ref_pixel_contrast(z, y, valid) == pytest.approx(0.0, abs=1e-12)
    assert abs(float(value)) < 1e-6
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-5)


def test_pixel_contrast_all_invalid_is_zero_with_finite_grads():
    z, y, _ = _pixel_case()
    valid = jnp.zeros(len(z), bool)
    value, grad = jax.value_and_grad(pixel_contrast_loss)(
        jnp.asarray(z, jnp.float32), jnp.asarray(y), valid
    )
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_pixel_contrast_large_logit_range_is_stable():
    # tau = 0.005 spreads logits over [-200, 200]: a naive exp(s - rowmax) + neg_sum underflows
    # to log(0) here; the logaddexp form must stay finite and match float64.
    z, y, valid = _pixel_case(seed=5)
    want = ref_pixel_contrast(z, y, valid, tau=0.005)
    got = pixel_contrast_loss(
        jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(valid), temperature=0.005
    )
    assert np.isfinite(want) and np.isfinite(float(got))
    np.testing.assert_allclose(float(got), want, rtol=1e-4)


def test_pixel_contrast_bfloat16_features():
    z, y, valid = _pixel_case(seed=7)
    zb = jnp.asarray(z, jnp.bfloat16)
    got = pixel_contrast_loss(zb, jnp.asarray(y), jnp.asarray(valid))
    assert got.dtype == jnp.float32
    want = ref_pixel_contrast(np.asarray(zb.astype(jnp.float32)), y, valid)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_pixel_contrast_memory_is_linear():
    d, chunk = 16, 128

    def temp_bytes(n):
        f = jax.jit(jax.grad(lambda z, y, v: pixel_contrast_loss(z, y, v, chunk_size=chunk)))
        args = (
            jax.ShapeDtypeStruct((n, d), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32),
            jax.ShapeDtypeStruct((n,), jnp.bool_),
        )
        return f.lower(*args).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(4096)
    assert large < 8 * small  # quadratic memory would be 16x
    assert large < 4096 * 4096 * 4 / 4  # far below one dense [N, N] float32 matrix


# ----------------------------------------------------------------------------- sampler


def _sampler_labels():
    """Two 12x12 images with pairs exercising every branch of the hard/easy rule."""
    labels = np.full((2, 12, 12), IGNORE_INDEX, np.int32).reshape(2, -1)
    hard = np.zeros((2, 144), bool)
    rng = np.random.default_rng(0)
    perm0, perm1 = rng.permutation(144), rng.permutation(144)
    # image 0: class 0 balanced (40 px, 20 hard); class 1 short of hard (30 px, 2 hard);
    # class 2 short of easy (11 px = min_pixels + 1, all hard); class 3 exactly min_pixels.
    for c, (start, size, num_hard) in enumerate(
        [(0, 40, 20), (40, 30, 2), (70, 11, 11), (81, 10, 5)]
    ):
        idx = perm0[start : start + size]
        labels[0, idx] = c
        hard[0, idx[:num_hard]] = True
    # image 1: class 0 (50 px, 25 hard), class 4 (60 px, 1 hard), class 7 (out of range: ignored).
    for c, (start, size, num_hard) in zip((0, 4, 7), [(0, 50, 25), (50, 60, 1), (110, 20, 10)]):
        idx = perm1[start : start + size]
        labels[1, idx] = c
        hard[1, idx[:num_hard]] = True
    return labels.reshape(2, 12, 12), hard.reshape(2, 12, 12)


def _check_sampler(labels, hard, seed, **cfg):
    idx, lab, valid = jax.jit(lambda k, l, h: sample_pixel_anchors(k, l, h, **cfg))(
        jax.random.key(seed), jnp.asarray(labels), jnp.asarray(hard)
    )
    idx, lab, valid = np.asarray(idx), np.asarray(lab), np.asarray(valid)
    max_samples = cfg["max_samples"]
    assert idx.shape == lab.shape == valid.shape == (max_samples,)
    assert idx.dtype == lab.dtype == np.int32 and valid.dtype == bool

    pairs, n_view, keeps = ref_sampler_plan(
        labels,
        hard,
        cfg["num_classes"],
        max_samples,
        cfg["max_views"],
        cfg["min_pixels"],
        cfg.get("include_ignore_class", False),
    )
    flat_labels, flat_hard = labels.reshape(-1), hard.reshape(-1)
    pixels_per_image = labels[0].size
    assert valid.sum() == sum(h + e for h, e in keeps)
    assert not valid[len(pairs) * n_view :].any()
    assert np.all(idx[~valid] == 0) and np.all(lab[~valid] == -1)
    assert len(set(idx[valid].tolist())) == valid.sum()  # without replacement
    for r, ((b, c), (hard_keep, easy_keep)) in enumerate(zip(pairs, keeps)):
        slots = np.arange(r * n_view, (r + 1) * n_view)
        chosen = idx[slots][valid[slots]]
        assert np.all(chosen // pixels_per_image == b)
        assert np.all(flat_labels[chosen] == c)
        assert np.all(lab[slots][valid[slots]] == c)
        assert flat_hard[chosen].sum() == hard_keep
        assert (~flat_hard[chosen]).sum() == easy_keep
    return pairs, n_view, keeps


@pytest.mark.parametrize(
    "max_samples, expected_n_view",
    [(30, 6), (27, 5), (200, 8), (4, 0)],  # even, odd, capped by max_views, more pairs than slots
)
def test_sampler_follows_official_rule(max_samples, expected_n_view):
    labels, hard = _sampler_labels()
    cfg = dict(num_classes=5, max_samples=max_samples, max_views=8, min_pixels=10)
    pairs, n_view, keeps = _check_sampler(labels, hard, seed=max_samples, **cfg)
    assert pairs == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 4)]  # class 3 (10 px) and 255 excluded
    assert n_view == expected_n_view
    if n_view == 6:  # the three branches of the rule, as the reference computes them
        assert keeps[0] == (3, 3) and keeps[1] == (2, 4) and keeps[2] == (6, 0)


def test_sampler_ignore_class_quirk_and_short_pairs():
    labels, hard = _sampler_labels()
    # The official quirk: 255 forms a pair in each image.
    pairs, n_view, _ = _check_sampler(
        labels,
        hard,
        seed=1,
        num_classes=5,
        max_samples=70,
        max_views=8,
        min_pixels=10,
        include_ignore_class=True,
    )
    # 53 and 14 ignored pixels; class id 7 (out of range) is never a class, even with the quirk.
    assert pairs[-1] == (1, IGNORE_INDEX) and (0, IGNORE_INDEX) in pairs and len(pairs) == 7
    assert n_view == 8  # min(70 // 7, max_views)
    # min_pixels < max_views: pairs smaller than n_view leave their extra slots empty.
    _, n_view, keeps = _check_sampler(
        labels, hard, seed=2, num_classes=5, max_samples=400, max_views=50, min_pixels=5
    )
    assert n_view == 50 and any(h + e < n_view for h, e in keeps)


def test_sampler_draws_uniformly_without_replacement():
    labels = np.zeros((1, 4, 5), np.int32)  # one pair of 20 pixels, 10 hard
    hard = (np.arange(20) % 2 == 0).reshape(1, 4, 5)
    keys = jax.random.split(jax.random.key(0), 400)
    sample = jax.jit(
        jax.vmap(
            lambda k: sample_pixel_anchors(
                k,
                jnp.asarray(labels),
                jnp.asarray(hard),
                num_classes=1,
                max_samples=4,
                max_views=4,
                min_pixels=10,
            )[0]
        )
    )
    idx = np.asarray(sample(keys))
    assert all(len(set(row)) == 4 for row in idx.tolist())
    counts = np.bincount(idx.reshape(-1), minlength=20)
    assert np.all(counts > 50) and np.all(counts < 110)  # expected 400 * 2 / 10 = 80 each
    assert len({tuple(sorted(row)) for row in idx.tolist()}) > 300


def test_sampler_compiles_once_for_different_label_contents():
    traces = []

    def sample(key, labels, hard):
        traces.append(1)
        return losses.sample_pixel_anchors(
            key, labels, hard, num_classes=5, max_samples=30, max_views=8, min_pixels=10
        )

    sample = jax.jit(sample)
    labels, hard = _sampler_labels()
    first = sample(jax.random.key(0), jnp.asarray(labels), jnp.asarray(hard))
    other = np.where(labels == 1, 2, labels)  # different pairs, same shapes
    second = sample(jax.random.key(0), jnp.asarray(other), jnp.asarray(~hard))
    assert len(traces) == 1
    assert int(first[2].sum()) != int(second[2].sum()) or not np.array_equal(first[0], second[0])


def test_pixel_contrast_from_maps_matches_sampling_then_reference():
    labels, hard = _sampler_labels()
    emb = _unit(np.random.default_rng(4), 2, 12, 12, 6).astype(np.float32)
    cfg = dict(num_classes=5, max_samples=30, max_views=8, min_pixels=10)
    key = jax.random.key(9)
    got = pixel_contrast_from_maps(
        key, jnp.asarray(emb), jnp.asarray(labels), jnp.asarray(hard), chunk_size=7, **cfg
    )
    idx, lab, valid = (
        np.asarray(a)
        for a in sample_pixel_anchors(key, jnp.asarray(labels), jnp.asarray(hard), **cfg)
    )
    want = ref_pixel_contrast(emb.reshape(-1, 6)[idx], lab, valid)
    assert valid.sum() == 30
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


# ----------------------------------------------------------------------------- patch contrast


def _patch_case(seed=0, n=12, m=23, d=5):
    rng = np.random.default_rng(seed)
    a1, a2, f = _unit(rng, n, d), _unit(rng, n, d), _unit(rng, m, d)
    y = rng.integers(0, 3, n)
    yf = rng.integers(0, 3, m)
    fv = rng.random(m) > 0.2
    av = np.ones(n, bool)
    av[3] = False
    # Confidence pairs covering: crop 1 learns, crop 2 learns, neither (both low, equal, other
    # view below threshold).
    c1 = np.array([0.5, 0.95, 0.3, 0.2, 0.97, 0.92, 0.8, 0.99, 0.6, 0.93, 0.95, 0.1])[:n]
    c2 = np.array([0.95, 0.5, 0.4, 0.99, 0.92, 0.97, 0.85, 0.99, 0.91, 0.1, 0.96, 0.95])[:n]
    return a1, a2, y, c1, c2, av, f, yf, fv


def _patch_jax(args, chunk=256):
    return directional_contrast_loss(*(jnp.asarray(a) for a in args), chunk_size=chunk)


def test_patch_contrast_matches_reference_values():
    case = _patch_case()
    case32 = [a.astype(np.float32) if a.dtype == np.float64 else a for a in case]
    want, want_count = ref_directional(*case)
    assert want_count == 8  # both directions appear (see _patch_case)
    for chunk in (5, 7, 256):  # 5 and 7 divide neither 2N = 24 nor M = 23
        loss, count = _patch_jax(case32, chunk)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
        assert int(count) == want_count


def test_patch_contrast_grads_flow_only_into_anchors():
    a1, a2, y, c1, c2, av, f, yf, fv = _patch_case(seed=1)

    def ref_of(x1, x2):  # positives held at their original values: they are stop-gradient
        return ref_directional(x1, x2, y, c1, c2, av, f, yf, fv, p1=a2, p2=a1)[0]

    fd1 = _finite_difference(lambda x: ref_of(x, a2), a1)
    fd2 = _finite_difference(lambda x: ref_of(a1, x), a2)
    with jax.enable_x64(True):

        def loss(x1, x2, negatives):
            return directional_contrast_loss(
                x1,
                x2,
                jnp.asarray(y),
                jnp.asarray(c1),
                jnp.asarray(c2),
                jnp.asarray(av),
                negatives,
                jnp.asarray(yf),
                jnp.asarray(fv),
                chunk_size=5,
            )[0]

        g1, g2, gf = jax.grad(loss, argnums=(0, 1, 2))(
            jnp.asarray(a1), jnp.asarray(a2), jnp.asarray(f)
        )
        np.testing.assert_allclose(np.asarray(g1), fd1, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(np.asarray(g2), fd2, rtol=1e-6, atol=1e-8)
        assert np.all(np.asarray(gf) == 0.0)
    # Rows that do not count in a direction get no gradient from it.
    learns1 = av & (c2 > 0.9) & (c1 < c2)
    learns2 = av & (c1 > 0.9) & (c2 < c1)
    assert np.all(np.asarray(g1)[~learns1] == 0.0) and np.all(np.asarray(g2)[~learns2] == 0.0)
    assert np.all(np.abs(np.asarray(g1)[learns1]).sum(-1) > 0)


def test_patch_contrast_direction_mask_nothing_counts():
    a1, a2, y, c1, c2, av, f, yf, fv = _patch_case(seed=2)
    for conf1, conf2 in ((np.full_like(c1, 0.5), np.full_like(c2, 0.6)), (c2, c2)):  # low / equal
        args = [jnp.asarray(x, jnp.float32) for x in (a1, a2)]
        rest = [jnp.asarray(x) for x in (y, conf1, conf2, av, f.astype(np.float32), yf, fv)]
        (loss, count), grads = jax.value_and_grad(
            lambda p, q: directional_contrast_loss(p, q, *rest), argnums=(0, 1), has_aux=True
        )(*args)
        assert float(loss) == 0.0 and int(count) == 0
        assert all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_patch_contrast_without_negatives_is_zero_but_counted():
    a1, a2, y, c1, c2, av, f, yf, fv = _patch_case(seed=3)
    yf_same = np.zeros_like(yf)
    y_same = np.zeros_like(y)
    loss, count = _patch_jax(
        [
            a1.astype(np.float32),
            a2.astype(np.float32),
            y_same,
            c1,
            c2,
            av,
            f.astype(np.float32),
            yf_same,
            fv,
        ]
    )
    assert int(count) == ref_directional(a1, a2, y_same, c1, c2, av, f, yf_same, fv)[1] > 0
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_patch_contrast_memory_is_linear():
    d, chunk = 16, 128

    def temp_bytes(n):
        vec = jax.ShapeDtypeStruct((n,), jnp.float32)
        mask = jax.ShapeDtypeStruct((n,), jnp.bool_)
        feat = jax.ShapeDtypeStruct((n, d), jnp.float32)
        ints = jax.ShapeDtypeStruct((n,), jnp.int32)
        f = jax.jit(
            jax.grad(
                lambda a1, a2, *rest: directional_contrast_loss(a1, a2, *rest, chunk_size=chunk)[0],
                argnums=(0, 1),
            )
        )
        return (
            f.lower(feat, feat, ints, vec, vec, mask, feat, ints, mask)
            .compile()
            .memory_analysis()
            .temp_size_in_bytes
        )

    small, large = temp_bytes(1024), temp_bytes(4096)  # N = M both grow 4x
    assert large < 8 * small  # a dense [2N, M] matrix would grow 16x
    assert large < 2 * 4096 * 4096 * 4 / 8


def test_patch_contrast_bfloat16_inputs_computed_in_float32():
    case = _patch_case(seed=4)
    bf16 = [jnp.asarray(a, jnp.bfloat16) if a.dtype == np.float64 else jnp.asarray(a) for a in case]
    loss, count = directional_contrast_loss(*bf16)
    assert loss.dtype == jnp.float32 and count.dtype == jnp.int32
    rounded = [np.asarray(a, np.float64) for a in bf16]
    np.testing.assert_allclose(float(loss), ref_directional(*rounded)[0], rtol=1e-5)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="labels"):
        losses.cross_entropy(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 8, 8), jnp.int32))
    with pytest.raises(ValueError, match="hard"):
        losses.sample_pixel_anchors(
            jax.random.key(0), jnp.zeros((1, 4, 4), jnp.int32), jnp.zeros((1, 4, 5), bool)
        )
    with pytest.raises(ValueError, match="valid"):
        losses.pixel_contrast_loss(
            jnp.zeros((6, 3)), jnp.zeros((6,), jnp.int32), jnp.zeros((5,), bool)
        )
    case = list(_patch_case())
    case[8] = case[8][:-1]  # negative_valid one short
    with pytest.raises(ValueError, match="negative_valid"):
        losses.directional_contrast_loss(*(jnp.asarray(a) for a in case))
