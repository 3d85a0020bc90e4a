"""The real-data layer on small fake layouts built from the real sample files in shared/data:
prepare_data, sources, keep-ratio resizes, the 75 % crop rule, Rare Class Sampling, determinism
and resume, every layout error, and the TFDS builders."""
from __future__ import annotations

import json
import os
import shutil

import ml_collections
import numpy as np
import png
import pytest
from PIL import Image

from pipa_jax import config as config_lib
from pipa_jax import io as io_lib
from pipa_jax import labels as L
from pipa_jax.data import pipeline, sources, transforms
from pipa_jax.tools import prepare_data

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
if not os.path.isdir(SHARED):
    SHARED = "/work/shared/data"
CS_NAME = "frankfurt_000000_000294"
CS_IMG = os.path.join(SHARED, "cityscapes/leftImg8bit/val/frankfurt", f"{CS_NAME}_leftImg8bit.png")
CS_LAB = os.path.join(SHARED, "cityscapes/gtFine/val/frankfurt", f"{CS_NAME}_gtFine_labelIds.png")
GTA_IMG = os.path.join(SHARED, "gta/images/fda_demo_source.png")

GTA_HW = (66, 120)          # a 1914x1052 frame scaled by 1/16 (keeps GTA's aspect ratio)
N_GTA = 6
TRAIN_LABEL_ID = 31         # Cityscapes / GTA id of 'train' (train id 16): the rare class here
SYN_N = 3


# ------------------------------------------------------------------------------------------
# Fake layouts
# ------------------------------------------------------------------------------------------

def gta_label_ids(i: int, hw=GTA_HW) -> np.ndarray:
    """A street-like GTA label-id map: sky / building / road bands, a car, and in images 0-1 a
    large train (rare class), in image 2 a tiny one; some unlabelled (id 0) pixels."""
    h, w = hw
    lab = np.full(hw, 7, np.uint8)                 # road
    lab[: h // 3] = 23                             # sky
    lab[h // 3: h // 2] = 11                       # building
    lab[h // 2: h // 2 + 4, : w // 4] = 8          # sidewalk
    lab[h - 10:, w // 2 + i: w // 2 + i + 12] = 26  # car
    lab[0:2, :] = 0                                # unlabelled -> 255
    if i < 2:
        lab[h // 3: h // 3 + 20, 10 + 20 * i: 50 + 20 * i] = TRAIN_LABEL_ID  # 800 px of train
    elif i == 2:
        lab[40:43, 5:9] = TRAIN_LABEL_ID            # 12 px
    return lab


def make_gta(root, n=N_GTA, hw=GTA_HW, full_size_first=False):
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "labels"))
    base = Image.open(GTA_IMG).convert("RGB")
    for i in range(n):
        size = (1914, 1052) if (full_size_first and i == 0) else (hw[1], hw[0])
        im = base.resize(size, Image.BILINEAR) if size != base.size else base
        if i % 2:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        im.save(os.path.join(root, "images", f"{i:05d}.png"))
        lab = gta_label_ids(i, (size[1], size[0]) if size != (hw[1], hw[0]) else hw)
        Image.fromarray(lab).save(os.path.join(root, "labels", f"{i:05d}.png"))
    return str(root)


def make_cityscapes(root, n_train=3):
    for split, names in (("val", [CS_NAME]),
                         ("train", [f"aachen_{k:06d}_000019" for k in range(n_train)])):
        for name in names:
            city = name.split("_")[0]
            idir = os.path.join(root, "leftImg8bit", split, city)
            ldir = os.path.join(root, "gtFine", split, city)
            os.makedirs(idir, exist_ok=True)
            os.makedirs(ldir, exist_ok=True)
            shutil.copy(CS_IMG, os.path.join(idir, f"{name}_leftImg8bit.png"))
            shutil.copy(CS_LAB, os.path.join(ldir, f"{name}_gtFine_labelIds.png"))
    return str(root)


def synthia_label_ids(i: int, hw=(38, 64)) -> np.ndarray:
    rng = np.random.default_rng(i)
    ids = np.array(sorted(L.SYNTHIA_ID_TO_TRAIN_ID) + [0, 13, 14, 22, 300])  # 300: needs 16 bits
    return ids[rng.integers(0, len(ids), hw)].astype(np.uint16)


def write_synthia_label(path, ids: np.ndarray):
    h, w = ids.shape
    rgb = np.zeros((h, w, 3), np.uint16)
    rgb[..., 0] = ids
    rgb[..., 1] = 1000 + np.arange(w)[None, :]      # instance-like junk in the other channels
    rgb[..., 2] = 7
    with open(path, "wb") as f:
        png.Writer(w, h, bitdepth=16, greyscale=False).write(f, rgb.reshape(h, w * 3))


def make_synthia(root, n=SYN_N):
    os.makedirs(os.path.join(root, "RGB"))
    os.makedirs(os.path.join(root, "GT", "LABELS"))
    base = Image.open(GTA_IMG).convert("RGB").resize((64, 38), Image.BILINEAR)
    for i in range(n):
        base.save(os.path.join(root, "RGB", f"{i:07d}.png"))
        write_synthia_label(os.path.join(root, "GT", "LABELS", f"{i:07d}.png"), synthia_label_ids(i))
    return str(root)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Prepared GTA5 and Cityscapes layouts shared by the read-only tests."""
    base = tmp_path_factory.mktemp("prepared")
    gta = make_gta(str(base / "gta"))
    cs = make_cityscapes(str(base / "cityscapes"))
    prepare_data.prepare("gta", gta, workers=1, progress=False)
    prepare_data.prepare("cityscapes", cs, workers=1, progress=False)
    return {"gta": gta, "cityscapes": cs}


def data_config(gta, cs, **overrides) -> ml_collections.ConfigDict:
    c = config_lib.base_config()
    c.batch_size = 2
    c.data.source, c.data.target = "gta", "cityscapes"
    c.data.source_root, c.data.target_root = gta, cs
    c.data.source_size = (120, 66)
    c.data.target_size = (128, 64)
    c.data.crop_size = (32, 32)
    c.pipa.patch.crop_size = (32, 32)
    c.data.prefetch = 1
    c.data.rcs.enabled = True
    c.data.rcs.min_pixels = 300
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


# ------------------------------------------------------------------------------------------
# prepare_data
# ------------------------------------------------------------------------------------------

def test_prepare_gta_and_cityscapes_match_direct_mapping(prepared):
    for i in range(N_GTA):
        out = io_lib.read_label(os.path.join(prepared["gta"], "labels", f"{i:05d}_labelTrainIds.png"))
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, L.to_train_ids(gta_label_ids(i), L.CITYSCAPES_ID_TO_TRAIN_ID))
    cs_out = os.path.join(prepared["cityscapes"], "gtFine/val/frankfurt", f"{CS_NAME}_gtFine_labelTrainIds.png")
    expected = L.to_train_ids(io_lib.read_label(CS_LAB), L.CITYSCAPES_ID_TO_TRAIN_ID)
    np.testing.assert_array_equal(io_lib.read_label(cs_out), expected)
    # The upstream (independently downscaled) train-id file agrees except on a few edge pixels.
    upstream = io_lib.read_label(CS_LAB.replace("_labelIds", "_labelTrainIds"))
    assert (upstream == expected).mean() > 0.99


def test_prepare_synthia_16bit(tmp_path):
    root = make_synthia(str(tmp_path / "synthia"))
    # Pillow would read these as 8-bit and lose the ids: the reason for pypng.
    assert not np.array_equal(np.asarray(Image.open(os.path.join(root, "GT/LABELS/0000000.png")))[..., 0],
                              synthia_label_ids(0))
    np.testing.assert_array_equal(sources.read_synthia_label(os.path.join(root, "GT/LABELS/0000000.png")),
                                  synthia_label_ids(0))
    # The fast Pillow path (both bytes of each 16-bit sample) agrees with pypng's decoding,
    # including ids above 255, and the first channel is the class id.
    import png
    for i in range(2):
        path = os.path.join(root, "GT", "LABELS", f"{i:07d}.png")
        w, h, rows, _ = png.Reader(filename=path).asDirect()
        ref = np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(h, w, -1)[..., 0]
        fast = sources._synthia_label_pillow(path)
        assert fast is not None and fast.dtype == np.uint16
        np.testing.assert_array_equal(fast, ref)
    r = prepare_data.prepare("synthia", root, workers=1, progress=False)
    assert r.written == SYN_N
    for i in range(SYN_N):
        out = io_lib.read_label(os.path.join(root, "GT/LABELS", f"{i:07d}_labelTrainIds.png"))
        ref = L.to_train_ids(synthia_label_ids(i), L.SYNTHIA_ID_TO_TRAIN_ID)
        np.testing.assert_array_equal(out, ref)
        assert set(np.unique(out)) == set(range(19)) | {255}
    src = sources.FileSource("synthia", root, size=(64, 38))
    ex = src[1]
    assert ex["image"].shape == (38, 64, 3) and ex["label"].shape == (38, 64) and ex["name"] == "0000001"


def test_prepare_statistics(prepared):
    with open(sources.class_stats_file(prepared["gta"])) as f:
        stats = json.load(f)
    assert stats["format"] == sources.STATS_FORMAT and stats["dataset"] == "gta"
    assert sorted(stats["images"]) == [f"{i:05d}" for i in range(N_GTA)]
    total = np.zeros(19, np.int64)
    for i in range(N_GTA):
        ref = np.bincount(L.to_train_ids(gta_label_ids(i), L.CITYSCAPES_ID_TO_TRAIN_ID).ravel(), minlength=256)[:19]
        assert stats["images"][f"{i:05d}"]["counts"] == ref.tolist()
        total += ref
    assert stats["class_pixels"] == total.tolist()
    assert stats["samples_with_class"]["16"] == ["00000", "00001", "00002"]   # train: > 0 pixels
    assert stats["samples_with_class"]["12"] == []
    loaded = sources.FileSource("gta", prepared["gta"]).class_stats()
    assert loaded.shape == (N_GTA, 19) and loaded[0, 16] == 800 and loaded[2, 16] == 12
    cs_stats = sources.load_class_stats("cityscapes", prepared["cityscapes"], "val")
    assert cs_stats["names"] == [CS_NAME]


def _mtimes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(sources.TRAIN_ID_SUFFIX) or f.startswith("pipa_class_stats"):
                out[os.path.join(d, f)] = os.stat(os.path.join(d, f)).st_mtime_ns
    return out


def test_prepare_is_idempotent(tmp_path):
    root = make_gta(str(tmp_path / "gta"))
    r1 = prepare_data.prepare("gta", root, workers=1, progress=False)
    assert (r1.written, r1.skipped, r1.stats_written) == (N_GTA, 0, 1)
    before = _mtimes(root)
    assert len(before) == N_GTA + 1
    r2 = prepare_data.prepare("gta", root, workers=1, progress=False)
    assert (r2.written, r2.skipped, r2.recounted, r2.stats_written) == (0, N_GTA, 0, 0)
    assert _mtimes(root) == before


def test_prepare_resumes_after_interruption(tmp_path):
    root = make_gta(str(tmp_path / "gta"))
    prepare_data.prepare("gta", root, workers=1, progress=False)
    stats_path = sources.class_stats_file(root)
    with open(stats_path) as f:
        complete = json.load(f)
    # An interrupted run: one label not yet converted, a half-written temporary file beside it,
    # and no statistics file (it is written last).
    os.remove(os.path.join(root, "labels", "00003_labelTrainIds.png"))
    tmp = os.path.join(root, "labels", ".00003_labelTrainIds.png.x1y2z3.tmp")
    with open(tmp, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n\x00\x00")
    os.remove(stats_path)
    # The loaders ignore the temporary file (and report the missing train-id file).
    with pytest.raises(sources.DatasetLayoutError, match="00003_labelTrainIds.png"):
        sources.FileSource("gta", root)
    assert len(sources.list_gta(root)) == N_GTA
    kept = os.stat(os.path.join(root, "labels", "00000_labelTrainIds.png")).st_mtime_ns
    r = prepare_data.prepare("gta", root, workers=1, progress=False)
    assert (r.written, r.recounted, r.removed_temp) == (1, N_GTA - 1, 1)
    assert not os.path.exists(tmp)
    assert os.stat(os.path.join(root, "labels", "00000_labelTrainIds.png")).st_mtime_ns == kept
    with open(stats_path) as f:
        resumed = json.load(f)
    for name in complete["images"]:
        assert resumed["images"][name]["counts"] == complete["images"][name]["counts"]
    assert resumed["samples_with_class"] == complete["samples_with_class"]
    # A label edited after preparation is converted again.
    lab_path = os.path.join(root, "labels", "00004.png")
    Image.fromarray(np.full(GTA_HW, 24, np.uint8)).save(lab_path)
    os.utime(lab_path, ns=(os.stat(lab_path).st_atime_ns, os.stat(lab_path).st_mtime_ns + 10**9))
    r = prepare_data.prepare("gta", root, workers=1, progress=False)
    assert r.written == 1
    assert np.all(io_lib.read_label(os.path.join(root, "labels", "00004_labelTrainIds.png")) == 11)


def test_prepare_cli_with_worker_processes(tmp_path, capsys):
    root = make_cityscapes(str(tmp_path / "cs"))
    assert prepare_data.main(["cityscapes", root, "--workers", "2", "--no-progress"]) == 0
    assert "4 written" in capsys.readouterr().out
    assert prepare_data.main(["cityscapes", root, "--no-progress"]) == 0
    assert "0 written, 4 already prepared" in capsys.readouterr().out
    assert prepare_data.main(["cityscapes", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Sources and resizes
# ------------------------------------------------------------------------------------------

def test_rescale_size_keeps_ratio():
    assert transforms.rescale_size((1052, 1914), (1280, 720)) == (704, 1280)
    assert transforms.rescale_size((760, 1280), (1280, 760)) == (760, 1280)
    assert transforms.rescale_size((1024, 2048), (1024, 512)) == (512, 1024)
    assert transforms.rescale_size((1024, 2048), (2048, 1024)) == (1024, 2048)
    assert transforms.rescale_size((1052, 1914), (2560, 1440)) == (1407, 2560)


def test_resize_conventions():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 12, 3)).astype(np.uint8)
    # Exact 2x downscale with half-pixel centres = mean of each 2x2 block (cv2.INTER_LINEAR).
    ref = img.astype(np.float64).reshape(4, 2, 6, 2, 3).mean((1, 3))
    out = transforms.resize_bilinear(img, (4, 6))
    assert np.abs(out.astype(np.float64) - ref).max() <= 0.5 + 1e-6
    assert np.all(transforms.resize_bilinear(np.full((5, 7, 3), 77, np.uint8), (11, 3)) == 77)
    lab = np.arange(8 * 12, dtype=np.uint8).reshape(8, 12)
    np.testing.assert_array_equal(transforms.resize_nearest(lab, (4, 6)), lab[::2, ::2])
    np.testing.assert_array_equal(transforms.resize_nearest(lab, (16, 24)), lab.repeat(2, 0).repeat(2, 1))


def test_sources_shapes_and_keep_ratio(tmp_path, prepared):
    root = make_gta(str(tmp_path / "gta"), n=2, full_size_first=True)
    prepare_data.prepare("gta", root, workers=1, progress=False)
    src = sources.FileSource("gta", root, size=(1280, 720))
    ex = src[0]
    assert ex["image"].shape == (704, 1280, 3) and ex["image"].dtype == np.uint8
    assert ex["label"].shape == (704, 1280) and ex["label"].dtype == np.uint8 and ex["name"] == "00000"
    # Nearest resize keeps the label's ids; the band layout stays where it was.
    full = L.to_train_ids(gta_label_ids(0, (1052, 1914)), L.CITYSCAPES_ID_TO_TRAIN_ID)
    np.testing.assert_array_equal(ex["label"], transforms.resize_nearest(full, (704, 1280)))

    c = data_config(prepared["gta"], prepared["cityscapes"])
    val = pipeline.make_source("cityscapes", "val", c)
    assert len(val) == 1
    ex = val[0]
    assert ex["name"] == CS_NAME
    assert ex["image"].shape == (64, 128, 3)                  # resized to data.target_size
    assert ex["label"].shape == (128, 256)                    # full resolution for the evaluator
    np.testing.assert_array_equal(ex["label"], L.to_train_ids(io_lib.read_label(CS_LAB), L.CITYSCAPES_ID_TO_TRAIN_ID))
    train = pipeline.make_source("cityscapes", "train", c)
    assert len(train) == 3 and train[0]["label"].shape == (64, 128)
    gta = pipeline.make_source("gta", "train", c)
    assert len(gta) == N_GTA and gta[3]["image"].shape == (66, 120, 3)
    imgs, labs = next(pipeline.eval_batches(_eval_cfg(c)))
    assert imgs.shape == (2, 64, 128, 3) and labs.shape == (2, 128, 256)
    assert np.all(labs[1] == 255)                             # padding of the last batch


def _eval_cfg(c):
    c = ml_collections.ConfigDict(c.to_dict())
    c.data.eval_batch_size = 2
    return c


# ------------------------------------------------------------------------------------------
# Crops and Rare Class Sampling
# ------------------------------------------------------------------------------------------

def test_source_crop_rule_75_percent():
    lab = np.full((64, 256), 10, np.uint8)          # sky everywhere ...
    lab[:, 200:] = 0                                 # ... except a road strip on the right
    ex = {"image": np.zeros((64, 256, 3), np.uint8), "label": lab}
    crop = transforms.RandomCropFlip((32, 64), flip=False, cat_max_ratio=0.75)
    free = transforms.RandomCropFlip((32, 64), flip=False)
    n = 600
    passed = np.mean([transforms.crop_passes_class_rule(crop(ex, np.random.default_rng(s))["label"], 0.75)
                      for s in range(n)])
    unconstrained = np.mean([transforms.crop_passes_class_rule(free(ex, np.random.default_rng(s))["label"], 0.75)
                             for s in range(n)])
    # Exact pass probability of one uniform crop (the label is constant along y): then with up to
    # 10 checked redraws plus mmseg's final unchecked draw, P(pass) = 1 - (1 - p)^11.
    p = np.mean([transforms.crop_passes_class_rule(lab[:32, x:x + 64], 0.75) for x in range(256 - 64 + 1)])
    for got, want in ((unconstrained, p), (passed, 1 - (1 - p) ** 11)):
        assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / n) + 1e-9, (got, want)
    assert passed > 0.8 > 0.2 > unconstrained
    # The rule itself: >= 2 classes, none with >= 75 % of the labelled pixels, 255 ignored.
    assert not transforms.crop_passes_class_rule(np.zeros((4, 4), np.uint8), 0.75)
    ok = np.zeros((4, 4), np.uint8)
    ok[:2] = 1
    assert transforms.crop_passes_class_rule(ok, 0.75)
    ok[:, :2] = 255                                  # 4 x class 0, 4 x class 1 left
    assert transforms.crop_passes_class_rule(ok, 0.75)
    ok[0, 2:] = 0                                    # 6 x class 0 of 8 = 75 %: fails
    assert not transforms.crop_passes_class_rule(ok, 0.75)
    # Padding: a crop larger than the image pads with 0 / 255.
    small = {"image": np.full((10, 20, 3), 9, np.uint8), "label": np.ones((10, 20), np.uint8)}
    out = transforms.RandomCropFlip((32, 32), flip=False)(small, np.random.default_rng(0))
    assert out["image"].shape == (32, 32, 3) and np.all(out["image"][10:] == 0) and np.all(out["label"][:, 20:] == 255)


def reference_rcs_probs(counts, temperature, min_pixels):
    """The official recipe written independently: frequencies over all classes present, softmax of
    (1 - f) / T, restricted to classes with an image holding > min_pixels of them."""
    counts = np.asarray(counts, np.float64)
    present = {c: counts[:, c].sum() for c in range(19) if counts[:, c].sum() > 0}
    total = sum(present.values())
    eligible = [c for c in present if (counts[:, c] > min_pixels).any()]
    w = np.array([np.exp((1 - present[c] / total) / temperature) for c in eligible])
    return eligible, w / w.sum()


def test_rcs_probabilities_and_sampling_frequencies():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50000, (40, 19)) * (rng.random((40, 19)) < 0.6)
    counts[:, 16] = 0
    counts[3, 16] = 2500                             # present, but never > 3000: not sampled
    counts[:, 12] = 0
    counts[7, 12] = 5000                             # rare, one eligible image
    for temperature in (0.01, 0.1):
        classes, probs, samples = transforms.rcs_class_probs(counts, temperature, 3000)
        ref_classes, ref_probs = reference_rcs_probs(counts, temperature, 3000)
        assert classes.tolist() == ref_classes
        np.testing.assert_allclose(probs, ref_probs, rtol=1e-10)
        for c, s in zip(classes, samples):
            assert s.tolist() == np.flatnonzero(counts[:, c] > 3000).tolist()
    assert 16 not in classes.tolist() and 12 in classes.tolist()

    class Dummy:
        def __len__(self):
            return 40
    rcs = transforms.RareClassSampling(Dummy(), counts, transforms.RandomCropFlip((8, 8)), 0.1, 3000, 0.5)
    n = 20000
    draws = [rcs.sample_image(np.random.default_rng([5, i])) for i in range(n)]
    cls = np.array([d[0] for d in draws])
    freq = np.array([(cls == c).mean() for c in rcs.classes])
    sigma = np.sqrt(rcs.probs * (1 - rcs.probs) / n)
    assert np.all(np.abs(freq - rcs.probs) < 5 * sigma + 1e-9)
    # Images uniformly among the eligible ones of the drawn class.
    k = int(np.argmax(rcs.probs))
    c = int(rcs.classes[k])
    imgs = np.array([d[1] for d in draws if d[0] == c])
    assert set(imgs.tolist()) == set(rcs.samples[k].tolist())
    per = np.bincount(imgs, minlength=40)[rcs.samples[k]] / len(imgs)
    assert np.all(np.abs(per - 1 / len(rcs.samples[k])) < 5 * np.sqrt(1 / len(rcs.samples[k]) / len(imgs)))
    assert all(d[1] == 7 for d in draws if d[0] == 12)


def test_rcs_recrops_until_the_class_is_in_the_crop(prepared):
    src = sources.FileSource("gta", prepared["gta"])
    counts = src.class_stats()
    crop = transforms.RandomCropFlip((32, 32), cat_max_ratio=0.75)
    # Only 'train' (16) and classes everywhere are eligible with these thresholds; T large makes
    # all eligible classes likely, then we look only at samples of class 16.
    rcs = transforms.RareClassSampling(src, counts, crop, temperature=1e-3, min_pixels=300, min_crop_ratio=0.5)
    assert 16 in rcs.classes.tolist()
    k = rcs.classes.tolist().index(16)
    assert sorted(rcs.samples[k].tolist()) == [0, 1]            # image 2 holds only 12 pixels
    # Class 16 is the rarest eligible class, so at T=1e-3 it is drawn almost always.
    assert rcs.probs[k] > 0.99
    hits = [np.count_nonzero(rcs(i, np.random.default_rng([1, i]))["label"] == 16) for i in range(20)]
    assert np.mean([h > 150 for h in hits]) >= 0.9
    no_recrop = transforms.RareClassSampling(src, counts, crop, 1e-3, 300, 0.0)
    hits0 = [np.count_nonzero(no_recrop(i, np.random.default_rng([1, i]))["label"] == 16) for i in range(20)]
    assert np.mean([h > 150 for h in hits0]) < np.mean([h > 150 for h in hits])


# ------------------------------------------------------------------------------------------
# Pipeline: determinism and resume
# ------------------------------------------------------------------------------------------

def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a) and set(a) == set(b)


def test_pipeline_deterministic_and_resumable(prepared):
    c = data_config(prepared["gta"], prepared["cityscapes"])
    config_lib.validate(c, 2)
    it = pipeline.train_iterator(c)
    batches = _take(it, 5)
    assert it.get_state() == {"next_index": 5}
    b = batches[0]
    assert set(b) == {"source_image", "source_label", "target_image", "target_label"}
    assert b["source_image"].shape == (2, 32, 32, 3) and b["source_label"].shape == (2, 32, 32)
    assert b["target_image"].dtype == np.uint8 and b["target_label"].dtype == np.uint8
    again = _take(pipeline.train_iterator(c), 5)
    assert all(_same(x, y) for x, y in zip(batches, again))
    resumed = pipeline.train_iterator(c, 3)
    assert resumed.get_state() == {"next_index": 3}
    assert all(_same(x, y) for x, y in zip(batches[3:], _take(resumed, 2)))
    it2 = pipeline.train_iterator(c)
    next(it2)
    it2.set_state({"next_index": 4})
    assert _same(next(it2), batches[4]) and it2.get_state() == {"next_index": 5}
    # RCS makes the rare class frequent in the source crops; another seed changes the data.
    many = _take(pipeline.train_iterator(c), 20)
    assert np.mean([np.any(x["source_label"] == 16) for x in many]) > 0.5
    c.seed = 1
    assert not _same(next(pipeline.train_iterator(c)), batches[0])


def test_pipeline_worker_processes_match_threads(prepared):
    c = data_config(prepared["gta"], prepared["cityscapes"])
    ref = _take(pipeline.train_iterator(c, 2), 3)
    c.data.workers = 2
    it = pipeline.train_iterator(c, 2)
    try:
        got = _take(it, 3)
    finally:
        it.close()
    assert all(_same(x, y) for x, y in zip(ref, got))
    assert it.get_state() == {"next_index": 5}


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

def _raises(fn, *fragments, exc=ValueError):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in: {msg}"
    return msg


def test_layout_errors(tmp_path):
    missing = str(tmp_path / "no_such_gta")
    _raises(lambda: sources.FileSource("gta", missing), missing, "does not exist", "images/")
    _raises(lambda: prepare_data.prepare("gta", missing, workers=1, progress=False), missing)

    gta = str(tmp_path / "gta")
    os.makedirs(os.path.join(gta, "labels"))
    _raises(lambda: sources.list_gta(gta), os.path.join(gta, "images"), "Point the root")

    full = make_gta(str(tmp_path / "gta_full"))
    _raises(lambda: sources.list_gta(os.path.join(full, "images")), "pass " + full + " as the root")

    cs = make_cityscapes(str(tmp_path / "cs"))
    _raises(lambda: sources.FileSource("cityscapes", os.path.join(cs, "leftImg8bit"), "val"),
            os.path.join(cs, "leftImg8bit", "leftImg8bit", "val"), "pass " + cs + " as the root")

    os.remove(os.path.join(full, "labels", "00002.png"))
    _raises(lambda: sources.list_gta(full), "1 of 6 images", os.path.join(full, "labels", "00002.png"),
            "Extract the matching label")
    os.remove(os.path.join(cs, "gtFine", "train", "aachen", "aachen_000001_000019_gtFine_labelIds.png"))
    _raises(lambda: sources.list_cityscapes(cs, "train"), "aachen_000001_000019_gtFine_labelIds.png",
            "gtFine_trainvaltest.zip")

    # Unprepared labels: the error gives the exact command.
    _raises(lambda: sources.FileSource("cityscapes", cs, "val"),
            f"{CS_NAME}_gtFine_labelTrainIds.png", f"python -m pipa_jax.tools.prepare_data cityscapes {cs}")
    c = data_config(full, cs)
    c.data.source_root = ""
    _raises(lambda: pipeline.make_source("gta", "train", c), "config.data.source_root", "--config.data.source_root=")
    _raises(lambda: config_lib.validate(c, 2), "data.source_root")


def test_corrupt_files_and_missing_stats(tmp_path):
    root = make_gta(str(tmp_path / "gta"), n=3)
    prepare_data.prepare("gta", root, workers=1, progress=False)
    src = sources.FileSource("gta", root)
    bad_image = os.path.join(root, "images", "00001.png")
    with open(bad_image, "r+b") as f:
        f.truncate(200)
    _raises(lambda: src[1], bad_image, "corrupt", "re-download or re-extract")
    bad_label = os.path.join(root, "labels", "00002_labelTrainIds.png")
    with open(bad_label, "wb") as f:
        f.write(b"not a png")
    _raises(lambda: src[2], bad_label, "corrupt", f"delete {bad_label}",
            f"python -m pipa_jax.tools.prepare_data gta {root}")
    # prepare_data rewrites an unreadable output instead of trusting it.
    r = prepare_data.prepare("gta", root, workers=1, progress=False)
    assert r.written == 1 and src[2]["label"].shape == GTA_HW
    # A corrupt original label names the file.
    bad_raw = os.path.join(root, "labels", "00000.png")
    with open(bad_raw, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\ngarbage")
    os.remove(os.path.join(root, "labels", "00000_labelTrainIds.png"))
    _raises(lambda: prepare_data.prepare("gta", root, workers=1, progress=False), bad_raw, "re-download")
    # SYNTHIA: corrupt and 8-bit labels.
    syn = make_synthia(str(tmp_path / "syn"), n=2)
    p0 = os.path.join(syn, "GT", "LABELS", "0000000.png")
    with open(p0, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    _raises(lambda: sources.read_synthia_label(p0), p0, "corrupt")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(p0)
    _raises(lambda: sources.read_synthia_label(p0), p0, "16-bit", "Re-extract")
    # RCS without statistics.
    os.remove(sources.class_stats_file(root))
    cs = make_cityscapes(str(tmp_path / "cs"))
    prepare_data.prepare("cityscapes", cs, workers=1, progress=False)
    os.remove(bad_raw)
    os.remove(os.path.join(root, "images", "00000.png"))
    c = data_config(root, cs)
    _raises(lambda: pipeline.train_iterator(c), sources.class_stats_file(root),
            f"python -m pipa_jax.tools.prepare_data gta {root}", "rcs.enabled=False")


# ------------------------------------------------------------------------------------------
# TFDS
# ------------------------------------------------------------------------------------------

def test_tfds_builders_round_trip(prepared, tmp_path):
    from pipa_jax.data import tfds_builders
    data_dir = str(tmp_path / "tfds")
    syn = make_synthia(str(tmp_path / "syn"))
    prepare_data.prepare("synthia", syn, workers=1, progress=False)
    roots = {"gta": prepared["gta"], "cityscapes": prepared["cityscapes"], "synthia": syn}
    for name, root in roots.items():
        b = tfds_builders.build(name, root, data_dir)
        assert b.info.file_format.value == "array_record"
    assert tfds_builders.TFDS_NAMES == {"gta": "pipa_gta5", "synthia": "pipa_synthia_rand_cityscapes",
                                        "cityscapes": "pipa_cityscapes"}
    # Readable through tfds.data_source by name, raw features intact.
    import tensorflow_datasets as tfds
    raw = tfds.data_source("pipa_cityscapes", split="val", data_dir=data_dir, download=False)
    assert len(raw) == 1 and raw[0]["label"].shape == (128, 256, 1)
    for name, split, size, full in (("gta", "train", (120, 66), False), ("synthia", "train", (64, 38), False),
                                    ("cityscapes", "val", (128, 64), True), ("cityscapes", "train", (128, 64), False)):
        files = sources.FileSource(name, roots[name], split, size, full)
        tf_src = tfds_builders.TfdsSource(name, split, data_dir, size, full)
        assert len(files) == len(tf_src)
        for i in range(len(files)):
            a, b = files[i], tf_src[i]
            assert a["name"] == b["name"]
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
        if split == "train":
            np.testing.assert_array_equal(tf_src.class_stats(), files.class_stats())
    # The same grain pipeline over format 'tfds' gives the same batches as the file layouts.
    c = data_config(prepared["gta"], prepared["cityscapes"])
    ref = _take(pipeline.train_iterator(c, 1), 2)
    c.data.format, c.data.tfds_data_dir = "tfds", data_dir
    c.data.source_root = c.data.target_root = ""
    config_lib.validate(c, 2)
    got = _take(pipeline.train_iterator(c, 1), 2)
    assert all(_same(x, y) for x, y in zip(ref, got))
    assert pipeline.make_source("cityscapes", "val", c)[0]["label"].shape == (128, 256)
    _raises(lambda: tfds_builders.TfdsSource("gta", "train", str(tmp_path / "empty")),
            "not built", "python -m pipa_jax.data.tfds_builders gta", exc=sources.DatasetLayoutError)
    _raises(lambda: tfds_builders.build("gta", str(tmp_path / "nope"), str(tmp_path / "tfds2")),
            str(tmp_path / "nope"), "does not exist")
