"""HRDA (docs/method.md §6) against an independent PyTorch reference written here from the
method's description: the training fusion with a fixed detail box (BatchNorm on batch
statistics), the sliding detail inference (running and batch statistics), both losses against
NumPy (values and gradients), official-layout checkpoints in and out, the target margins through
crop and flip, and the errors a user can run into."""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from pipa_jax import config as config_lib
from pipa_jax import convert, model_io
from pipa_jax.data.transforms import RandomCropFlip, ValidMargins
from pipa_jax.models import SegOutput, build_segmentor, default_model_config
from pipa_jax.models.hrda import HRDA, sample_crop_box
from pipa_jax.tools import convert_checkpoint
from test_head_parity import TDAFormerHead, randomize
from test_mit_parity import CASES, hf_model, hf_to_official

NUM_CLASSES = 19
EMBED = 16
HR_CROP = (32, 32)


def hrda_config(**kw):
    c = default_model_config()
    c.segmentor = "hrda"
    c.backbone = "mit_b0"
    c.embed_dim = EMBED
    c.dropout = 0.0            # deterministic training forward for the comparison
    c.drop_path_rate = 0.0
    c.pixel_head = False
    c.patch_head = False
    c.hrda.hr_crop_size = HR_CROP
    c.hrda.hr_slide_stride = (16, 16)
    c.update(kw)
    return c


class TorchHRDA(torch.nn.Module):
    """HRDA written from docs/method.md §6 on HF's SegformerModel and the tests' DAFormer head."""

    def __init__(self, seed=0):
        super().__init__()
        self.backbone = hf_model(CASES["b0"], seed=seed)
        dims = CASES["b0"].embed_dims
        self.head = randomize(TDAFormerHead(dims, NUM_CLASSES, EMBED, (1, 6, 12, 18)), seed + 1)
        self.att = randomize(TDAFormerHead(dims, NUM_CLASSES, EMBED, (), "conv"), seed + 2)
        for m in self.modules():
            if isinstance(m, torch.nn.Dropout2d):
                m.p = 0.0

    def official_state_dict(self):
        sd = {f"backbone.{k}": v for k, v in hf_to_official(self.backbone.state_dict()).items()}
        sd.update({f"decode_head.head.{k}": v for k, v in self.head.state_dict().items()})
        sd.update({f"decode_head.scale_attention.{k}": v for k, v in self.att.state_dict().items()})
        return sd

    def encode(self, x):
        return list(self.backbone(x, output_hidden_states=True).hidden_states)

    def forward_train(self, x, box):
        y, x0 = box
        hh, hw = HR_CROP
        lr = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        lr_feats = self.encode(lr)
        hr_feats = self.encode(x[:, :, y:y + hh, x0:x0 + hw])
        lr_seg = self.head(lr_feats)
        hr_seg = self.head(hr_feats)
        att = torch.sigmoid(self.att(lr_feats))
        mask = torch.zeros_like(att[:, :1])
        mask[:, :, y // 8:(y + hh) // 8, x0 // 8:(x0 + hw) // 8] = 1
        att = att * mask
        lr_seg = (1 - att) * lr_seg
        up_lr = F.interpolate(lr_seg, scale_factor=2, mode="bilinear", align_corners=False)
        up_att = F.interpolate(att, scale_factor=2, mode="bilinear", align_corners=False)
        inserted = torch.zeros_like(up_lr)
        inserted[:, :, y // 4:(y + hh) // 4, x0 // 4:(x0 + hw) // 4] = hr_seg
        return up_att * inserted + up_lr, lr_seg, hr_seg, att

    def infer(self, x):
        b, _, h, w = x.shape
        hh, hw = HR_CROP
        sh, sw = 16, 16
        lr_feats = self.encode(F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False))
        lr_seg = self.head(lr_feats)
        crops, boxes = [], []
        for r in range(max(h - hh + sh - 1, 0) // sh + 1):
            for q in range(max(w - hw + sw - 1, 0) // sw + 1):
                y2, x2 = min(r * sh + hh, h), min(q * sw + hw, w)
                y1, x1 = max(y2 - hh, 0), max(x2 - hw, 0)
                crops.append(x[:, :, y1:y2, x1:x2])
                boxes.append((y1 // 4, y2 // 4, x1 // 4, x2 // 4))
        logits = self.head(self.encode(torch.cat(crops)))    # every window in one batch
        hr = torch.zeros((b, NUM_CLASSES, h // 4, w // 4))
        count = torch.zeros((b, 1, h // 4, w // 4))
        for i, (y1, y2, x1, x2) in enumerate(boxes):
            hr[:, :, y1:y2, x1:x2] += logits[i * b:(i + 1) * b]
            count[:, :, y1:y2, x1:x2] += 1
        hr = hr / count
        att = torch.sigmoid(self.att(lr_feats))
        fused = (F.interpolate(att, scale_factor=2, mode="bilinear", align_corners=False) * hr
                 + F.interpolate((1 - att) * lr_seg, scale_factor=2, mode="bilinear", align_corners=False))
        return F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def pair():
    ref = TorchHRDA()
    ours = build_segmentor(hrda_config(), seed=3)
    report = convert.load_torch_weights(ours, ref.official_state_dict())
    assert report.ok, report.summary()
    return ref, ours


def nchw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def assert_close_nhwc(ours, ref, atol=1e-4):
    np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy().transpose(0, 2, 3, 1), atol=atol, rtol=1e-4)


def bn_stats(model):
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}


def test_training_fusion_matches_pytorch(pair):
    ref, ours = pair
    ref = copy.deepcopy(ref)      # its BatchNorm statistics change here; the fixture's must not
    x = np.random.default_rng(0).normal(size=(2, 64, 96, 3)).astype(np.float32)
    model = nnx.clone(ours)
    out = model.forward_train(jnp.asarray(x), rng=jax.random.key(5))
    box = tuple(int(v) for v in out.extras["crop_box"])
    assert box[0] % 8 == 0 and box[1] % 8 == 0 and box != (0, 0)
    ref.train()
    fused, lr, hr, att = ref.forward_train(nchw(x), box)
    assert_close_nhwc(out.logits, fused)
    assert_close_nhwc(out.extras["lr_weighted"], lr)
    assert_close_nhwc(out.extras["hr_logits"], hr)
    assert_close_nhwc(out.extras["attention"], att, atol=1e-5)
    # BatchNorm running statistics: head on the context, head on the detail, then the attention,
    # each with PyTorch's momentum update (the context and detail passes both update the head).
    stats = bn_stats(model)
    t = ref.head.fuse_layer.bottleneck.bn
    np.testing.assert_allclose(stats[("decode_head", "head", "fuse_layer", "bottleneck", "bn", "mean")],
                               t.running_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(stats[("decode_head", "head", "fuse_layer", "bottleneck", "bn", "var")],
                               t.running_var.numpy(), rtol=1e-4, atol=1e-5)
    a = ref.att.fuse_layer.bn
    np.testing.assert_allclose(stats[("decode_head", "scale_attention", "fuse_layer", "bn", "var")],
                               a.running_var.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_stats", [False, True])
def test_slide_inference_matches_pytorch(pair, batch_stats):
    """Eval mode (running statistics) and the teacher's mode (batch statistics over all windows)."""
    ref, ours = pair
    x = np.random.default_rng(1).normal(size=(2, 64, 96, 3)).astype(np.float32)
    ref.train(batch_stats)
    with torch.no_grad():
        expected = ref.infer(nchw(x))
    got = nnx.clone(ours).infer_logits(jnp.asarray(x), use_running_average=not batch_stats)
    assert got.shape == (2, 64, 96, NUM_CLASSES)
    assert_close_nhwc(got, expected)


def interp_weights(n_out, n_in):
    """[n_out, n_in] float64 weights of PyTorch's bilinear resize along one axis (half-pixel
    centres, negative source coordinates clamped to 0, no antialias), written per output pixel."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(np.floor(src)), n_in - 1)
        frac = src - lo
        m[i, lo] += 1 - frac
        m[i, min(lo + 1, n_in - 1)] += frac
    return m


def np_resize(x, size):
    """[B, h, w, C] -> [B, H, W, C]: the separable resize with interp_weights."""
    return np.einsum("Hh,Ww,bhwc->bHWc", interp_weights(size[0], x.shape[1]), interp_weights(size[1], x.shape[2]), x)


def np_resize_transpose(g, in_hw):
    """The resize is linear; its transpose maps a gradient at the output back to the input."""
    return np.einsum("Hh,Ww,bHWc->bhwc", interp_weights(g.shape[1], in_hw[0]), interp_weights(g.shape[2], in_hw[1]), g)


def np_ce(logits, labels, weight):
    """mmseg mean CE and its gradient w.r.t. the logits (both at the labels' size)."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    valid = labels != 255
    safe = np.where(valid, labels, 0)
    w = np.where(valid, weight, 0.0)
    nll = -np.log(np.take_along_axis(p, safe[..., None], -1)[..., 0])
    grad = (p - np.eye(logits.shape[-1])[safe]) * (w / labels.size)[..., None]
    return (nll * w).sum() / labels.size, grad


def test_losses_match_numpy():
    """0.9 CE(fused upsampled, y, w) + 0.1 CE(detail upsampled, crop(y), crop(w)): values and the
    gradients w.r.t. the fused and the detail logits (through the transposed upsampling)."""
    model = nnx.eval_shape(lambda: build_segmentor(hrda_config()))
    rng = np.random.default_rng(2)
    fused = rng.normal(size=(2, 16, 24, NUM_CLASSES)).astype(np.float32)
    hr = rng.normal(size=(2, 8, 8, NUM_CLASSES)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(2, 64, 96))
    labels[rng.random(labels.shape) < 0.2] = 255
    weight = rng.random(labels.shape).astype(np.float32)
    box = np.array([16, 40], np.int32)

    def loss(fused, hr):
        out = SegOutput(logits=fused, features=(), feature_input=jnp.zeros(()), decoder_features=jnp.zeros(()),
                        extras={"hr_logits": hr, "crop_box": jnp.asarray(box)})
        return model.supervised_loss(out, jnp.asarray(labels), jnp.asarray(weight))

    value, (g_fused, g_hr) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(fused), jnp.asarray(hr))
    crop = (slice(None), slice(16, 48), slice(40, 72))
    v_f, d_f = np_ce(np_resize(fused.astype(np.float64), (64, 96)), labels, weight)
    v_h, d_h = np_ce(np_resize(hr.astype(np.float64), HR_CROP), labels[crop], weight[crop])
    np.testing.assert_allclose(float(value), 0.9 * v_f + 0.1 * v_h, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_fused), 0.9 * np_resize_transpose(d_f, (16, 24)), atol=1e-7, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(g_hr), 0.1 * np_resize_transpose(d_h, (8, 8)), atol=1e-7, rtol=1e-4)


def test_crop_box_rule():
    """Offsets are randint(0, (margin + 1) // 8) * 8: a 512 crop in 1024 never starts at 512."""
    boxes = np.stack([np.asarray(sample_crop_box(jax.random.key(i), (1024, 1024), (512, 512), 8))
                      for i in range(400)])
    assert set(np.unique(boxes)) <= set(range(0, 505, 8)) and boxes.max() == 504 and boxes.min() == 0
    assert np.asarray(sample_crop_box(jax.random.key(0), (512, 512), (512, 512), 8)).tolist() == [0, 0]


def official_hrda_file(tmp_path, pipa_extras=True):
    """An HRDA / PiPa-HRDA mmcv-style checkpoint written from pipa_jax modules (official layout)."""
    student = build_segmentor(hrda_config(pixel_head=True, pixel_proj_dim=8), seed=1)
    teacher = build_segmentor(hrda_config(), seed=2)
    sd = dict(convert.export_torch_state_dict(student, "model."))
    sd.update(convert.export_torch_state_dict(teacher, "ema_model."))
    sd.update(convert.export_torch_state_dict(student.backbone, "imnet_model.backbone."))
    if pipa_extras:  # PiPa-HRDA's training-only parts: cls_head, the CAC projector on 19 logits
        sd["model.cls_head.0.weight"] = np.zeros((8, 480, 3, 3), np.float32)
        sd["project.0.weight"] = np.zeros((19, 19, 1, 1), np.float32)
        sd["project.2.weight"] = np.zeros((128, 19, 1, 1), np.float32)
        sd["classifier.weight"] = np.zeros((19, 19, 1, 1), np.float32)
    path = tmp_path / "hrda.npz"
    np.savez(path, **sd)
    return str(path), student, sd


def test_checkpoint_round_trip_and_converter(tmp_path):
    path, student, sd = official_hrda_file(tmp_path)
    keys = set(k for k in sd if k.startswith("model.decode_head."))
    assert "model.decode_head.conv_seg.weight" not in keys
    assert {"model.decode_head.head.conv_seg.weight", "model.decode_head.scale_attention.conv_seg.weight",
            "model.decode_head.scale_attention.fuse_layer.conv.weight"} <= keys
    model = build_segmentor(hrda_config(pixel_head=True, pixel_proj_dim=8), seed=7)
    report = convert.load_torch_weights(model, path, prefix="model.")
    assert report.ok, report.summary()
    assert report.skipped == ["classifier.weight", "model.cls_head.0.weight", "project.0.weight", "project.2.weight"]
    exported = convert.export_torch_state_dict(model, "model.")
    assert set(exported) == {k for k in sd if k.startswith("model.") and "cls_head" not in k}
    for k, v in exported.items():
        np.testing.assert_array_equal(v, sd[k])
    # The converter detects HRDA and writes a model directory that evaluation can load.
    out = tmp_path / "converted"
    summary = convert_checkpoint.convert_file(path, str(out))
    assert summary["config"]["segmentor"] == "hrda" and summary["config"]["pixel_head"]
    assert not summary["config"]["patch_head"]          # PiPa-HRDA's projector reads logits, not ours
    assert "project.2.weight" in summary["skipped_training_only"]
    assert json.loads((out / "model_config.json").read_text())["hrda"]["hr_crop_size"] == [512, 512]
    loaded = model_io.load_model(str(out))
    assert isinstance(loaded, HRDA)
    la = jax.tree.leaves(nnx.state(loaded, nnx.Param))
    lb = jax.tree.leaves(nnx.state(student, nnx.Param))
    assert all(np.array_equal(a, b) for a, b in zip(la, lb))


def test_bad_hrda_checkpoints_are_clear_errors(tmp_path):
    path, _, sd = official_hrda_file(tmp_path, pipa_extras=False)
    bad = dict(sd)
    bad["model.decode_head.scale_attention.conv_seg.weight"] = np.zeros((7, EMBED, 1, 1), np.float32)
    del bad["model.decode_head.head.fuse_layer.bottleneck.conv.weight"]
    model = build_segmentor(hrda_config(), seed=0)
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_torch_weights(model, bad, prefix="model.")
    msg = str(e.value)
    assert "model.decode_head.head.fuse_layer.bottleneck.conv.weight" in msg and "missing" in msg
    assert "scale_attention.conv_seg.weight: (7, 16, 1, 1) -> expected (1, 1, 16, 19)" in msg
    assert "HRDA" in msg
    # A single-scale checkpoint given to the HRDA model says what it holds.
    ed = build_segmentor(hrda_config(segmentor="encoder_decoder"), seed=0)
    with pytest.raises(convert.CheckpointError, match=r"mit_b0 \+ daformer head"):
        convert.load_torch_weights(model, convert.export_torch_state_dict(ed, "model."), prefix="model.")


def test_bad_hrda_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"crop_coord_divisible = 4: .* multiple of 8"):
        build_segmentor(hrda_config(hrda={**default_model_config().hrda.to_dict(), "crop_coord_divisible": 4}))
    with pytest.raises(ValueError, match=r"hr_crop_size = \(36, 36\): .* multiples of 8"):
        build_segmentor(hrda_config(hrda={**default_model_config().hrda.to_dict(), "hr_crop_size": (36, 36)}))
    with pytest.raises(ValueError, match="context_scale"):
        build_segmentor(hrda_config(hrda={**default_model_config().hrda.to_dict(), "context_scale": 0.3}))
    model = nnx.eval_shape(lambda: build_segmentor(hrda_config()))
    with pytest.raises(ValueError, match=r"detail crop 32x32 .* larger than the 24x64 input"):
        model.forward_train(jnp.zeros((1, 24, 64, 3)), rng=jax.random.key(0))
    # In a run config: the detail crop must fit the training crop, the test windows and the patch crops.
    c = config_lib.base_config()
    c.model.segmentor = "hrda"
    c.data.crop_size = (384, 384)
    with pytest.raises(ValueError, match=r"model.hrda.hr_crop_size = \(512, 512\): expected no larger than the "
                                         r"training crop data.crop_size \(384, 384\)"):
        config_lib.validate(c, 1)


def test_target_margins_follow_crop_and_flip():
    """The valid mask of HRDA's margins is made on the whole frame, then cropped and flipped with
    the image: a pixel's validity depends on where it was in the frame."""
    h, w = 40, 60
    yy, xx = np.mgrid[:h, :w]
    ex = {"image": np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.uint8), "label": np.zeros((h, w), np.uint8)}
    ex = ValidMargins((3, 8, 2, 5))(ex)
    crop = RandomCropFlip((24, 32), flip=True)
    flips = set()
    for seed in range(20):
        out = crop(ex, np.random.default_rng(seed))
        y, x = out["image"][..., 0].astype(int), out["image"][..., 1].astype(int)
        expected = (y >= 3) & (y < h - 8) & (x >= 2) & (x < w - 5)
        np.testing.assert_array_equal(out["valid"].astype(bool), expected)
        flips.add(bool(x[0, 0] > x[0, -1]))
    assert flips == {True, False}
    with pytest.raises(ValueError, match="target_valid_margins"):
        ValidMargins((30, 240, 30))
