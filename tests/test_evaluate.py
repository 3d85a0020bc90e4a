"""Evaluation as the papers do it: sliding-window vs whole-image inference against NumPy
references, logits upsampled to full-resolution labels, mIoU16/13, and the evaluate CLI on a
tiny training run and on a converted model directory (which must agree)."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pipa_jax import evaluate, inference, metrics, model_io, train
from pipa_jax.labels import CLASS_NAMES, NUM_CLASSES, SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES
from pipa_jax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# ----------------------------------------------------------------------------- references

def np_resize_bilinear(x, out_hw):
    """PyTorch F.interpolate(bilinear, align_corners=False) on [B, H, W, C], written from its
    definition: src = max((dst + 0.5) * in / out - 0.5, 0), neighbours i0, min(i0 + 1, in - 1)."""
    x = np.asarray(x, np.float64)

    def taps(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    y0, y1, ly = taps(x.shape[1], out_hw[0])
    x0, x1, lx = taps(x.shape[2], out_hw[1])
    rows = x[:, y0] * (1 - ly)[None, :, None, None] + x[:, y1] * ly[None, :, None, None]
    return rows[:, :, x0] * (1 - lx)[None, None, :, None] + rows[:, :, x1] * lx[None, None, :, None]


def toy_np(x, w, v):
    """The toy network: 4x4 average pool -> per-pixel linear, plus a term from the mean of the
    whole input (so a window sees different logits than the full image)."""
    b, h, wd, c = x.shape
    pooled = x.reshape(b, h // 4, 4, wd // 4, 4, c).mean(axis=(2, 4))
    return pooled @ w + (x.mean(axis=(1, 2)) @ v)[:, None, None, :]


class ToyNet(nnx.Module):
    def __init__(self, k, seed=0):
        kw, kv = jax.random.split(jax.random.key(seed))
        self.w = nnx.Param(jax.random.normal(kw, (3, k)))
        self.v = nnx.Param(jax.random.normal(kv, (3, k)))

    def __call__(self, x, train=False):
        b, h, w, c = x.shape
        pooled = x.reshape(b, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4))
        return pooled @ self.w[...] + (x.mean(axis=(1, 2)) @ self.v[...])[:, None, None, :]

    def infer_logits(self, x):  # the segmentor protocol's inference: logits at the input size
        return layers.resize_bilinear(self(x), x.shape[1:3])


def reference_slide(x, w, v, crop, stride):
    """Window accumulation written out: every window's logits resized to the window, summed,
    divided by the per-pixel window count (mmseg slide_inference)."""
    b, h, wd, _ = x.shape
    (ch, cw), (sh, sw) = crop, stride
    acc = np.zeros((b, h, wd, w.shape[1]))
    cnt = np.zeros((h, wd))
    y = 0
    while True:
        y1 = min(y, max(h - ch, 0))
        xx = 0
        while True:
            x1 = min(xx, max(wd - cw, 0))
            win = x[:, y1:y1 + ch, x1:x1 + cw]
            acc[:, y1:y1 + ch, x1:x1 + cw] += np_resize_bilinear(toy_np(win, w, v), win.shape[1:3])
            cnt[y1:y1 + ch, x1:x1 + cw] += 1
            if xx + cw >= wd:
                break
            xx += sw
        if y + ch >= h:
            break
        y += sh
    assert cnt.min() >= 1
    return acc / cnt[None, :, :, None]


@pytest.fixture(scope="module")
def toy():
    net = ToyNet(5)
    x = np.random.default_rng(0).normal(size=(2, 40, 56, 3)).astype(np.float32)
    return net, x, np.asarray(net.w[...], np.float64), np.asarray(net.v[...], np.float64)


# ----------------------------------------------------------------------------- inference

def test_window_grid_is_mmseg_layout():
    (wh, ww), offsets = inference.window_grid((40, 56), (24, 32), (16, 20))
    assert (wh, ww) == (24, 32)
    # The last window of each row / column is moved back to end at the border.
    assert offsets == [(0, 0), (0, 20), (0, 24), (16, 0), (16, 20), (16, 24)]
    count = inference.count_map((40, 56), (24, 32), (16, 20))
    assert count.min() >= 1 and count.sum() == 6 * 24 * 32
    # HRDA's test layout: 1024x1024 windows, stride 512 over 1024x2048 -> 3 windows.
    assert inference.window_grid((1024, 2048), (1024, 1024), (512, 512))[1] == [(0, 0), (0, 512), (0, 1024)]
    # An image smaller than the window is one window of its own size.
    assert inference.window_grid((20, 28), (24, 32), (16, 20)) == ((20, 28), [(0, 0)])
    with pytest.raises(ValueError, match="larger than eval.crop_size"):
        inference.InferenceSettings("slide", (16, 16), (32, 8))


def test_slide_equals_whole_when_the_window_covers_the_image(toy):
    net, x, _, _ = toy
    apply_fn = lambda a: net(a)
    whole = np.asarray(inference.whole_logits(apply_fn, jnp.asarray(x)))
    for crop in ((40, 56), (64, 64)):
        slide = np.asarray(jax.jit(lambda a: inference.slide_logits(apply_fn, a, crop, (8, 8)))(x))
        np.testing.assert_array_equal(slide, whole)


def test_slide_matches_numpy_window_accumulation(toy):
    net, x, w, v = toy
    crop, stride = (24, 32), (16, 20)
    got = jax.jit(lambda a: inference.slide_logits(lambda b: net(b), a, crop, stride))(x)
    want = reference_slide(x.astype(np.float64), w, v, crop, stride)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    # The windows really see other context than the whole image.
    whole = np.asarray(inference.whole_logits(lambda b: net(b), jnp.asarray(x)))
    assert np.abs(whole - want).max() > 0.1


def _toy_eval(k=NUM_CLASSES, seed=1):
    net = ToyNet(k, seed)
    graphdef, params, batch_stats = nnx.split(net, nnx.Param, nnx.BatchStat)
    return net, graphdef, params, batch_stats


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_logits_are_upsampled_to_full_resolution_labels(mode):
    net, graphdef, params, batch_stats = _toy_eval()
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(2, 24, 40, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=(2, 50, 84), dtype=np.uint8)   # not an integer ratio
    labels[:, :3] = 255
    settings = inference.InferenceSettings(mode, (16, 24), (8, 16))
    step = inference.make_eval_step(graphdef)
    conf, preds = step(params, batch_stats, images, labels, settings=settings, return_predictions=True)
    assert preds.shape == labels.shape and preds.dtype == jnp.uint8

    x = (images.astype(np.float64) - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    w, v = np.asarray(net.w[...], np.float64), np.asarray(net.v[...], np.float64)
    if mode == "whole":
        logits = np_resize_bilinear(toy_np(x, w, v), x.shape[1:3])
    else:
        logits = reference_slide(x, w, v, (16, 24), (8, 16))
    want_pred = np_resize_bilinear(logits, labels.shape[1:]).argmax(-1)
    agree = (np.asarray(preds) == want_pred).mean()
    assert agree > 0.999, agree  # float32 vs float64: only exact ties may differ
    np.testing.assert_array_equal(np.asarray(conf), metrics.confusion_matrix_np(np.asarray(preds), labels))
    assert int(np.asarray(conf).sum()) == int((labels != 255).sum())


class FakeSource:
    """The evaluation source interface: {'image' at test size, 'label' at full res[, 'name']}."""

    def __init__(self, n, image_hw, label_hw, names=True, seed=0):
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            ex = {"image": rng.integers(0, 256, image_hw + (3,), dtype=np.uint8),
                  "label": rng.integers(0, NUM_CLASSES, label_hw, dtype=np.uint8)}
            if names:
                ex["name"] = f"frankfurt_000000_{i:06d}"
            self.items.append(ex)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_eval_batches_group_shapes_pad_and_name():
    a = FakeSource(3, (8, 16), (16, 32))
    b = FakeSource(2, (8, 12), (8, 12), names=False)
    mixed = FakeSource(0, (1, 1), (1, 1))
    mixed.items = a.items + b.items
    batches = list(inference.eval_batches(mixed, 2, process_index=0, process_count=1))
    assert [bt.num_valid for bt in batches] == [2, 1, 2]
    assert batches[1].labels.shape == (2, 16, 32) and (batches[1].labels[1] == 255).all()
    assert not batches[1].images[1].any()
    assert batches[0].names == ["frankfurt_000000_000000", "frankfurt_000000_000001"]
    assert batches[2].names == ["000003", "000004"]          # no 'name': the index
    # Process 1 of 2 gets the second half of every global batch.
    second = list(inference.eval_batches(mixed, 2, process_index=1, process_count=2))
    assert [bt.names for bt in second] == [["frankfurt_000000_000001"], [], ["000004"]]


# ----------------------------------------------------------------------------- subsets

def test_miou16_and_miou13_subsets_and_tables():
    net, graphdef, params, batch_stats = _toy_eval()
    c = load_config("synthia2cs.py", "method=daformer,smoke")
    c.data.eval_batch_size = 8
    loaded = evaluate.LoadedModel(graphdef, params, batch_stats, c.model, {"checkpoint": "/toy", "which": "student"})
    result = evaluate.evaluate_model(loaded, c, source=FakeSource(5, (16, 24), (32, 48)))
    conf = np.asarray(result["confusion_matrix"])
    iou = metrics.iou_from_confusion(conf)
    assert result["num_images"] == 5 and conf.sum() == 5 * 32 * 48
    assert result["miou"] == pytest.approx(np.nanmean(iou))
    assert result["miou16"] == pytest.approx(np.nanmean(iou[list(SYNTHIA_16_CLASSES)]))
    assert result["miou13"] == pytest.approx(np.nanmean(iou[list(SYNTHIA_13_CLASSES)]))
    assert set(SYNTHIA_16_CLASSES) - set(SYNTHIA_13_CLASSES) == {3, 4, 5}
    text = evaluate.format_result(result)
    assert "| mIoU16" in text and "| mIoU13" in text and "mIoU16 " in text.splitlines()[-1]
    rec = train._eval_record(conf, c)
    assert rec["miou16"] == pytest.approx(result["miou16"]) and rec["miou13"] == pytest.approx(result["miou13"])
    # GTA configs report the 19-class mIoU only.
    g = load_config("gta2cs.py", "method=daformer,smoke")
    assert metrics.subsets_of(g) == {"mIoU": None} and "miou16" not in train._eval_record(conf, g)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, xla_cache_dir):
    """A tiny source-only training run (2 steps) with its in-training evaluation."""
    c = load_config("synthetic.py", "method=source_only,tiny")
    c.update({"total_steps": 2, "checkpoint_every": 2, "log_every": 1})
    c.model.embed_dim = 16
    c.data.image_size = (32, 64)
    c.data.crop_size = (32, 32)
    c.data.num_train = 8
    c.data.num_val = 5
    c.report.grid_images = 0
    c.compilation_cache_dir = xla_cache_dir   # the session's (conftest.py)
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(c, workdir)
    return workdir


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def test_evaluate_cli_on_a_training_run_reproduces_its_metrics(run_dir, capsys):
    assert evaluate.main(["prog", "--workdir", run_dir]) == 0
    out = capsys.readouterr().out
    assert "| road" in out and "mIoU" in out
    result = _read_json(os.path.join(run_dir, "eval", "synthetic_target_student_step2.json"))
    logged = _read_json(os.path.join(run_dir, "metrics.json"))["2"]["student"]
    # Same inference code and data as the in-training evaluation: the same numbers.
    assert result["miou"] == pytest.approx(logged["miou"], abs=1e-9)
    assert result["confusion_matrix"] == logged["confusion_matrix"]
    assert result["num_images"] == 5 and result["model"]["step"] == 2
    assert set(result["per_class_iou"]) == set(CLASS_NAMES) and "miou16" not in result
    assert os.path.exists(os.path.join(run_dir, "eval", "synthetic_target_student_step2.txt"))
    # The teacher (here the untouched initial copy: source-only runs no EMA) is a different model.
    assert evaluate.main(["prog", "--workdir", run_dir, "--which", "teacher", "--out", run_dir + "/t"]) == 0
    teacher = _read_json(os.path.join(run_dir, "t", "synthetic_target_teacher_step2.json"))
    assert teacher["model"]["which"] == "teacher" and teacher["confusion_matrix"] != result["confusion_matrix"]


def test_converted_model_dir_gives_the_same_result(run_dir, tmp_path, capsys):
    loaded, run_config = evaluate.load_run_model(run_dir)
    model_dir = str(tmp_path / "model")
    model_io.save_model(model_dir, nnx.merge(loaded.graphdef, loaded.params, loaded.batch_stats), loaded.config,
                        source={"input": "test", "which": "student"})
    preds = str(tmp_path / "preds")
    cfg = os.path.join(ROOT, "configs", "synthetic.py") + ":method=source_only,tiny"
    argv = ["prog", "--checkpoint", model_dir, "--config", cfg, "--config.data.image_size=(32,64)",
            "--config.data.num_val=5", "--config.compilation_cache_dir=", "--predictions", preds]
    assert evaluate.main(argv) == 0
    capsys.readouterr()
    result = _read_json(os.path.join(model_dir, "eval", "synthetic_target_student.json"))
    logged = _read_json(os.path.join(run_dir, "metrics.json"))["2"]["student"]
    assert result["miou"] == pytest.approx(logged["miou"], abs=1e-9)
    # Full-resolution prediction PNGs, named by frame, that score to the same confusion matrix.
    from pipa_jax import io as io_lib
    from pipa_jax.data import pipeline
    src = pipeline.make_source("synthetic_target", "val", run_config)
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for i in range(len(src)):
        ex = src[i]
        pred = io_lib.read_label(os.path.join(preds, ex["name"] + "_trainIds.png"))
        assert pred.shape == ex["label"].shape
        conf += metrics.confusion_matrix_np(pred, ex["label"])
    assert conf.tolist() == result["confusion_matrix"]


def _error(argv, capsys):
    code = evaluate.main(argv)
    err = capsys.readouterr().err
    assert code != 0
    return err


def test_evaluate_errors_name_the_path_and_the_fix(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(run_dir, "config.json")).read())
    err = _error(["prog", "--workdir", str(empty)], capsys)
    assert str(empty) in err and "no checkpoints" in err and "--checkpoint" in err

    err = _error(["prog", "--workdir", str(tmp_path / "nowhere")], capsys)
    assert "config.json" in err and "nowhere" in err

    # A checkpoint that does not fit the run's config (config.json edited afterwards).
    bad = tmp_path / "bad_run"
    bad.mkdir()
    os.symlink(os.path.join(run_dir, "checkpoints"), bad / "checkpoints")
    cfg = _read_json(os.path.join(run_dir, "config.json"))
    cfg["model"]["embed_dim"] = 24
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _error(["prog", "--workdir", str(bad)], capsys)
    assert os.path.join(str(bad), "checkpoints", "2") in err and "does not hold the model" in err

    cfg_file = os.path.join(ROOT, "configs", "synthetic.py") + ":method=source_only,tiny"
    err = _error(["prog", "--checkpoint", run_dir], capsys)
    assert "--config" in err
    err = _error(["prog", "--checkpoint", run_dir, "--config", cfg_file], capsys)
    assert run_dir in err and "--workdir" in err
    err = _error(["prog", "--workdir", run_dir, "--checkpoint", run_dir], capsys)
    assert "exactly one" in err


# ----------------------------------------------------------------------------- benchmark configs

@pytest.mark.parametrize("name", ["gta2cs.py", "synthia2cs.py"])
def test_benchmark_configs_and_variants(name):
    from pipa_jax import config as config_lib
    synthia = name == "synthia2cs.py"
    for arg, steps in (("", 60000), ("method=pipa", 60000), ("method=daformer", 40000), ("method=source_only", 40000)):
        c = load_config(name, arg)
        c.data.source_root, c.data.target_root = "/data/src", "/data/cityscapes"
        # The recipes start from ImageNet weights and refuse to run without them.
        with pytest.raises(ValueError, match="model.pretrained.*convert_checkpoint"):
            config_lib.validate(c, 1)
        c.model.pretrained = "/weights/mit_b5"
        config_lib.validate(c, 1)
        assert c.total_steps == steps and c.batch_size == 2 and c.model.backbone == "mit_b5"
        assert c.data.source == ("synthia" if synthia else "gta") and c.data.target == "cityscapes"
        assert c.data.source_size == ((1280, 760) if synthia else (1280, 720))
        assert (c.optimizer.learning_rate, c.optimizer.head_lr_mult, c.optimizer.warmup_steps,
                c.optimizer.poly_power) == (6e-5, 10.0, 1500, 1.0)
        assert c.eval.mode == "whole" and c.eval.miou_subsets == ((19, 16, 13) if synthia else (19,))
        pipa = arg in ("", "method=pipa")
        assert c.pipa.pixel.enabled == c.pipa.patch.enabled == pipa
        assert c.data.rcs.enabled == (arg != "method=source_only")
        assert c.data.rcs.temperature == (0.1 if pipa else 0.01)
        # PiPa's released GTA setting is 1280x640 / 640 crops; everything else DAFormer's 512.
        big = pipa and not synthia
        assert c.data.target_size == ((1280, 640) if big else (1024, 512))
        assert c.data.crop_size == ((640, 640) if big else (512, 512))
    assert load_config(name, "method=daformer,res=640").data.crop_size == (640, 640)
    smoke = load_config(name, "method=pipa,smoke")
    smoke.data.source_root, smoke.data.target_root = "/x", "/y"
    config_lib.validate(smoke, 8)
    assert smoke.total_steps <= 10 and smoke.model.backbone == "mit_tiny" and smoke.data.crop_size == (64, 64)
    with pytest.raises(ValueError, match="unknown config option"):
        load_config(name, "methd=pipa")


def test_evaluate_on_a_cityscapes_layout_matches_the_official_scorer(tmp_path, capsys):
    """The real Cityscapes val frame (256x128 here) through the data layer: image at the test
    size, label at full resolution, predictions written by frame id score the same with
    tools.score (the official evaluator's conventions)."""
    import shutil
    from pipa_jax.models import build_segmentor
    from pipa_jax.tools import prepare_data, score

    shared = "/work/shared/data/cityscapes"
    if not os.path.isdir(shared):
        pytest.skip("no shared Cityscapes sample")
    root = tmp_path / "cityscapes"
    frame = "frankfurt_000000_000294"
    for split, city, name in (("val", "frankfurt", frame), ("train", "aachen", "aachen_000000_000019")):
        for kind, suffix in (("leftImg8bit", "_leftImg8bit.png"), ("gtFine", "_gtFine_labelIds.png")):
            os.makedirs(root / kind / split / city, exist_ok=True)
            shutil.copy(os.path.join(shared, kind, "val", "frankfurt", frame + suffix),
                        root / kind / split / city / (name + suffix))
    prepare_data.prepare("cityscapes", str(root), workers=1, progress=False)
    c = load_config("gta2cs.py", "method=daformer,smoke")
    abstract = nnx.eval_shape(lambda: build_segmentor(evaluate._inference_model_config(c.model)))
    graphdef, params, batch_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.3).astype(x.dtype), params)
    batch_stats = jax.tree.map(lambda x: np.ones(x.shape, x.dtype), batch_stats)
    model_dir = str(tmp_path / "model")
    model_config = evaluate._inference_model_config(c.model)   # architecture fields only
    model_io.save_model(model_dir, nnx.merge(graphdef, params, batch_stats), model_config,
                        source={"input": "test", "which": "student"})
    preds = tmp_path / "preds"
    argv = ["prog", "--checkpoint", model_dir, "--config", os.path.join(ROOT, "configs", "gta2cs.py") +
            ":method=daformer,smoke", f"--config.data.target_root={root}", "--predictions", str(preds),
            "--out", str(tmp_path / "eval")]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    result = _read_json(str(tmp_path / "eval" / "cityscapes_student.json"))
    assert result["num_images"] == 1
    names = os.listdir(preds)
    assert names == ["frankfurt_000000_000294_trainIds.png"]
    from pipa_jax import io as io_lib
    assert io_lib.read_label(str(preds / names[0])).shape == (128, 256)   # the label's full size
    scored = score.score_dirs(str(preds), str(root / "gtFine" / "val"))
    assert scored["miou"] == pytest.approx(result["miou"], abs=1e-12)
