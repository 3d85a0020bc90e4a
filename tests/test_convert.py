"""Official-format checkpoint files -> pipa_jax: full mmcv checkpoints, the convert CLI and
every bad input (truncated file, wrong architecture, wrong prefix, pickled code)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pipa_jax import convert, model_io
from pipa_jax.models import DAFormerHead, MixVisionTransformer, build_segmentor, default_model_config
from pipa_jax.tools import convert_checkpoint


def small_config(**kw):
    c = default_model_config()
    c.backbone = "mit_b0"
    c.embed_dim = 32
    c.pixel_proj_dim = 16
    c.patch_proj_dim = 8
    c.update(kw)
    return c


def tensors(d):
    return {k: torch.from_numpy(np.array(v)) for k, v in d.items()}


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A DAFormer+PiPa-style mmcv checkpoint: student, teacher, ImageNet copy, patch projector,
    PiPa's unused cls_head and BN counters, as the official trainer saves them."""
    student = build_segmentor(small_config(), seed=1)
    teacher = build_segmentor(small_config(patch_head=False), seed=2)
    sd = {}
    sd.update(convert.export_torch_state_dict(student, "model."))
    sd.update(convert.export_torch_state_dict(teacher, "ema_model."))
    sd.update(convert.export_torch_state_dict(student.backbone, "imnet_model.backbone."))
    sd["model.cls_head.0.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    sd["model.decode_head.fuse_layer.bottleneck.bn.num_batches_tracked"] = np.array(7)
    path = tmp_path_factory.mktemp("ckpt") / "pipa_b0.pth"
    torch.save({"meta": {"iter": 60000, "CLASSES": ["road"]}, "state_dict": tensors(sd),
                "optimizer": {}}, path)
    return str(path), student, teacher


def params_equal(a, b):
    la = jax.tree.leaves(nnx.state(a, nnx.Any(nnx.Param, nnx.BatchStat)))
    lb = jax.tree.leaves(nnx.state(b, nnx.Any(nnx.Param, nnx.BatchStat)))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_student_and_teacher_load_from_official_file(official_file):
    path, student, teacher = official_file
    s = build_segmentor(small_config(), seed=9)
    report = convert.load_torch_weights(s, path, prefix="model.")
    assert report.ok and params_equal(s, student)
    t = build_segmentor(small_config(patch_head=False), seed=9)
    assert convert.load_torch_weights(t, path, prefix="ema_model.").ok
    assert params_equal(t, teacher)
    enc = MixVisionTransformer("b0", rngs=nnx.Rngs(5))
    assert convert.load_torch_weights(enc, path, prefix="imnet_model.backbone.").ok
    assert params_equal(enc, student.backbone)


def test_convert_cli_round_trip(official_file, tmp_path):
    path, student, _ = official_file
    out = tmp_path / "converted"
    assert convert_checkpoint.convert_file(path, str(out))["loaded_tensors"] > 100
    restored = model_io.load_model(str(out))
    assert params_equal(restored, student)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32))
    np.testing.assert_array_equal(restored(x), student(x))
    teacher_dir = tmp_path / "teacher"
    convert_checkpoint.convert_file(path, str(teacher_dir), which="teacher")
    assert model_io.load_model_config(str(teacher_dir)).patch_head is False
    # A model directory written before scan_blocks became True / False / 'auto' stored a bool.
    cfg_path = teacher_dir / "model_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), scan_blocks=True)))
    assert model_io.load_model_config(str(teacher_dir)).scan_blocks is True


def test_imagenet_encoder_checkpoint(tmp_path):
    enc = MixVisionTransformer("b0", rngs=nnx.Rngs(3))
    sd = convert.export_torch_state_dict(enc)
    sd["head.weight"] = np.zeros((1000, 256), np.float32)  # ImageNet classifier: ignored
    path = tmp_path / "mit_b0.pth"
    torch.save(tensors(sd), path)
    target = MixVisionTransformer("b0", rngs=nnx.Rngs(4))
    assert convert.load_torch_weights(target, str(path)).ok and params_equal(target, enc)
    out = tmp_path / "pretrained"
    convert_checkpoint.convert_file(str(path), str(out))
    assert params_equal(model_io.load_model(str(out)).backbone, enc)


def test_truncated_file_is_a_clear_error(official_file, tmp_path):
    data = open(official_file[0], "rb").read()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.CheckpointError, match="truncated or corrupt") as e:
        convert.read_checkpoint(str(bad))
    assert "truncated.pth" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        convert.read_checkpoint(str(tmp_path / "nowhere.pth"))


def test_other_architecture_lists_keys_and_names_it(tmp_path):
    sd = convert.export_torch_state_dict(MixVisionTransformer("b0", rngs=nnx.Rngs(0)))
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_torch_weights(MixVisionTransformer("b2", rngs=nnx.Rngs(0)), sd)
    msg = str(e.value)
    assert "mit_b0" in msg and "shape mismatch" in msg and "missing" in msg
    assert "block1.2.attn.kv.bias" in msg  # b2 has 3 blocks in stage 1, b0 only 2


def test_wrong_prefix_and_non_strict(official_file):
    path, _, _ = official_file
    s = build_segmentor(small_config(), seed=0)
    with pytest.raises(convert.CheckpointError, match="nothing matched.*prefix"):
        convert.load_torch_weights(s, path, prefix="student.")
    # A DAFormer checkpoint has no PiPa heads: strict=False reports them and loads the rest.
    head_only = {k: v for k, v in convert.read_checkpoint(path).items() if "proj_head" not in k and not k.startswith("project.")}
    with pytest.warns(UserWarning, match="missing"):
        report = convert.load_torch_weights(s, head_only, prefix="model.", strict=False)
    assert report.missing and all("proj_head" in k or k.startswith("project.") for k in report.missing)
    report = convert.load_torch_weights(s, head_only, prefix="model.", allow_missing=("pixel_head", "patch_head"))
    assert report.ok and report.allowed_missing


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": convert.LoadReport([], [], [], [], [])}, path)
    with pytest.raises(convert.CheckpointError, match="weights_only"):
        convert.read_checkpoint(str(path))


def test_hrda_checkpoint_parts_and_the_converter(tmp_path):
    enc = MixVisionTransformer("b0", rngs=nnx.Rngs(0))
    head = DAFormerHead(enc.embed_dims, 19, 32, rngs=nnx.Rngs(1))
    att = DAFormerHead(enc.embed_dims, 19, 32, fusion="conv", rngs=nnx.Rngs(2))
    sd = {**convert.export_torch_state_dict(enc, "model.backbone."),
          **convert.export_torch_state_dict(head, "model.decode_head.head."),
          **convert.export_torch_state_dict(att, "model.decode_head.scale_attention.")}
    att2 = DAFormerHead(enc.embed_dims, 19, 32, fusion="conv", rngs=nnx.Rngs(3))
    assert convert.load_torch_weights(att2, sd, prefix="model.decode_head.scale_attention.").ok
    assert params_equal(att2, att)
    # The whole .pth converts into an HRDA model directory (tests/test_hrda.py checks every tensor).
    path = tmp_path / "hrda.pth"
    torch.save({"state_dict": tensors(sd)}, path)
    summary = convert_checkpoint.convert_file(str(path), str(tmp_path / "out"))
    assert summary["config"]["segmentor"] == "hrda" and summary["config"]["embed_dim"] == 32
    assert params_equal(model_io.load_model(str(tmp_path / "out")).decode_head.scale_attention, att)
