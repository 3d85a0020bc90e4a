"""Decoder and PiPa-head parity against small, independent PyTorch references written from
docs/method.md §2.2-2.3 with the official mmseg key names (no installable reference exists)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from pipa_jax.convert import load_torch_weights
from pipa_jax.models.heads import DAFormerHead, PatchProjectionHead, PixelProjectionHead, SegFormerHead
from pipa_jax.models.layers import ComputeForms

IN_CH = (8, 16, 24, 32)
SIZES = ((16, 20), (8, 10), (4, 5), (2, 3))  # strides 4, 8, 16, 32 of a 64x80 image


class TConvModule(nn.Module):
    def __init__(self, cin, cout, k, dilation=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class TSepConv(nn.Module):
    def __init__(self, cin, cout, d):
        super().__init__()
        self.depthwise_conv = TConvModule(cin, cin, 3, dilation=d, groups=cin)
        self.pointwise_conv = TConvModule(cin, cout, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class TASPP(nn.Module):
    def __init__(self, cin, ch, dilations):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            [TConvModule(cin, ch, 1) if d == 1 else TSepConv(cin, ch, d) for d in dilations])
        self.bottleneck = TConvModule(len(dilations) * ch, ch, 3)

    def forward(self, x):
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], 1))


class TMLP(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Linear(cin, cout)

    def forward(self, x):  # NCHW -> tokens -> NCHW
        n, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, -1, h, w)


class TDAFormerHead(nn.Module):
    def __init__(self, in_ch, num_classes, embed, dilations, fusion="aspp"):
        super().__init__()
        self.embed_layers = nn.ModuleDict({str(i): TMLP(c, embed) for i, c in enumerate(in_ch)})
        cat = embed * len(in_ch)
        self.fuse_layer = TASPP(cat, embed, dilations) if fusion == "aspp" else TConvModule(cat, embed, 1)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(embed, num_classes, 1)

    def forward(self, feats):
        size = feats[0].shape[2:]
        x = [F.interpolate(self.embed_layers[str(i)](f), size=size, mode="bilinear", align_corners=False)
             for i, f in enumerate(feats)]
        return self.conv_seg(self.dropout(self.fuse_layer(torch.cat(x, 1))))


class TSegFormerHead(nn.Module):
    def __init__(self, in_ch, num_classes, embed):
        super().__init__()
        self.linear_c = nn.ModuleDict({str(i): TMLP(c, embed) for i, c in enumerate(in_ch)})
        self.linear_fuse = TConvModule(embed * len(in_ch), embed, 1)
        self.conv_seg = nn.Conv2d(embed, num_classes, 1)  # built by mmseg's base head, unused
        self.dropout = nn.Dropout2d(0.1)
        self.linear_pred = nn.Conv2d(embed, num_classes, 1)

    def forward(self, feats):
        size = feats[0].shape[2:]
        x = [F.interpolate(self.linear_c[str(i)](f), size=size, mode="bilinear", align_corners=False)
             for i, f in enumerate(feats)]
        return self.linear_pred(self.dropout(self.linear_fuse(torch.cat(x, 1))))


class TPixelHead(nn.Module):  # official ProjectionHead('convmlp') under proj_head.proj.*
    def __init__(self, cin, dim):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(cin, cin, 1), nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU()),
                                  nn.Conv2d(cin, dim, 1))

    def forward(self, feats):
        size = feats[0].shape[2:]
        x = torch.cat([feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=True)
                                    for f in feats[1:]], 1)
        return F.normalize(self.proj(x), p=2, dim=1)


class TPatchHead(nn.Module):  # official CAC projector under project.*
    def __init__(self, cin, dim):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(cin, cin, 1), nn.ReLU(), nn.Conv2d(cin, dim, 1))

    def forward(self, fused):
        return F.normalize(self.project(F.avg_pool2d(fused, 2)), p=2, dim=1)


def randomize(module: nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if "bn" in name and name.endswith("weight") else 0))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module


def features(seed=0, channels=IN_CH, sizes=SIZES, batch=2):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, c) + s).astype(np.float32) for c, s in zip(channels, sizes)]


def nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def assert_close_nchw(ours, ref, atol=1e-4):
    np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy().transpose(0, 2, 3, 1), atol=atol, rtol=0)


@pytest.mark.parametrize("fusion,dilations", [("aspp", (1, 6, 12, 18)), ("aspp", (1, 2, 3)), ("conv", ())])
@pytest.mark.parametrize("impl", ["shift", "native"])
def test_daformer_head_eval_and_train_mode(fusion, dilations, impl):
    ref = randomize(TDAFormerHead(IN_CH, 7, 16, dilations, fusion), seed=1)
    ours = DAFormerHead(IN_CH, 7, 16, fusion=fusion, dilations=dilations or (1,), forms=ComputeForms(dwconv=impl),
                        rngs=nnx.Rngs(0))
    report = load_torch_weights(ours, ref.state_dict())
    assert report.ok
    feats = features()
    with torch.no_grad():
        ref.eval()
        assert_close_nchw(ours([nhwc(f) for f in feats]), ref([torch.from_numpy(f) for f in feats]))
        # Train-mode BatchNorm (batch statistics), dropout off: the EMA teacher's mode.
        ref.train()
        ref.dropout.p = 0.0
        out_ref = ref([torch.from_numpy(f) for f in feats])
    out = ours([nhwc(f) for f in feats], train=False, use_running_average=False)
    assert_close_nchw(out, out_ref)
    # Running statistics follow PyTorch's update (unbiased variance, momentum 0.1).
    bn_ref = ref.fuse_layer.bottleneck.bn if fusion == "aspp" else ref.fuse_layer.bn
    bn = ours.fuse_layer.bottleneck.bn if fusion == "aspp" else ours.fuse_layer.bn
    np.testing.assert_allclose(np.asarray(bn.mean[...]), bn_ref.running_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.var[...]), bn_ref.running_var.numpy(), atol=1e-5)


def test_segformer_head_matches_reference():
    ref = randomize(TSegFormerHead(IN_CH, 5, 12), seed=2).eval()
    ours = SegFormerHead(IN_CH, 5, 12, rngs=nnx.Rngs(0))
    assert load_torch_weights(ours, ref.state_dict()).ok  # the unused conv_seg is skipped on purpose
    feats = features(seed=3)
    with torch.no_grad():
        assert_close_nchw(ours([nhwc(f) for f in feats]), ref([torch.from_numpy(f) for f in feats]))


def test_pixel_and_patch_heads_match_reference():
    pix_ref = randomize(TPixelHead(sum(IN_CH), 10), seed=4).eval()
    sd = {f"model.proj_head.{k}": v for k, v in pix_ref.state_dict().items()}
    pix = PixelProjectionHead(IN_CH, 10, rngs=nnx.Rngs(0))
    assert load_torch_weights(pix, sd, prefix="model.proj_head.").ok
    feats = features(seed=5)
    with torch.no_grad():
        ref = pix_ref([torch.from_numpy(f) for f in feats])
    out = pix([nhwc(f) for f in feats], use_running_average=True)
    assert_close_nchw(out, ref)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), 1.0, atol=1e-5)

    patch_ref = randomize(TPatchHead(12, 6), seed=6).eval()
    patch = PatchProjectionHead(12, 6, rngs=nnx.Rngs(0))
    assert load_torch_weights(patch, patch_ref.state_dict()).ok
    fused = np.random.default_rng(7).normal(size=(2, 12, 16, 20)).astype(np.float32)
    with torch.no_grad():
        assert_close_nchw(patch(nhwc(fused)), patch_ref(torch.from_numpy(fused)))


def test_daformer_head_bfloat16_close():
    ref = randomize(TDAFormerHead(IN_CH, 7, 16, (1, 6, 12, 18)), seed=1).eval()
    f32 = DAFormerHead(IN_CH, 7, 16, rngs=nnx.Rngs(0))
    bf16 = DAFormerHead(IN_CH, 7, 16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    for m in (f32, bf16):
        load_torch_weights(m, ref.state_dict())
    feats = [nhwc(f) for f in features(seed=8)]
    a, b = np.asarray(f32(feats)), np.asarray(bf16(feats), dtype=np.float32)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05
