"""python -m pipa_jax.predict: PNG pairs at each image's original size from a run or a model
directory (identical predictions), sliding windows for large images, and clear errors."""
import importlib.util
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from PIL import Image

from pipa_jax import evaluate, inference, model_io, predict
from pipa_jax.labels import NUM_CLASSES, colorize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py")
CONFIG_ARG = f"{CONFIG}:method=source_only,tiny"


def tiny_config():
    spec = importlib.util.spec_from_file_location("synthetic_config_predict", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("method=source_only,tiny")
    c.model.embed_dim = 16
    c.data.image_size = (32, 64)       # the test-size box predict resizes into: 64x32
    c.compilation_cache_dir = ""
    return c


def _random_like(tree, rng, scale):
    return jax.tree.map(lambda x: (rng.normal(size=x.shape) * scale).astype(x.dtype), tree)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A workdir in the trainer's layout (config.json + an Orbax TrainState checkpoint at step 3
    with random student and teacher weights; no time spent on training, which test_evaluate
    covers) and a model directory holding the same student."""
    from pipa_jax.models import build_segmentor
    from pipa_jax.state import TrainState

    c = tiny_config()
    abstract = nnx.eval_shape(lambda: build_segmentor(c.model))
    _, params, batch_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(0)
    batch_stats = jax.tree.map(lambda x: np.ones(x.shape, x.dtype), batch_stats)
    state = TrainState(step=np.int32(3), params=_random_like(params, rng, 0.3), batch_stats=batch_stats,
                       teacher_params=_random_like(params, rng, 0.3), opt_state={}, terms={})
    workdir = str(tmp_path_factory.mktemp("run"))
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"),
                                 options=ocp.CheckpointManagerOptions(create=True))
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         data=ocp.args.JsonSave({"next_index": 3})))
    mngr.wait_until_finished()
    mngr.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(c.to_json_best_effort())
    loaded, _ = evaluate.load_run_model(workdir)
    model_dir = str(tmp_path_factory.mktemp("model"))
    model_io.save_model(model_dir, nnx.merge(loaded.graphdef, loaded.params, loaded.batch_stats), loaded.config,
                        source={"input": "test", "which": "student"})
    return workdir, model_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)).save(d / "street_a.png")
    pal = Image.fromarray(rng.integers(0, 4, (40, 24), dtype=np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    pal.save(d / "portrait_b.png")                       # palette mode, portrait
    return str(d)


def _run(argv, capsys):
    code = predict.main(["prog"] + argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_predict_writes_train_ids_and_overlays_at_original_size(model_dirs, images, tmp_path, capsys):
    workdir, model_dir = model_dirs
    out = tmp_path / "out"
    code, stdout, err = _run(["--workdir", workdir, "--images", os.path.join(images, "*.png"), "--out", str(out)],
                             capsys)
    assert code == 0, err
    assert "wrote 2 predictions" in stdout
    for stem, (h, w) in (("street_a", (50, 90)), ("portrait_b", (40, 24))):
        ids = Image.open(out / f"{stem}_trainIds.png")
        ov = Image.open(out / f"{stem}_overlay.png")
        assert ids.mode == "L" and ids.size == (w, h) and ov.mode == "RGB" and ov.size == (w, h)
        ids = np.asarray(ids)
        assert ids.max() < NUM_CLASSES
        image = np.asarray(Image.open(os.path.join(images, f"{stem}.png")).convert("RGB"), np.float32)
        want = np.clip(np.round(0.5 * image + 0.5 * colorize(ids)), 0, 255)
        np.testing.assert_array_equal(np.asarray(ov), want.astype(np.uint8))
    # Images are resized into the 64x32 test box first (keep ratio), as in evaluation.
    assert "90x50 -> 58x32" in stdout and "24x40 -> 32x53" in stdout

    # The same weights from a model directory (and the config for the test size) agree exactly;
    # the teacher of the run is another network.
    out2, out3 = tmp_path / "ckpt", tmp_path / "teacher"
    code, _, err = _run(["--checkpoint", model_dir, "--config", CONFIG_ARG, "--config.data.image_size=(32,64)",
                         "--config.compilation_cache_dir=",
                         "--images", os.path.join(images, "street_a.png"), "--out", str(out2)], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(out2 / "street_a_trainIds.png")),
                                  np.asarray(Image.open(out / "street_a_trainIds.png")))
    code, _, err = _run(["--workdir", workdir, "--which", "teacher", "--images", os.path.join(images, "street_a.png"),
                         "--out", str(out3)], capsys)
    assert code == 0, err
    assert not np.array_equal(np.asarray(Image.open(out3 / "street_a_trainIds.png")),
                              np.asarray(Image.open(out / "street_a_trainIds.png")))


def test_large_images_are_segmented_with_sliding_windows(model_dirs, tmp_path, capsys):
    c = tiny_config()
    # Resized into the box: whole image (the validated input size).
    assert predict.plan((300, 500), c) == ((32, 53), inference.InferenceSettings("whole"))
    # Kept at full size (--noresize): larger than the box -> windows of the box, half overlap.
    size, s = predict.plan((80, 150), c, resize=False)
    assert size == (80, 150) and s.mode == "slide" and s.crop_size == (32, 64) and s.stride == (16, 32)
    # A slide config uses its own windows.
    c.eval.mode, c.eval.crop_size, c.eval.stride = "slide", (32, 32), (16, 16)
    assert predict.plan((300, 500), c)[1] == inference.InferenceSettings("slide", (32, 32), (16, 16))

    workdir, _ = model_dirs
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 150, 3), dtype=np.uint8)).save(big)
    code, stdout, err = _run(["--workdir", workdir, "--images", str(big), "--out", str(tmp_path / "o"),
                              "--noresize"], capsys)
    assert code == 0, err
    assert "slide" in stdout
    assert Image.open(tmp_path / "o" / "big_trainIds.png").size == (150, 80)


def test_errors_name_the_path_and_the_fix(model_dirs, images, tmp_path, capsys):
    workdir, model_dir = model_dirs
    out = str(tmp_path / "out")

    pattern = str(tmp_path / "nothing" / "*.png")
    code, _, err = _run(["--workdir", workdir, "--images", pattern, "--out", out], capsys)
    assert code == 1 and pattern in err and "quoted" in err and "does not exist" in err

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code, _, err = _run(["--workdir", workdir, "--images", str(bad / "*.png"), "--out", out], capsys)
    assert code == 1 and str(bad / "broken.png") in err and "remove it from --images" in err

    same = tmp_path / "same"
    (same / "x").mkdir(parents=True)
    Image.open(os.path.join(images, "street_a.png")).save(same / "x" / "street_a.png")
    code, _, err = _run(["--workdir", workdir, "--images", str(same / "**" / "*.png"), "--out", out], capsys)
    assert code == 0  # one file: fine
    Image.open(os.path.join(images, "street_a.png")).save(same / "street_a.png")
    code, _, err = _run(["--workdir", workdir, "--images", str(same / "**" / "*.png"), "--out", out], capsys)
    assert code == 1 and "street_a_trainIds.png" in err and "separately" in err

    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
    code, _, err = _run(["--workdir", str(empty), "--images", os.path.join(images, "*.png"), "--out", out], capsys)
    assert code == 1 and str(empty) in err and "no checkpoints" in err and "--checkpoint" in err

    # Checkpoints of other models: an ImageNet encoder without a trained decoder, a 7-class
    # model, and a run whose config.json no longer describes its checkpoint.
    enc, seven = tmp_path / "encoder", tmp_path / "seven"
    from pipa_jax.models import default_model_config
    arch = default_model_config().keys()
    model_config = {k: v for k, v in evaluate.load_run_config(workdir).model.to_dict().items() if k in arch}
    for d, num_classes, which in ((enc, 19, "imagenet_encoder"), (seven, 7, "student")):
        d.mkdir()   # the checks come before the weights are read: the JSON files suffice
        (d / "model_config.json").write_text(json.dumps(dict(model_config, num_classes=num_classes)))
        (d / "source.json").write_text(json.dumps({"input": "mit_b0.pth", "which": which}))
    code, _, err = _run(["--checkpoint", str(enc), "--images", os.path.join(images, "*.png"), "--out", out], capsys)
    assert code == 1 and str(enc) in err and "ImageNet" in err and "config.model.pretrained" in err
    code, _, err = _run(["--checkpoint", str(seven), "--images", os.path.join(images, "*.png"), "--out", out], capsys)
    assert code == 1 and str(seven) in err and "7-class" in err

    other = tmp_path / "other_run"
    other.mkdir()
    os.symlink(os.path.join(workdir, "checkpoints"), other / "checkpoints")
    conf = json.loads(open(os.path.join(workdir, "config.json")).read())
    conf["model"]["backbone"] = "mit_b1"
    (other / "config.json").write_text(json.dumps(conf))
    code, _, err = _run(["--workdir", str(other), "--images", os.path.join(images, "*.png"), "--out", out], capsys)
    assert code == 1 and os.path.join(str(other), "checkpoints", "3") in err and "--checkpoint" in err

    code, _, err = _run(["--images", os.path.join(images, "*.png"), "--out", out], capsys)
    assert code == 1 and "exactly one of --workdir" in err
    # A glob the shell expanded arrives as extra arguments.
    code, _, err = _run(["--workdir", workdir, "--images", "a.png", "b.png", "--out", out], capsys)
    assert code == 2 and "quote" in err
