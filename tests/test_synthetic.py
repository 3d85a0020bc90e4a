"""The procedural synthetic domain-shift dataset (pipa_jax/data/synthetic.py).

Besides the data-source contract, this checks that the two domains really differ the way the
module docstring claims and that the gap is neither trivial nor impossible, with colour-only
pixel classifiers instead of networks: fitted on source pixels they fail on the target, fitted on
target pixels they work, and matching the target's colour statistics to the source's (a stand-in
for colour jitter) recovers only a small part of the loss. Run with `-s` to see the numbers.
"""
import pickle
import time

import grain
import numpy as np
import pytest

from pipa_jax.data import synthetic
from pipa_jax.data.synthetic import SyntheticSource, class_frequencies, describe_domain_gap
from pipa_jax.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES

H, W = 128, 256          # analysis resolution (cheap; the scene does not depend on it)
N = 16                   # images per (domain, split) for the statistics


def _source(domain, split="train", n=N, height=H, width=W, seed=0):
    return SyntheticSource(domain, split, n, height, width, seed=seed)


@pytest.fixture(scope="module")
def pixels():
    """{(domain, split): (colours float32 [P, 3], train ids [P])}, ignored pixels dropped."""
    out = {}
    for domain in ("source", "target"):
        for split in ("train", "val"):
            src = _source(domain, split)
            examples = [src[i] for i in range(len(src))]
            x = np.concatenate([e["image"].reshape(-1, 3) for e in examples]).astype(np.float32)
            y = np.concatenate([e["label"].ravel() for e in examples])
            keep = y != IGNORE_INDEX
            out[(domain, split)] = (x[keep], y[keep])
    return out


# --- colour-only classifiers ---------------------------------------------------------------
def _fit_means(x, y):
    means = np.full((NUM_CLASSES, 3), 1e6, np.float32)   # absent classes are never predicted
    for c in np.unique(y):
        means[c] = x[y == c].mean(0)
    return means


def _nearest_mean_accuracy(means, x, y):
    d = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    return float((d.argmin(1) == y).mean())


_BINS = 16


def _colour_keys(x):
    q = np.clip(x, 0, 255).astype(np.int64) * _BINS // 256
    return (q[:, 0] * _BINS + q[:, 1]) * _BINS + q[:, 2]


def _fit_colour_table(x, y):
    """The Bayes colour-only classifier: the most frequent class of each 16^3 colour bin."""
    counts = np.bincount(_colour_keys(x) * NUM_CLASSES + y,
                         minlength=_BINS ** 3 * NUM_CLASSES).reshape(-1, NUM_CLASSES)
    fallback = np.bincount(y, minlength=NUM_CLASSES).argmax()
    return np.where(counts.sum(1) > 0, counts.argmax(1), fallback)


def _table_accuracy(table, x, y):
    return float((table[_colour_keys(x)] == y).mean())


def _histogram_match(x, reference):
    """Per-channel quantile mapping of x onto the reference's colour distribution."""
    q = np.linspace(0, 1, 257)
    out = np.empty_like(x)
    for c in range(3):
        out[:, c] = np.interp(x[:, c], np.quantile(x[:, c], q), np.quantile(reference[:, c], q))
    return out


def _moment_match(x, reference):
    return (x - x.mean(0)) / x.std(0) * reference.std(0) + reference.mean(0)


# --- the data-source contract ---------------------------------------------------------------
@pytest.mark.parametrize("domain", ["source", "target"])
@pytest.mark.parametrize("height,width", [(128, 256), (37, 61)])
def test_shapes_dtypes_and_names(domain, height, width):
    src = SyntheticSource(domain, "val", 3, height, width, seed=5)
    assert len(src) == 3
    ex = src[2]
    assert set(ex) == {"image", "label", "name"}
    assert ex["image"].shape == (height, width, 3) and ex["image"].dtype == np.uint8
    assert ex["label"].shape == (height, width) and ex["label"].dtype == np.uint8
    assert ex["image"].flags.c_contiguous and ex["label"].flags.c_contiguous
    assert isinstance(ex["name"], str) and domain in ex["name"] and "val" in ex["name"]
    assert ex["name"] != src[1]["name"]
    assert src[np.int64(2)]["name"] == ex["name"]   # numpy integer indices, as samplers give


def test_deterministic_and_distinct():
    a = _source("source", n=4)
    b = _source("source", n=4)
    for i in range(4):
        ea, eb = a[i], b[i]
        np.testing.assert_array_equal(ea["image"], eb["image"])
        np.testing.assert_array_equal(ea["label"], eb["label"])
    np.testing.assert_array_equal(a[1]["image"], a[1]["image"])      # no hidden state
    base = a[1]
    others = [a[2], _source("source", n=4, seed=1)[1], _source("source", "val", n=4)[1],
              _source("target", n=4)[1]]
    for other in others:
        assert not np.array_equal(base["image"], other["image"])
        assert not np.array_equal(base["label"], other["label"])


def test_scene_does_not_depend_on_resolution():
    small, large = _source("target", n=3)[2]["label"], _source("target", n=3, height=2 * H,
                                                                 width=2 * W)[2]["label"]
    assert (small == large[::2, ::2]).mean() > 0.95


def test_label_values_and_ignore_only_on_the_hood():
    for domain in ("source", "target"):
        src = _source(domain, n=8)
        for i in range(len(src)):
            label = src[i]["label"]
            values = set(np.unique(label).tolist())
            assert values <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}, values
            ignored = label == IGNORE_INDEX
            if domain == "source":
                assert not ignored.any()
            else:  # the ego-vehicle hood: a thin band at the bottom, like Cityscapes
                assert 0 < ignored.mean() < 0.1
                assert not ignored[: int(0.85 * H)].any()


def test_several_classes_per_image():
    for domain in ("source", "target"):
        src = _source(domain, n=12)
        counts = [len(set(np.unique(src[i]["label"]).tolist()) - {IGNORE_INDEX})
                  for i in range(len(src))]
        assert min(counts) >= 6, (domain, counts)
        for i in range(len(src)):  # the street grammar: sky on top, road at the bottom
            label = src[i]["label"]
            assert (label[: H // 8] == 10).mean() + (label[: H // 8] == 2).mean() + (
                label[: H // 8] == 8).mean() > 0.5
            assert (label[int(0.8 * H):] <= 1).mean() + (label[int(0.8 * H):] >= 11).mean() > 0.4


def test_every_class_occurs_and_rare_classes_are_rare():
    presence = {}
    for domain in ("source", "target"):
        src = SyntheticSource(domain, "train", 150, 48, 96)
        hits = np.zeros(NUM_CLASSES)
        for i in range(len(src)):
            hits += np.bincount(src[i]["label"].ravel(), minlength=256)[:NUM_CLASSES] > 0
        presence[domain] = hits / len(src)
    both = np.maximum(presence["source"], presence["target"])
    print("\nfraction of images holding each class (source / target):")
    for c, name in enumerate(CLASS_NAMES):
        print(f"  {name:14s} {presence['source'][c]:5.2f} {presence['target'][c]:5.2f}")
    assert (both > 0).all(), [CLASS_NAMES[c] for c in np.nonzero(both == 0)[0]]
    for common in ("road", "building", "vegetation", "sky", "car"):
        assert both[CLASS_NAMES.index(common)] > 0.9, common
    for rare in ("train", "motorcycle"):
        assert both[CLASS_NAMES.index(rare)] < 0.2, rare


# --- the domain gap -------------------------------------------------------------------------
def test_appearance_differs_per_class(pixels):
    xs, ys = pixels[("source", "train")]
    xt, yt = pixels[("target", "train")]
    ms, mt = _fit_means(xs, ys), _fit_means(xt, yt)
    big = [CLASS_NAMES.index(n) for n in
           ("road", "sidewalk", "building", "vegetation", "terrain", "sky", "car", "person")]
    shift = {CLASS_NAMES[c]: float(np.linalg.norm(ms[c] - mt[c])) for c in big}
    print("\nper-class mean colour shift source -> target:",
          {k: round(v) for k, v in shift.items()})
    assert sum(v > 40 for v in shift.values()) >= 6, shift
    # The shift is not one global transform: classes move in opposite directions and the
    # brightness order of classes changes.
    road, walk, sky = (CLASS_NAMES.index(n) for n in ("road", "sidewalk", "sky"))
    print("mean brightness source / target: road", ms[road].mean(), mt[road].mean(),
          "sidewalk", ms[walk].mean(), mt[walk].mean(), "sky", ms[sky].mean(), mt[sky].mean())
    assert mt[road].mean() > ms[road].mean() + 10     # the road brightens ...
    assert mt[walk].mean() < ms[walk].mean() - 20     # ... while the sidewalk darkens
    others = [c for c in big if c != sky]
    assert mt[sky].mean() > max(mt[c].mean() for c in others) + 30   # target: sky the brightest
    assert ms[sky].mean() < max(ms[c].mean() for c in others)        # source: it is not
    # Target images are blurrier and noisier: less high-frequency energy in edges, other stats.
    img_s = _source("source", n=2)[0]["image"].astype(np.float32)
    img_t = _source("target", n=2)[0]["image"].astype(np.float32)
    sat_s = (img_s.max(-1) - img_s.min(-1)).mean()
    sat_t = (img_t.max(-1) - img_t.min(-1)).mean()
    assert sat_s > 1.5 * sat_t, (sat_s, sat_t)


def test_layout_statistics_differ():
    fs = class_frequencies(_source("source", n=24))
    ft = class_frequencies(_source("target", n=24))
    np.testing.assert_allclose(fs.sum(), 1.0)
    print("\nclass pixel frequencies % (source / target):")
    for c, name in enumerate(CLASS_NAMES):
        print(f"  {name:14s} {100 * fs[c]:6.2f} {100 * ft[c]:6.2f}")
    idx = CLASS_NAMES.index
    assert fs[idx("sky")] > 2 * ft[idx("sky")]           # higher horizon, lower buildings
    assert ft[idx("building")] > 1.2 * fs[idx("building")]
    assert ft[idx("person")] > 1.5 * fs[idx("person")]   # busier target streets (about 2x)
    assert ft[idx("pole")] > 1.5 * fs[idx("pole")]
    assert ft[idx("sidewalk")] > 1.3 * fs[idx("sidewalk")]
    assert 0.5 * np.abs(fs - ft).sum() > 0.1             # total variation distance


def test_colour_alone_does_not_transfer_but_the_target_is_learnable(pixels):
    xs, ys = pixels[("source", "train")]
    xsv, ysv = pixels[("source", "val")]
    xt, yt = pixels[("target", "train")]
    xtv, ytv = pixels[("target", "val")]
    results = {}
    for name, fit, score in (("nearest class mean", _fit_means, _nearest_mean_accuracy),
                             ("colour table", _fit_colour_table, _table_accuracy)):
        on_source, on_target = fit(xs, ys), fit(xt, yt)
        r = {
            "source->source": score(on_source, xsv, ysv),
            "source->target": score(on_source, xtv, ytv),
            "target->target": score(on_target, xtv, ytv),
            "source->hist-matched target": score(on_source, _histogram_match(xtv, xs), ytv),
            "source->mean/std-matched target": score(on_source, _moment_match(xtv, xs), ytv),
        }
        results[name] = r
        print(f"\n{name} pixel accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
        gap = r["target->target"] - r["source->target"]
        # Colour does not transfer ...
        assert r["source->target"] < 0.5 * r["source->source"], r
        # ... yet colour still separates target classes (the target is learnable) ...
        assert r["target->target"] > 2 * r["source->target"], r
        # ... and colour normalisation (a stand-in for colour jitter) recovers little of it.
        assert r["source->hist-matched target"] - r["source->target"] < 0.5 * gap, r
        assert r["source->mean/std-matched target"] - r["source->target"] < 0.5 * gap, r
    table = results["colour table"]
    assert table["source->source"] > 0.7 and table["target->target"] > 0.6, table


# --- integration, errors, speed -------------------------------------------------------------
def test_picklable_and_usable_by_grain():
    src = SyntheticSource("target", "train", 6, 64, 128, seed=3)
    clone = pickle.loads(pickle.dumps(src))
    assert len(pickle.dumps(src)) < 1000   # no cached arrays travel to worker processes
    np.testing.assert_array_equal(clone[4]["image"], src[4]["image"])
    ds = grain.MapDataset.source(src).map(lambda ex: ex["label"])
    np.testing.assert_array_equal(ds[5], src[5]["label"])
    loader = grain.DataLoader(
        data_source=src,
        sampler=grain.samplers.IndexSampler(len(src), shuffle=True, seed=0, num_epochs=1),
        worker_count=0,
    )
    names = [ex["name"] for ex in loader]
    assert sorted(names) == sorted(src[i]["name"] for i in range(len(src)))
    assert len(list(src)) == len(src)      # Python's sequence iteration stops at the end


@pytest.mark.parametrize("kwargs,argument", [
    (dict(domain="gta"), "domain"),
    (dict(split="test"), "split"),
    (dict(num_examples=0), "num_examples"),
    (dict(num_examples=2.5), "num_examples"),
    (dict(num_examples=True), "num_examples"),
    (dict(height=8), "height"),
    (dict(width="512"), "width"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments_name_the_argument(kwargs, argument):
    args = dict(domain="source", split="train", num_examples=4, height=32, width=64, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        SyntheticSource(**args)


@pytest.mark.parametrize("index", [-1, 4, 100, 1.0, "0", None])
def test_bad_index(index):
    src = SyntheticSource("source", "train", 4, 32, 64)
    with pytest.raises(ValueError, match=r"index must be .*\[0, 4\)"):
        src[index]


def test_helpers():
    text = describe_domain_gap()
    for topic in ("colour", "texture", "layout", "shared"):
        assert topic in text
    src = _source("source", n=3, height=32, width=64)
    counts = sum(np.bincount(src[i]["label"].ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
                 for i in range(3))
    np.testing.assert_allclose(class_frequencies(src), counts / counts.sum())
    np.testing.assert_allclose(class_frequencies(src, num=1),
                               class_frequencies(SyntheticSource("source", "train", 1, 32, 64)))
    with pytest.raises(ValueError, match="num"):
        class_frequencies(src, num=0)
    assert set(synthetic.STYLES) == set(synthetic.DOMAINS)


def test_speed_sanity():
    """Reports the rendering time; no timed assertion (the machine is shared)."""
    for domain in ("source", "target"):
        src = SyntheticSource(domain, "train", 5, 256, 512)
        src[0]
        start = time.perf_counter()
        examples = [src[i] for i in range(1, 5)]
        per_image = (time.perf_counter() - start) / 4
        print(f"\n{domain}: {1000 * per_image:.1f} ms per 512x256 example")
        assert all(e["image"].shape == (256, 512, 3) for e in examples)
        assert len({e["image"].tobytes() for e in examples}) == 4


def test_class_stats_drive_rare_class_sampling():
    """The synthetic source carries the per-image class counts RCS needs, and the training
    pipeline draws crops with rare classes far more often with RCS on than with it off."""
    from pipa_jax import config as config_lib
    from pipa_jax.data import pipeline

    src = _source("source", n=6, height=32, width=64)
    stats = src.class_stats()
    assert stats.shape == (6, NUM_CLASSES) and stats.dtype == np.int64
    for i in range(6):
        np.testing.assert_array_equal(
            stats[i], np.bincount(src[i]["label"].ravel(), minlength=256)[:NUM_CLASSES])

    def config(rcs: bool):
        c = config_lib.base_config()
        c.data.image_size, c.data.crop_size = (64, 128), (64, 64)
        c.pipa.patch.crop_size = (64, 64)
        c.data.num_train = 40
        c.data.rcs.enabled = rcs
        c.data.rcs.temperature = 0.01
        c.data.rcs.min_pixels = 4
        config_lib.validate(c, 1)
        return c

    all_stats = SyntheticSource("source", "train", 40, 64, 128).class_stats().sum(0)
    present = np.nonzero(all_stats)[0]
    rare = present[np.argsort(all_stats[present])[:4]]      # the four rarest classes present

    def rare_share(rcs: bool) -> float:
        ds = pipeline.source_dataset(config(rcs))
        labels = np.stack([ds[i]["label"] for i in range(60)])
        return float(np.isin(labels, rare).mean())

    plain, with_rcs = rare_share(False), rare_share(True)
    print(f"\npixels of the four rarest classes {[CLASS_NAMES[c] for c in rare]}: "
          f"{100 * plain:.2f} % without RCS, {100 * with_rcs:.2f} % with RCS")
    assert with_rcs > 2 * plain, (plain, with_rcs)


def test_omitted_classes_are_never_drawn_and_the_rest_of_the_scene_stays():
    omit = ("wall", "fence", "traffic light", "traffic sign", "train", "motorcycle")
    ids = [CLASS_NAMES.index(n) for n in omit]
    full_counts = np.zeros(256, np.int64)
    for domain in ("source", "target"):
        full = _source(domain, "val", n=40, height=48, width=96)
        part = SyntheticSource(domain, "val", 40, 48, 96, omit_classes=omit)
        full_counts += sum(np.bincount(full[i]["label"].ravel(), minlength=256) for i in range(40))
        part_counts = sum(np.bincount(part[i]["label"].ravel(), minlength=256) for i in range(40))
        assert part_counts[ids].sum() == 0, domain
        kept = [c for c in range(NUM_CLASSES) if c not in ids]
        assert (part_counts[kept] > 0).all(), [CLASS_NAMES[c] for c in kept if part_counts[c] == 0]
        # The same streets: only where an omitted object stood does the label change.
        agree = np.mean([(full[i]["label"] == part[i]["label"]).mean() for i in range(40)])
        assert agree > 0.9, agree
    assert full_counts[ids].min() > 0      # the full scenes hold every omitted class
    # Without both two-wheelers there are no riders; names may use underscores or a string.
    no_wheels = SyntheticSource("target", "val", 30, 48, 96, omit_classes="motorcycle,bicycle")
    labels = np.stack([no_wheels[i]["label"] for i in range(30)])
    assert not np.isin(labels, [CLASS_NAMES.index(n) for n in ("rider", "motorcycle", "bicycle")]).any()
    assert SyntheticSource("source", "val", 1, 32, 64, omit_classes=("traffic_light",)).omit == (
        CLASS_NAMES.index("traffic light"),)
    assert "traffic light" in repr(SyntheticSource("source", "val", 1, 32, 64, omit_classes=("traffic_light",)))


@pytest.mark.parametrize("name", ["road", "sky", "lamp post"])
def test_omitting_a_class_the_street_needs_or_does_not_know_is_an_error(name):
    with pytest.raises(ValueError, match=f"cannot omit class '{name}'.*expected any of 'wall'"):
        SyntheticSource("source", "val", 1, 32, 64, omit_classes=(name,))
