"""Official PyTorch checkpoints -> pipa_jax NNX modules.

The mapping is a short rename table plus layout rules, derived from the module itself: every
NNX variable path (e.g. `backbone.block1.0.attn.kv.kernel`) names its official key
(`backbone.block1.0.attn.kv.weight`) because module attributes mirror the official names.

Layout rules (PyTorch -> Flax):
  Linear weight [out, in]            -> kernel [in, out]
  Conv weight [O, I/g, kh, kw]       -> kernel [kh, kw, I/g, O] (depthwise [C, 1, 3, 3] -> [3, 3, 1, C])
  LayerNorm / BatchNorm weight       -> scale
  BatchNorm running_mean / _var      -> mean / var   (num_batches_tracked is dropped)

Sources: the SegFormer ImageNet `mit_b*.pth` (raw dict, or under 'state_dict' / 'model'), and
trained DAFormer / HRDA / PiPa mmcv checkpoints ({'meta', 'state_dict', 'optimizer'}; keys under
`model.` = student, `ema_model.` = teacher, `imnet_model.` = frozen ImageNet copy). DeepLabV2
(pipa_jax.models.resnet): the DACS COCO init `resnet101COCO-*.pth` and torchvision ImageNet ResNets
(keys at the root: conv1, bn1, layer1..4; `fc.*` and, into a backbone alone, `layer5.*` are
skipped), and DACS training checkpoints ({'model', 'ema_model', ...}: read as `model.` / `ema_model.`).
A module class with an `OFFICIAL_NAME` attribute is named so in keys (ResNet: '' = at the root of
its segmentor's keys; DeepLabV2Head and ProDAHead: 'layer5'), and one with `OFFICIAL_CHILDREN`
({attribute: official name}) renames its children (ProDAHead's bottleneck.0 / .1 / .2). .pth files
are read with torch.load(weights_only=True): no arbitrary code is unpickled.
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
import zipfile
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

# Per module class: our child attribute -> its official name (only where the names differ).
# A leading '/' restarts the key at the checkpoint root: the official patch projector lives in the
# UDA module beside `model.`, not inside it.
def _renames():
    from pipa_jax.models import heads, hrda, segmentor
    return {
        segmentor.EncoderDecoder: {"pixel_head": "proj_head", "patch_head": "/"},
        hrda.HRDA: {"pixel_head": "proj_head", "patch_head": "/"},
        heads.PixelProjectionHead: {"conv1": "proj.0", "bn": "proj.1.0", "conv2": "proj.2"},
        heads.PatchProjectionHead: {"conv1": "project.0", "conv2": "project.2"},
    }


LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}

class CheckpointError(ValueError):
    """A checkpoint that does not fit the module; the message lists the keys and the fix."""


@dataclasses.dataclass
class LoadReport:
    loaded: list[str]
    missing: list[str]        # official keys the module needs but the checkpoint lacks
    unexpected: list[str]     # checkpoint keys under the prefix that map to nothing
    mismatched: list[str]     # "key: checkpoint shape -> expected shape"
    allowed_missing: list[str]
    skipped: list[str] = dataclasses.field(default_factory=list)  # training-only keys the module has no use for

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 12) -> str:
        def part(name, items):
            if not items:
                return ""
            more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
            return f"\n  {name} ({len(items)}): " + ", ".join(items[:limit]) + more
        return (f"{len(self.loaded)} tensors loaded" + part("missing", self.missing)
                + part("unexpected", self.unexpected) + part("shape mismatch", self.mismatched)
                + part("left at init (allowed missing)", self.allowed_missing)
                + part("training-only, not loaded", self.skipped))


def official_key(module: nnx.Module, path: tuple) -> str:
    """NNX variable path inside `module` -> official checkpoint key (relative to the prefix, or
    absolute when it starts with '/')."""
    table = _renames()
    parts, absolute, obj = [], False, module
    for p in path[:-1]:
        renames = {**table.get(type(obj), {}), **getattr(type(obj), "OFFICIAL_CHILDREN", {})}
        name = renames.get(p, str(p))
        child = obj[p] if isinstance(p, int) else getattr(obj, p)
        name = getattr(type(child), "OFFICIAL_NAME", name)
        if name.startswith("/"):
            parts, absolute, name = [], True, name[1:]
        if name:
            parts.append(name)
        obj = child
    leaf = str(path[-1])
    if leaf not in LEAF_RENAMES:
        raise KeyError(f"no official name for variable {'.'.join(map(str, path))}")
    return ("/" if absolute else "") + ".".join(parts + [LEAF_RENAMES[leaf]])


def torch_to_flax(key: str, array: np.ndarray, target_ndim: int) -> np.ndarray:
    """Applies the layout rule for one tensor (see module docstring)."""
    if key.endswith(".weight") and array.ndim == 2 and target_ndim == 2:
        return array.T
    if key.endswith(".weight") and array.ndim == 4 and target_ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def _to_numpy(value, key: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        t = value.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16",):
            t = t.float()
        # Copy: .numpy() shares torch's memory, and jnp.asarray of it can be zero-copy on CPU,
        # which would let later in-place updates of the torch tensor change our parameters.
        return t.numpy().copy()
    try:
        return np.asarray(value)
    except Exception as e:  # pragma: no cover - defensive
        raise CheckpointError(f"checkpoint entry {key!r} is not an array ({type(value).__name__})") from e


def read_checkpoint(source) -> dict[str, np.ndarray]:
    """Reads a checkpoint into a flat {official key: numpy array} dict.

    `source`: a path to .pth/.pt/.bin (PyTorch zip or legacy format, read with
    weights_only=True), .npz or .safetensors; or a mapping of arrays (numpy / torch / jax).
    Nested {'state_dict': ...} or {'model': {...}} wrappers are unwrapped.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if os.path.isdir(path):
            raise CheckpointError(f"{path} is a directory; expected a checkpoint file (.pth, .npz, .safetensors)")
        if path.endswith(".npz"):
            try:
                with np.load(path) as f:
                    raw = {k: f[k] for k in f.files}
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
                raise CheckpointError(f"cannot read {path}: the file is truncated or corrupt ({e}); "
                                      "download or convert it again") from e
        elif path.endswith(".safetensors"):
            try:
                from safetensors.numpy import load_file
            except ImportError as e:
                raise ImportError("reading .safetensors needs `pip install safetensors`") from e
            raw = load_file(path)
        else:
            raw = _torch_load(path)
    elif isinstance(source, Mapping):
        raw = source
    else:
        raise TypeError(f"checkpoint source must be a path or a mapping of arrays, got {type(source).__name__}")
    raw = _unwrap(raw)
    return {str(k): _to_numpy(v, k) for k, v in raw.items()}


def _torch_load(path: str):
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading the PyTorch checkpoint {path} needs torch: `pip install 'pipa_jax[torch]'` "
            "(any CPU build works), or convert it to .npz elsewhere") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        if "Weights only load failed" in msg:
            raise CheckpointError(
                f"{path} holds Python objects that torch.load(weights_only=True) refuses to unpickle "
                f"({msg.splitlines()[0]}). pipa_jax never unpickles arbitrary code; re-save the file "
                "as a plain state dict, e.g. torch.save(ckpt['state_dict'], 'clean.pth'), in a "
                "trusted environment") from e
        raise CheckpointError(
            f"cannot read {path}: the file is truncated or corrupt or not a PyTorch checkpoint "
            f"({type(e).__name__}: {msg[:200]}); download it again and check its size / checksum") from e


def _unwrap(raw: Mapping) -> Mapping:
    # DACS training checkpoints: {'model': student, 'ema_model': teacher, 'optimizer', ...}.
    if isinstance(raw, Mapping) and all(isinstance(raw.get(w), Mapping) for w in ("model", "ema_model")):
        return {f"{w}.{k}": v for w in ("model", "ema_model") for k, v in raw[w].items()}
    for wrapper in ("state_dict", "model"):
        inner = raw.get(wrapper) if isinstance(raw, Mapping) else None
        if isinstance(inner, Mapping) and inner and all(not isinstance(v, Mapping) for v in inner.values()):
            return inner
    bad = [k for k, v in raw.items() if isinstance(v, Mapping)]
    if bad:
        raise CheckpointError(f"checkpoint has nested entries {bad[:5]} and no 'state_dict'; "
                              "expected a flat state dict of tensors")
    return raw


def detect_architecture(keys_shapes: Mapping[str, tuple], prefix: str = "") -> dict | None:
    """What a checkpoint holds under `prefix`: {'backbone': 'mit_b5' (or a description),
    'decode_head': 'daformer' | 'segformer' | 'hrda' | None, 'num_classes', 'embed_dim',
    'pixel_head', 'pixel_proj_dim', 'patch_head', 'patch_proj_dim'}; None without a MiT."""
    from pipa_jax.models.mit import MIT_VARIANTS
    root = prefix + "backbone." if any(k.startswith(prefix + "backbone.") for k in keys_shapes) else prefix
    depths, dims = [0] * 4, [0] * 4
    for k, shape in keys_shapes.items():
        m = re.match(re.escape(root) + r"block(\d)\.(\d+)\.norm1\.weight$", k)
        if m and 1 <= int(m.group(1)) <= 4:
            s = int(m.group(1)) - 1
            depths[s] = max(depths[s], int(m.group(2)) + 1)
            dims[s] = int(shape[0])
    if not all(depths):
        return None
    backbone = next((f"mit_{n}" for n, v in MIT_VARIANTS.items()
                     if v.depths == tuple(depths) and v.embed_dims == tuple(dims)),
                    f"MiT(depths={tuple(depths)}, dims={tuple(dims)})")
    dh = prefix + "decode_head."
    info = {"backbone": backbone, "decode_head": None, "num_classes": None, "embed_dim": None,
            "segmentor": "encoder_decoder"}
    if dh + "head.embed_layers.0.proj.weight" in keys_shapes:
        # HRDA: the DAFormer head under decode_head.head, the scale attention beside it.
        info.update(segmentor="hrda", decode_head="daformer" if dh + "head.fuse_layer.aspp_modules.0.conv.weight"
                    in keys_shapes else "unknown", num_classes=keys_shapes[dh + "head.conv_seg.weight"][0],
                    embed_dim=keys_shapes[dh + "head.embed_layers.0.proj.weight"][0],
                    attention_classes=keys_shapes.get(dh + "scale_attention.conv_seg.weight", (None,))[0])
    elif dh + "fuse_layer.aspp_modules.0.conv.weight" in keys_shapes:
        info.update(decode_head="daformer", num_classes=keys_shapes[dh + "conv_seg.weight"][0],
                    embed_dim=keys_shapes[dh + "embed_layers.0.proj.weight"][0])
    elif dh + "linear_c.0.proj.weight" in keys_shapes:
        info.update(decode_head="segformer", num_classes=keys_shapes[dh + "linear_pred.weight"][0],
                    embed_dim=keys_shapes[dh + "linear_c.0.proj.weight"][0])
    pix = prefix + "proj_head.proj.2.weight"
    info["pixel_head"] = pix in keys_shapes
    info["pixel_proj_dim"] = keys_shapes[pix][0] if pix in keys_shapes else None
    # PiPa's patch projector sits at the checkpoint root. PiPa-DAFormer's reads the decoder's fused
    # map (embed_dim channels), as pipa_jax's patch head does; PiPa-HRDA's reads the teacher's 19
    # logits, which no pipa_jax head does (its keys are then training-only extras).
    proj_in = keys_shapes.get("project.0.weight", (None, None))[1]
    info["patch_head"] = "project.2.weight" in keys_shapes and proj_in == info["embed_dim"]
    info["patch_proj_dim"] = keys_shapes["project.2.weight"][0] if info["patch_head"] else None
    return info


def detect_resnet(keys_shapes: Mapping[str, tuple], prefix: str = "") -> dict | None:
    """A DeepLab / torchvision ResNet under `prefix` (keys conv1, layer1..4[, layer5, fc]):
    {'backbone': 'resnet101' (or a description), 'depths', 'decode_head': 'deeplabv2' | None,
    'num_classes', 'branches', 'classifier': 'fc' (torchvision ImageNet) | None}; None if absent."""
    from pipa_jax.models.resnet import RESNET_DEPTHS
    depths = [0] * 4
    for k in keys_shapes:
        m = re.match(re.escape(prefix) + r"layer([1-4])\.(\d+)\.conv1\.weight$", k)
        if m:
            s = int(m.group(1)) - 1
            depths[s] = max(depths[s], int(m.group(2)) + 1)
    if not all(depths) or prefix + "conv1.weight" not in keys_shapes:
        return None
    backbone = next((f"resnet{d}" for d, v in RESNET_DEPTHS.items() if v == tuple(depths)),
                    f"ResNet(blocks={tuple(depths)})")
    convs = sorted(k for k in keys_shapes if re.match(re.escape(prefix) + r"layer5\.conv2d_list\.\d+\.weight$", k))
    return {"backbone": backbone, "depths": tuple(depths), "decode_head": "deeplabv2" if convs else None,
            "num_classes": keys_shapes[convs[0]][0] if convs else None, "branches": len(convs) or None,
            "classifier": "fc" if prefix + "fc.weight" in keys_shapes else None, "segmentor": "encoder_decoder"}


def describe_checkpoint(keys_shapes: Mapping[str, tuple]) -> str:
    """A one-line guess of what a checkpoint holds (for error messages)."""
    prefixes = sorted({k.split(".")[0] for k in keys_shapes})
    parts = []
    for root in ("", "model.", "ema_model.", "imnet_model."):
        info = detect_architecture(keys_shapes, root)
        if info:
            head = f" + {info['decode_head']} head" if info["decode_head"] else ""
            if info.get("segmentor") == "hrda":
                head = f" + HRDA ({info['decode_head']} head + scale attention)"
            parts.append(f"{root or '(root) '}{info['backbone']}{head}")
        res = detect_resnet(keys_shapes, root)
        if res:
            head = (f" + DeepLabV2 classifier ({res['branches']} branches, {res['num_classes']} classes)"
                    if res["decode_head"] else "")
            head += " + ImageNet fc classifier" if res["classifier"] else ""
            parts.append(f"{root or '(root) '}{res['backbone']} (bottlenecks per stage {res['depths']}){head}")
    found = "; ".join(parts) if parts else "no MiT or ResNet backbone recognised"
    return f"{found}; top-level key prefixes: {', '.join(prefixes[:8])}"


def _ignored(rel_key: str, expected_keys: set[str]) -> bool:
    """Official keys with no counterpart here and no use to anyone, skipped silently (key
    relative to the prefix)."""
    if rel_key.endswith("num_batches_tracked"):
        return True
    # ResNets: torchvision's ImageNet classifier, and a DeepLab classifier when only the
    # backbone is loaded (the DACS COCO init's layer5 has COCO's classes).
    if "layer1.0.conv1.weight" in expected_keys and (
            re.match(r"^fc\.(weight|bias)$", rel_key)
            or (rel_key.startswith("layer5.") and not any(k.startswith("layer5.") for k in expected_keys))):
        return True
    # mit_b*.pth's ImageNet classifier.
    if re.match(r"^(backbone\.)?head\.", rel_key):
        return True
    # mmseg's BaseDecodeHead always builds conv_seg; SegFormerHead predicts with linear_pred.
    m = re.match(r"^(.*?)conv_seg\.(weight|bias)$", rel_key)
    if m and m.group(1) + "linear_pred.weight" in expected_keys:
        return True
    return False


# Training-only parts of official PiPa checkpoints that a module may not have: the auxiliary
# cls_head (never trained by a loss), the pixel projector `proj_head` (a model built without
# PiPa's heads), and the root-level CAC projector / classifier of PiPa-HRDA (on 19-channel logits).
# They are reported in LoadReport.skipped, not errors.
_TRAINING_ONLY = (re.compile(r"^cls_head\."), re.compile(r"^proj_head\."))
_TRAINING_ONLY_ROOT = (re.compile(r"^project\."), re.compile(r"^classifier\."))


def _training_only(rel_key: str, root_key: str) -> bool:
    return any(p.match(rel_key) for p in _TRAINING_ONLY) or any(p.match(root_key) for p in _TRAINING_ONLY_ROOT)


def load_torch_weights(module: nnx.Module, source, *, prefix: str = "", strict: bool = True,
                       allow_missing: tuple[str, ...] = ()) -> LoadReport:
    """Fills `module`'s parameters and BatchNorm statistics from an official checkpoint.

    Args:
      module: a pipa_jax module (Segmentor, MixVisionTransformer, DAFormerHead, ...).
      source: a checkpoint path or a mapping of arrays (see read_checkpoint).
      prefix: the key prefix of `module` inside the checkpoint, e.g. '' for mit_b5.pth into a
        MixVisionTransformer, 'model.' for the student of a trained checkpoint into a Segmentor,
        'ema_model.' for its teacher, 'model.backbone.' for just its encoder.
      strict: missing, unexpected and shape-mismatched keys raise CheckpointError listing them;
        with strict=False they are reported (warning + returned LoadReport) and what matches loads.
      allow_missing: module path prefixes (ours, e.g. 'pixel_head.') allowed to be absent from the
        checkpoint; they keep their initial values (training-only heads of a DAFormer checkpoint).

    Returns a LoadReport. The module is only modified when the load succeeds (or strict=False).
    """
    if prefix and not prefix.endswith("."):
        prefix += "."
    ckpt = read_checkpoint(source)
    state = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
    flat = list(nnx.to_flat_state(state))
    expected = {}
    for path, var in flat:
        key = official_key(module, path)
        full = key[1:] if key.startswith("/") else prefix + key
        expected[full] = (path, var)
    expected_rel = {k[len(prefix):] if k.startswith(prefix) else k for k in expected}

    loaded, missing, mismatched, allowed = [], [], [], []
    new_flat = []
    for full, (path, var) in expected.items():
        ours = ".".join(map(str, path))
        target = var[...]
        if full not in ckpt:
            if any(ours.startswith(a) for a in allow_missing):
                allowed.append(full)
            else:
                missing.append(full)
            continue
        arr = torch_to_flax(full, ckpt[full], target.ndim)
        if tuple(arr.shape) != tuple(target.shape):
            mismatched.append(f"{full}: {tuple(ckpt[full].shape)} -> expected {tuple(target.shape)} as {ours}")
            continue
        if not np.issubdtype(arr.dtype, np.floating):
            mismatched.append(f"{full}: dtype {arr.dtype}, expected floating point")
            continue
        new_flat.append((path, var.replace(jnp.array(arr, dtype=target.dtype, copy=True))))
        loaded.append(full)
    leftover = [k for k in ckpt if k not in expected and (k.startswith(prefix) or _training_only("", k))
                and not _ignored(k[len(prefix):] if k.startswith(prefix) else k, expected_rel)]
    skipped = sorted(k for k in leftover if _training_only(k[len(prefix):] if k.startswith(prefix) else "", k))
    unexpected = sorted(k for k in leftover if k.startswith(prefix) and k not in skipped)
    report = LoadReport(loaded, sorted(missing), unexpected, mismatched, sorted(allowed), skipped)
    if not report.ok:
        shapes = {k: tuple(v.shape) for k, v in ckpt.items()}
        hint = (f"\n  the checkpoint holds: {describe_checkpoint(shapes)}"
                f"\n  the module is {type(module).__name__}{_describe_module(module)} with prefix {prefix!r}")
        if not any(k.startswith(prefix) for k in loaded):
            hint += ("\n  nothing matched: check `prefix` ('' for mit_b*.pth into a backbone, 'model.' for "
                     "the student of a trained checkpoint, 'ema_model.' for the teacher)")
        if strict:
            raise CheckpointError("checkpoint does not fit the module: " + report.summary() + hint
                                  + "\n  (strict=False loads what matches and reports the rest)")
        warnings.warn("partial checkpoint load: " + report.summary() + hint, stacklevel=2)
    if new_flat:
        nnx.update(module, nnx.from_flat_state(new_flat))
    return report


def _describe_module(module) -> str:
    bb = getattr(module, "backbone", module)
    if type(bb).__name__ == "ResNet":
        head = getattr(module, "decode_head", None)
        extra = (f" + DeepLabV2 classifier ({head.branches} summed of {len(head.conv2d_list)} branches)"
                 if type(head).__name__ == "DeepLabV2Head" else "")
        return f" (resnet{bb.depth}: bottlenecks per stage {bb.depths}{extra})"
    dims, depths = getattr(bb, "embed_dims", None), getattr(bb, "depths", None)
    kind = " HRDA" if type(module).__name__ == "HRDA" else ""
    return f"{kind} (MiT dims={dims}, depths={depths})" if dims else ""


def export_torch_state_dict(module: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse mapping: module -> {official key: numpy array in PyTorch layout}.

    Keys that start at the checkpoint root (the patch projector) are not prefixed. Useful to
    hand weights back to the official code, and to build official-format files in tests.
    """
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))):
        key = official_key(module, path)
        key = key[1:] if key.startswith("/") else prefix + key
        arr = np.asarray(var[...], dtype=np.float32)
        if key.endswith(".weight") and arr.ndim == 2:
            arr = arr.T
        elif key.endswith(".weight") and arr.ndim == 4:
            arr = arr.transpose(3, 2, 0, 1)
        out[key] = np.ascontiguousarray(arr)
    return out
