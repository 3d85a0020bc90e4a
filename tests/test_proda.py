"""ProDA (docs/method.md §15): its head against an independent PyTorch reference written here from
the published architecture; its losses and prototype operations against NumPy / PyTorch
references (values and gradients); the stage configs and the errors for a missing stage-1
prerequisite; and every stage of a tiny synthetic run in order, resumable."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F

import jax
import jax.numpy as jnp
from flax import nnx

from pipa_jax import config as config_lib
from pipa_jax import convert
from pipa_jax.losses import proda as P
from pipa_jax.models import build_segmentor, proda_head
from pipa_jax.uda import ema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------- head parity

class RefSE(tnn.Module):
    def __init__(self, c, r=16):
        super().__init__()
        self.se = tnn.Sequential(tnn.Linear(c, c // r), tnn.ReLU(), tnn.Linear(c // r, c), tnn.Sigmoid())

    def forward(self, x):
        return x * self.se(x.mean(dim=(2, 3)))[:, :, None, None]


class RefProDAHead(tnn.Module):
    """Classifier_Module2 as the facts describe it: 1x1 + four dilated 3x3 branches (GN 32 + ReLU),
    concatenation, SE, 3x3 conv + GN (no ReLU), Dropout2d, 1x1 classifier without bias."""

    def __init__(self, cin=2048, classes=19, dropout=0.1):
        super().__init__()
        branches = [tnn.Sequential(tnn.Conv2d(cin, 256, 1, bias=True), tnn.GroupNorm(32, 256), tnn.ReLU())]
        for d in (6, 12, 18, 24):
            branches.append(tnn.Sequential(tnn.Conv2d(cin, 256, 3, padding=d, dilation=d, bias=True),
                                           tnn.GroupNorm(32, 256), tnn.ReLU()))
        self.conv2d_list = tnn.ModuleList(branches)
        self.bottleneck = tnn.Sequential(RefSE(1280), tnn.Conv2d(1280, 256, 3, padding=1, bias=True),
                                         tnn.GroupNorm(32, 256))
        self.head = tnn.Sequential(tnn.Dropout2d(dropout), tnn.Conv2d(256, classes, 1, bias=False))

    def forward(self, x):
        x = torch.cat([b(x) for b in self.conv2d_list], 1)
        x = self.bottleneck(x)
        feat = self.head[0](x)
        return {"feat": feat, "out": self.head[1](feat)}


def _randomised_reference(seed=0):
    torch.manual_seed(seed)
    ref = RefProDAHead().eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, tnn.GroupNorm):        # non-trivial affine parameters
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return ref


@pytest.mark.parametrize("hw", [(9, 9), (7, 12)])
def test_proda_head_matches_pytorch(hw):
    ref = _randomised_reference()
    head = proda_head.ProDAHead((256, 512, 1024, 2048), 19, rngs=nnx.Rngs(0))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    report = convert.load_torch_weights(head, {f"layer5.{k}": v for k, v in sd.items()}, prefix="layer5.")
    assert report.ok and len(report.loaded) == len(sd)
    x = np.random.default_rng(1).normal(size=(2, 2048) + hw).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x))
    logits, feat = head([jnp.asarray(x.transpose(0, 2, 3, 1))], return_fused=True)
    np.testing.assert_allclose(np.asarray(logits), want["out"].numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(feat), want["feat"].numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
    # Training mode: Dropout2d zeroes whole channels of the feature the classifier and the
    # prototypes both read.
    l2, f2 = head([jnp.asarray(x.transpose(0, 2, 3, 1))], train=True, rng=jax.random.key(0), return_fused=True)
    zero = np.all(np.asarray(f2) == 0, axis=(1, 2))
    assert 0 < zero.sum() < zero.size
    kept = ~zero
    np.testing.assert_allclose(np.asarray(f2)[:, 0, 0][kept] * 0.9, np.asarray(feat)[:, 0, 0][kept], rtol=1e-5,
                               atol=1e-5)


def test_proda_segmentor_keys_and_init():
    mc = config_lib.base_config().model
    mc.backbone, mc.decode_head, mc.pixel_head, mc.patch_head = "resnet14", "proda", False, False
    model = build_segmentor(mc)
    sd = convert.export_torch_state_dict(model)
    assert "layer5.bottleneck.0.se.0.weight" in sd and "layer5.head.1.weight" in sd
    assert "layer5.head.1.bias" not in sd and "conv1.weight" in sd
    # The official effective init: every conv N(0, 0.01), bottleneck conv bias 0, GN 1 / 0.
    for key in ("layer5.conv2d_list.0.0.weight", "layer5.conv2d_list.3.0.weight", "layer5.bottleneck.1.weight",
                "layer5.head.1.weight"):
        assert abs(sd[key].std() - 0.01) < 0.002, key
    assert np.all(sd["layer5.bottleneck.1.bias"] == 0)
    assert np.all(sd["layer5.conv2d_list.2.1.weight"] == 1) and np.all(sd["layer5.conv2d_list.2.1.bias"] == 0)
    x = jnp.zeros((1, 64, 64, 3))
    logits, f = model(x, return_features=True)
    assert logits.shape == (1, 9, 9, 19) and f["fused"].shape == (1, 9, 9, 256)


# ----------------------------------------------------------------------------- losses

def _np_softmax(z, axis=-1):
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _data(seed=0, b=2, h=5, w=6, k=4, d=8):
    rng = np.random.default_rng(seed)
    feat = rng.normal(size=(b, h, w, d)).astype(np.float32)
    protos = rng.normal(size=(k, d)).astype(np.float32)
    logits = rng.normal(size=(b, h, w, k)).astype(np.float32) * 2
    soft = _np_softmax(rng.normal(size=(b, h, w, k)) * 2).astype(np.float32)
    labels = rng.integers(0, k, size=(b, h, w)).astype(np.int32)
    return feat, protos, logits, soft, labels


def test_rectification_matches_numpy():
    feat, protos, _, soft, _ = _data()
    d = np.sqrt(((feat[..., None, :] - protos) ** 2).sum(-1))           # the naive [.., K, D] form
    np.testing.assert_allclose(np.asarray(P.prototype_distances(feat, protos)), d, rtol=1e-5, atol=1e-5)
    w = _np_softmax(-(d - d.min(-1, keepdims=True)) * 1.0)
    want = np.argmax(w * soft, -1)
    labels, rect = P.rectified_pseudo_labels(feat, protos, soft, temperature=1.0)
    np.testing.assert_array_equal(np.asarray(labels), want)
    np.testing.assert_allclose(np.asarray(rect).sum(-1), 1.0, rtol=1e-5)
    # The temperature multiplies the distance; a threshold ignores unsure pixels.
    labels_t, rect_t = P.rectified_pseudo_labels(feat, protos, soft, temperature=3.0, threshold=0.6)
    r = _np_softmax(-(d - d.min(-1, keepdims=True)) * 3.0) * soft
    r = r / r.sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(labels_t), np.where(r.max(-1) < 0.6, 255, r.argmax(-1)))


def _torch_rce(logits, labels):
    """The official RCE, written from the facts sheet in PyTorch (NCHW)."""
    pred = torch.clamp(F.softmax(logits, 1), 1e-7, 1.0)
    mask = (labels != 255).float()
    onehot = F.one_hot(labels * (labels != 255), logits.shape[1]).permute(0, 3, 1, 2).float()
    onehot = torch.clamp(onehot, 1e-4, 1.0)
    rce = -(torch.sum(pred * torch.log(onehot), 1) * mask).sum() / (mask.sum() + 1e-6)
    return rce


def _grad_pair(jax_fn, torch_fn, x):
    v, g = jax.value_and_grad(jax_fn)(jnp.asarray(x))
    t = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
    tv = torch_fn(t)
    tv.backward()
    return float(v), np.asarray(g), float(tv.detach()), t.grad.numpy().transpose(0, 2, 3, 1)


def test_symmetric_ce_and_regulariser_match_pytorch():
    _, _, logits, _, labels = _data(1)
    labels[0, 0, :3] = 255
    lt = torch.from_numpy(labels.astype(np.int64))
    v, g, tv, tg = _grad_pair(lambda z: P.reverse_cross_entropy(z, jnp.asarray(labels)),
                              lambda z: _torch_rce(z, lt), logits)
    np.testing.assert_allclose(v, tv, rtol=1e-5)
    np.testing.assert_allclose(g, tg, rtol=1e-4, atol=1e-7)
    # RCE = -log(1e-4) * (sum of the clamped probabilities off the label).
    p = np.clip(_np_softmax(logits.astype(np.float64)), 1e-7, 1)
    valid = labels != 255
    off = p.sum(-1) - np.take_along_axis(p, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(v, (9.210340371976184 * off)[valid].mean(), rtol=1e-5)
    v, g, tv, tg = _grad_pair(P.kl_regulariser, lambda z: -F.log_softmax(z, 1).mean(), logits)
    np.testing.assert_allclose(v, tv, rtol=1e-6)
    np.testing.assert_allclose(g, tg, rtol=1e-4, atol=1e-8)


def test_prototype_consistency_matches_pytorch():
    feat, protos, _, _, _ = _data(2)
    student = feat + np.random.default_rng(3).normal(size=feat.shape).astype(np.float32) * 0.5
    mask = np.ones(feat.shape[:3], bool)
    mask[1, 2:, :] = False
    pt = torch.tensor(protos, dtype=torch.float64)
    teacher_t = torch.tensor(feat, dtype=torch.float64)

    def torch_loss(s):                        # s: NCHW student features
        s = s.permute(0, 2, 3, 1)
        q = F.softmax(-torch.cdist(teacher_t.reshape(-1, 8), pt).reshape(*feat.shape[:3], -1), -1)
        log_s = F.log_softmax(-torch.cdist(s.reshape(-1, 8), pt).reshape(*feat.shape[:3], -1), -1)
        kl = F.kl_div(log_s, q, reduction="none")
        m = torch.from_numpy(mask)[..., None].expand_as(kl).double()
        return (kl * m).sum() / m.sum()       # the official mean over masked N*C*H*W elements

    v, g, tv, tg = _grad_pair(lambda s: P.prototype_consistency(jnp.asarray(feat), s, jnp.asarray(protos),
                                                                jnp.asarray(mask)), torch_loss, student)
    np.testing.assert_allclose(v, tv, rtol=1e-5)
    np.testing.assert_allclose(g, tg, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("bug", [False, True])
def test_distillation_matches_pytorch_kl_div(bug):
    _, _, logits, _, _ = _data(4)
    teacher = np.random.default_rng(5).normal(size=logits.shape).astype(np.float32)
    tt = torch.tensor(teacher.transpose(0, 3, 1, 2), dtype=torch.float64)

    def torch_kd(s):                          # the official step_distillation, with or without its bug
        student = F.softmax(s, 1) if bug else F.log_softmax(s, 1)
        return F.kl_div(student, F.softmax(tt, 1), reduction="sum") / s.numel()

    v, g, tv, tg = _grad_pair(lambda s: P.distillation_kl(s, jnp.asarray(teacher), reproduce_softmax_bug=bug),
                              torch_kd, logits)
    np.testing.assert_allclose(v, tv, rtol=1e-5)
    np.testing.assert_allclose(g, tg, rtol=1e-4, atol=1e-8)


def test_prototype_update_matches_a_numpy_loop():
    feat, protos, _, _, labels = _data(6, b=3, h=6, w=6, k=5)
    labels[1] = 2                              # one class covers an image
    labels[2, :, :] = np.where(np.arange(6)[None] < 1, 4, 0)   # class 4: 6 pixels (< 10) in image 2
    labels[0, 0, 0] = 255
    m = 0.3
    want = protos.astype(np.float64).copy()
    for b in range(3):
        for k in range(5):
            sel = labels[b] == k
            if sel.sum() >= 10:
                want[k] = (1 - m) * want[k] + m * feat[b][sel].mean(0)
    got = P.update_prototypes(jnp.asarray(protos), jnp.asarray(feat), jnp.asarray(labels), momentum=m, min_pixels=10)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_initial_prototypes_cumulative_mean_with_cap():
    from pipa_jax.proda import accumulate_prototypes
    rng = np.random.default_rng(7)
    protos, counts = np.zeros((3, 4), np.float32), np.zeros(3, np.int64)
    vectors = rng.normal(size=(8, 3, 4)).astype(np.float32)
    present = rng.random((8, 3)) < 0.7
    for v, p in zip(vectors, present):
        accumulate_prototypes(protos, counts, v, p, cap=3)
    for k in range(3):
        seq = vectors[present[:, k], k]
        want = np.zeros(4)
        for i, x in enumerate(seq):            # mean of the first 3, then weight 1/4 for each later one
            n = min(i, 3)
            want = (want * n + x) / (n + 1)
        np.testing.assert_allclose(protos[k], want, rtol=1e-5, atol=1e-6)
        assert counts[k] == len(seq)


def test_fixed_ema_momentum():
    assert float(ema.ema_alpha(0, 0.999, ramp=False)) == pytest.approx(0.999)
    assert float(ema.ema_alpha(0, 0.999)) == 0.0


# ----------------------------------------------------------------------------- configs and errors

def _config(name, arg=""):
    return config_lib.sibling_config(os.path.join(ROOT, "configs", name), name).get_config(arg)


@pytest.mark.parametrize("name", ["gta2cs_proda.py", "synthia2cs_proda.py"])
def test_stage_configs(name):
    w, s1, s2 = (_config(name, f"stage={s}") for s in ("warmup", "stage1", "stage2"))
    assert w.model.decode_head == "proda" and w.model.resnet.input_convention == "unit_rgb"
    assert w.model.resnet.frozen_bn_affine and not s1.model.resnet.frozen_bn_affine
    assert (w.optimizer.learning_rate, s1.optimizer.learning_rate, s2.optimizer.learning_rate) == (2.5e-4, 1e-4, 6e-4)
    assert s1.optimizer.head_lr_mult == 1.0 and not s1.optimizer.sgd_duplicate_updates
    assert s2.optimizer.head_lr_mult == 10.0 and s2.optimizer.sgd_duplicate_updates
    assert s1.uda.self_training and not s1.uda.class_mix and not s1.uda.ema_ramp and s1.uda.ema_alpha == 0.999
    assert not w.uda.self_training and not s2.uda.self_training
    assert s1.total_steps == 62412 and s1.optimizer.schedule_steps == 90000 and s1.batch_size == 4
    assert s1.proda.consist_weight == 10.0 and s1.proda.rce and s1.proda.temperature == 1.0
    assert s1.proda.regular_weight == (0.1 if name.startswith("gta") else 0.0)
    assert tuple(s1.data.crop_size) == (512, 896)
    assert not s2.proda.kd_softmax_bug and _config(name, "stage=stage2,kd_bug").proda.kd_softmax_bug
    with pytest.raises(ValueError, match="stage=stage4"):
        _config(name, "stage=stage4")


def test_missing_prerequisites_name_the_command(tmp_path):
    from pipa_jax.terms.proda import load_prototypes
    c = _config("synthetic_proda.py", "stage=stage1,tiny")
    with pytest.raises(ValueError, match=r"proda\.frozen_from.*python -m pipa_jax\.proda run"):
        config_lib.validate(c, 1)
    with pytest.raises(FileNotFoundError, match=r"python -m pipa_jax\.proda prototypes"):
        load_prototypes(str(tmp_path / "none.npz"), 19)
    from pipa_jax import proda
    with pytest.raises(FileNotFoundError, match=r"warm-up model.*python -m pipa_jax\.proda run"):
        proda.run_pipeline(lambda s: _config("synthetic_proda.py", f"stage={s},tiny"), str(tmp_path),
                           "configs/synthetic_proda.py", stages=("prototypes",))
    c = _config("synthetic_proda.py", "stage=stage1,tiny")
    c.proda.frozen_from = str(tmp_path / "warmup")
    from pipa_jax import train
    with pytest.raises(FileNotFoundError, match=r"config\.proda\.frozen_from.*pipa_jax\.proda run"):
        train.load_network(c.proda.frozen_from, "config.proda.frozen_from", c)
    bad = _config("synthetic_proda.py", "stage=stage1,tiny")
    bad.model.decode_head = "deeplabv2"
    bad.proda.frozen_from = "x"
    with pytest.raises(ValueError, match="decode_head"):
        config_lib.validate(bad, 1)


# ----------------------------------------------------------------------------- every stage, tiny

def test_all_stages_tiny_run_in_order_and_resume(tmp_path):
    """CI: the warm-up (adversarial), the prototype pass, stage 1 and stages 2-3 of the synthetic
    ProDA config in one workdir; a second call finds every stage done and trains nothing."""
    wd = tmp_path / "proda"
    cmd = [sys.executable, "-m", "pipa_jax.proda", "run", "--config", "configs/synthetic_proda.py:tiny",
           "--workdir", str(wd), "--config.compilation_cache_dir="]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("warmup", "stage1", "stage2", "stage3"):
        with open(wd / stage / "done.json") as f:
            assert json.load(f)["step"] == 2
        with open(wd / stage / "config.json") as f:
            assert json.load(f)["proda"]["stage"] == stage
    with open(wd / "stage1" / "config.json") as f:
        c1 = json.load(f)
    assert c1["init_from"] == str(wd / "warmup") and c1["proda"]["prototypes"] == str(wd / "prototypes.npz")
    with open(wd / "stage3" / "config.json") as f:
        assert json.load(f)["proda"]["frozen_from"] == str(wd / "stage2")
    with np.load(wd / "prototypes.npz") as f:
        assert f["prototypes"].shape == (19, 256) and f["counts"].sum() > 0
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stderr and "train_step_compiled" not in again.stderr
