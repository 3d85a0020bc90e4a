"""DeepLabV2 (dilated Caffe ResNet + the DACS classifier) against an independent PyTorch reference
written here from the published architecture (docs/method.md §10): same weights and BatchNorm
statistics, eval and train mode, an even and an odd input size, <= 1e-4 in float32. Also: the
output-stride sizes, the key names of the official files, and clear errors for checkpoints of
another depth or family."""
import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F

import jax
import jax.numpy as jnp
from flax import nnx

from pipa_jax import convert, labels
from pipa_jax.terms import base as terms_base
from pipa_jax.models import build_segmentor, default_model_config, resnet

CAFFE_MEAN = np.array((104.00698793, 116.66876762, 122.67891434), np.float32)


# ----------------------------------------------------------------------------- the reference

class RefBottleneck(tnn.Module):
    """Caffe bottleneck: stride on the first 1x1, 3x3 with padding = dilation."""

    def __init__(self, cin, width, stride, dilation, downsample):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, width, 1, stride=stride, bias=False)
        self.bn1 = tnn.BatchNorm2d(width)
        self.conv2 = tnn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = tnn.BatchNorm2d(width)
        self.conv3 = tnn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(width * 4)
        self.downsample = (tnn.Sequential(tnn.Conv2d(cin, width * 4, 1, stride=stride, bias=False),
                                          tnn.BatchNorm2d(width * 4)) if downsample else None)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class RefClassifier(tnn.Module):
    def __init__(self, cin, classes, branches):
        super().__init__()
        self.conv2d_list = tnn.ModuleList([tnn.Conv2d(cin, classes, 3, padding=d, dilation=d, bias=True)
                                           for d in (6, 12, 18, 24)])
        self.branches = branches

    def forward(self, x):
        out = self.conv2d_list[0](x)
        for i in range(1, self.branches):      # branches=2 is the official early return
            out = out + self.conv2d_list[i](x)
        return out


class RefDeepLabV2(tnn.Module):
    def __init__(self, blocks, classes=19, branches=2):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.maxpool = tnn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        cin = 64
        for s, (n, width, stride, dil) in enumerate(zip(blocks, (64, 128, 256, 512), (1, 2, 1, 1), (1, 1, 2, 4))):
            layer = []
            for i in range(n):
                layer.append(RefBottleneck(cin, width, stride if i == 0 else 1, dil, i == 0))
                cin = width * 4
            setattr(self, f"layer{s + 1}", tnn.Sequential(*layer))
        self.layer5 = RefClassifier(2048, classes, branches)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.layer5(x)


def randomised(ref, seed=0):
    """Random weights and BatchNorm statistics / affine parameters, so that every tensor matters.

    The BNs before a ReLU get biases near +0.5: with biases near 0 some channels are almost dead,
    their batch variance is ~0, and train-mode BN then amplifies float32 rounding in any
    implementation (measured: PyTorch float32 against float64 differed by 2e-4 there, 4e-5 so)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("bn1.bias", "bn2.bias")):
                t.copy_(0.5 + 0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith(("running_mean", "bn3.bias", "downsample.1.bias")):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif ".bn" in name or name.startswith("bn") or "downsample.1" in name:
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            else:  # convs: He-like scale keeps activations O(1) through 100 layers
                fan_in = t[0].numel() if t.ndim > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) * (0.5 / fan_in) ** 0.5 if t.ndim > 1
                        else 0.1 * torch.randn(t.shape, generator=g))
    return ref


_BUILT = {}


def ours(depth, branches=2, num_classes=19):
    """A fresh copy of our DeepLabV2 (built once per kind: eager initialisation of a ResNet takes
    10-20 s on this CPU, a copy none)."""
    key = (depth, branches, num_classes)
    if key not in _BUILT:
        c = default_model_config()
        c.backbone, c.decode_head = f"resnet{depth}", "deeplabv2"
        c.pixel_head = c.patch_head = False
        c.deeplabv2.branches = branches
        c.num_classes = num_classes
        _BUILT[key] = build_segmentor(c)
    return nnx.clone(_BUILT[key])


def images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def torch_input(img):
    """The official input: BGR minus the Caffe mean, no std, NCHW."""
    return torch.from_numpy(np.ascontiguousarray((img[..., ::-1].astype(np.float32) - CAFFE_MEAN).transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def r50_pair():
    ref = randomised(RefDeepLabV2((3, 4, 6, 3)))
    model = ours(50)
    report = convert.load_torch_weights(model, ref.state_dict())
    assert report.ok and not report.missing
    return ref, model


@pytest.mark.parametrize("hw", [(65, 97), (96, 64)])
def test_eval_mode_matches_pytorch(r50_pair, hw):
    ref, model = r50_pair
    img = images(2, *hw)
    ref.eval()
    with torch.no_grad():
        want = ref(torch_input(img)).numpy().transpose(0, 2, 3, 1)
        want_up = F.interpolate(ref(torch_input(img)), size=hw, mode="bilinear",
                                align_corners=True).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(model(labels.normalize(img), train=False))
    assert got.shape == want.shape == (2, resnet.output_size(hw[0]), resnet.output_size(hw[1]), 19)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # Logits upsampled with align_corners=True semantics, as the official code.
    np.testing.assert_allclose(np.asarray(model.infer_logits(labels.normalize(img))), want_up, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hw", [(65, 97), (96, 64)])
def test_train_mode_matches_pytorch_with_running_statistics(hw):
    ref = randomised(RefDeepLabV2((3, 4, 6, 3)), seed=1)
    model = ours(50)
    convert.load_torch_weights(model, ref.state_dict())
    img = images(2, *hw, seed=2)
    ref.train()
    with torch.no_grad():
        want = ref(torch_input(img)).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(model(labels.normalize(img), train=True))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # The running statistics moved as PyTorch's (momentum 0.1, unbiased variance).
    after = convert.export_torch_state_dict(model)
    for key in ("bn1.running_mean", "bn1.running_var", "layer3.5.bn2.running_var", "layer2.0.downsample.1.running_mean"):
        np.testing.assert_allclose(after[key], ref.state_dict()[key].numpy(), atol=1e-5, rtol=1e-4)


def test_resnet101_and_the_four_branch_sum_match_pytorch():
    ref = randomised(RefDeepLabV2((3, 4, 23, 3), branches=4), seed=3).eval()
    model = ours(101, branches=4)
    convert.load_torch_weights(model, ref.state_dict())
    img = images(1, 33, 41, seed=4)
    with torch.no_grad():
        want = ref(torch_input(img)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(model(labels.normalize(img))), want, atol=1e-4, rtol=1e-4)


def test_official_two_branch_forward_ignores_the_last_two_convs():
    model = ours(50, branches=2)
    x = labels.normalize(images(1, 40, 40))
    before = np.asarray(model(x))
    for conv in list(model.decode_head.conv2d_list)[2:]:
        conv.kernel[...] = conv.kernel[...] * 5.0
    np.testing.assert_array_equal(np.asarray(model(x)), before)


@pytest.mark.parametrize("n, out", [(512, 65), (720, 91), (896, 113), (1024, 129), (1280, 161), (2048, 257)])
def test_output_stride_sizes(n, out):
    """The official DeepLabV2 logit sizes (7x7/2 conv, ceil-mode pool, stride-2 layer2)."""
    assert resnet.output_size(n) == out
    # The network's own shapes, without running it.
    model = ours(50)
    shape = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, n, 64, 3), jnp.float32)).shape
    assert shape == (1, out, 9, 19)


def test_ceil_mode_pool_matches_pytorch():
    x = np.random.default_rng(0).normal(size=(1, 4, 9, 14)).astype(np.float32)
    want = F.max_pool2d(torch.from_numpy(x), 3, 2, 1, ceil_mode=True).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(resnet.max_pool_ceil(jnp.asarray(x.transpose(0, 2, 3, 1)))), want)


def test_official_key_names_and_round_trip():
    model = ours(101)
    sd = convert.export_torch_state_dict(model)
    ref_keys = {k for k in RefDeepLabV2((3, 4, 23, 3)).state_dict() if not k.endswith("num_batches_tracked")}
    assert set(sd) == ref_keys
    assert {"conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer3.22.conv3.weight",
            "layer5.conv2d_list.3.bias"} <= set(sd)
    other = ours(101)
    nnx.update(other, jax.tree.map(lambda a: a + 1.0, nnx.state(other)))   # differ everywhere first
    assert not np.array_equal(np.asarray(other.backbone.conv1.kernel[...]), np.asarray(model.backbone.conv1.kernel[...]))
    convert.load_torch_weights(other, sd)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(other))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_backbone_loads_coco_or_torchvision_files_skipping_their_classifiers():
    """The DACS COCO init carries a COCO-class layer5; torchvision's ImageNet file an fc: loading
    either into the backbone alone skips them (and says nothing is missing)."""
    sd = convert.export_torch_state_dict(ours(50).backbone)
    coco = dict(sd, **{f"layer5.conv2d_list.{k}.weight": np.zeros((21, 2048, 3, 3), np.float32) for k in range(4)})
    tv = dict(sd, **{"fc.weight": np.zeros((1000, 2048), np.float32), "fc.bias": np.zeros((1000,), np.float32)})
    for ckpt in (coco, tv):
        report = convert.load_torch_weights(ours(50).backbone, ckpt)
        assert report.ok and len(report.loaded) == len(sd)


def test_dacs_training_checkpoint_layout():
    """DACS saves {'model', 'ema_model', 'optimizer', ...}: read as model. / ema_model."""
    student, teacher = ours(50), ours(50)
    ckpt = {"model": convert.export_torch_state_dict(student), "ema_model": convert.export_torch_state_dict(teacher),
            "optimizer": {"state": {}}, "iteration": 5}
    flat = convert.read_checkpoint({k: v for k, v in ckpt.items() if k in ("model", "ema_model")})
    assert "model.layer5.conv2d_list.0.weight" in flat and "ema_model.conv1.weight" in flat
    assert convert.load_torch_weights(ours(50), flat, prefix="ema_model.").ok


def test_wrong_depth_and_wrong_family_say_what_the_file_holds():
    r50 = convert.export_torch_state_dict(ours(50))
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_torch_weights(ours(101), r50)
    msg = str(e.value)
    assert "resnet50 (bottlenecks per stage (3, 4, 6, 3))" in msg
    assert "resnet101: bottlenecks per stage (3, 4, 23, 3)" in msg and "missing" in msg
    c = default_model_config()
    c.backbone, c.embed_dim, c.pixel_head, c.patch_head = "mit_b0", 32, False, False
    mit = convert.export_torch_state_dict(build_segmentor(c))
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_torch_weights(ours(50), mit)
    msg = str(e.value)
    assert "mit_b0 + daformer head" in msg and "resnet50" in msg and "nothing matched" in msg


def test_training_gradients_match_pytorch():
    """The supervised loss of a train-mode forward (batch statistics), upsampled with
    align_corners=True and averaged over labelled pixels (DACS's source CE), and its gradients:
    the stem conv, a dilated block, a shortcut and the classifier. Backbone gradients through
    train-mode BN of a batch of 2 small maps are ill-conditioned (measured: PyTorch float32 is ~1 %
    of the largest gradient away from float64), so the reference is PyTorch in float64 and the test
    asks for PyTorch float32's own accuracy (within 2x of its error, or 1e-6 of the scale)."""
    import copy
    ref = randomised(RefDeepLabV2((3, 4, 6, 3)), seed=6).train()
    model = ours(50)
    convert.load_torch_weights(model, ref.state_dict())
    img = images(2, 64, 72, seed=7)
    lab = np.random.default_rng(8).integers(0, 19, (2, 64, 72)).astype(np.int32)
    lab[:, :5] = 255
    want = {}
    for dt in (torch.float32, torch.float64):
        r = copy.deepcopy(ref).to(dt)
        logits = F.interpolate(r(torch_input(img).to(dt)), size=(64, 72), mode="bilinear", align_corners=True)
        value = F.cross_entropy(logits, torch.from_numpy(lab).long(), ignore_index=255)
        value.backward()
        want[dt] = (value.item(), {k: p.grad.double().numpy() for k, p in r.named_parameters() if p.grad is not None})

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, r):
        m = terms_base.merge(graphdef, p, r)   # the train step's merge (fresh Variables in this trace)
        out = m.forward_train(labels.normalize(img), rng=jax.random.key(0))
        return m.supervised_loss(out, jnp.asarray(lab), average="valid")
    value, grads = jax.value_and_grad(loss)(params, rest)
    np.testing.assert_allclose(float(value), want[torch.float64][0], rtol=1e-5)
    got = convert.export_torch_state_dict(nnx.merge(graphdef, grads, rest))
    for key in ("conv1.weight", "layer3.2.conv2.weight", "layer1.0.downsample.0.weight", "layer5.conv2d_list.1.weight",
                "layer5.conv2d_list.0.bias"):
        exact, torch32 = want[torch.float64][1][key], want[torch.float32][1][key]
        scale = np.abs(exact).max()
        bound = max(2 * np.abs(torch32 - exact).max(), 1e-6 * scale)
        assert np.abs(got[key] - exact).max() <= bound, (key, np.abs(got[key] - exact).max(), bound, scale)
    # The branches the official forward skips get no gradient.
    assert not np.any(got["layer5.conv2d_list.3.weight"])


def test_convert_checkpoint_tool_on_a_dacs_file(tmp_path):
    """A DACS training checkpoint (.pth with 'model' / 'ema_model') -> a model directory ->
    model_io.load_model: the teacher's logits come back."""
    from pipa_jax import model_io
    from pipa_jax.tools import convert_checkpoint
    student, teacher = ours(50), ours(50)
    for conv in teacher.decode_head.conv2d_list:              # tell the two apart
        conv.bias[...] = conv.bias[...] + 1.0
    to_t = lambda sd: {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    path = tmp_path / "dacs.pth"
    torch.save({"iteration": 10, "model": to_t(convert.export_torch_state_dict(student)),
                "ema_model": to_t(convert.export_torch_state_dict(teacher))}, path)
    summary = convert_checkpoint.convert_file(str(path), str(tmp_path / "ckpt"), which="teacher")
    assert summary["config"]["backbone"] == "resnet50" and summary["config"]["decode_head"] == "deeplabv2"
    assert summary["prefix"] == "ema_model." and summary["input_convention"] == "caffe_bgr"
    loaded = model_io.load_model(str(tmp_path / "ckpt"))
    x = labels.normalize(images(1, 40, 48))
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(teacher(x)), atol=1e-5)
