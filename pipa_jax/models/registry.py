"""Registries of backbones, decode heads and segmentors: a new network is a new file that
registers itself here, not a branch in a factory.

- BACKBONES: name (model.backbone) -> builder(config, *, forms, dtype, param_dtype, rngs), a module
  whose call `(x, *, train, rng, use_running_average)` returns the stage maps and whose
  `embed_dims` lists their channels. Optional per-backbone optimizer rules (PARAM_RULES):
  `param_group(names, config) -> 'frozen' | 'no_decay' | None` and `duplicates(names) -> int`
  (the official SGD's repeated parameters), both on the parameter's path below `backbone`.
- HEADS: name (model.decode_head) -> HeadSpec(builder(config, in_channels, **kw), output stride,
  align_corners of the logits' upsampling).
- SEGMENTORS: name (model.segmentor) -> class(config, *, rngs) following segmentor.Segmentor.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

BACKBONES: dict[str, Callable] = {}
HEADS: dict[str, "HeadSpec"] = {}
SEGMENTORS: dict[str, Callable] = {}
PARAM_RULES: dict[str, "ParamRules"] = {}


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    build: Callable          # (config, in_channels, *, forms, dtype, param_dtype, rngs) -> module
    output_stride: int       # logits' stride over the encoder input
    align_corners: bool = False   # how its logits are upsampled to labels / the input (DeepLabV2: True)


@dataclasses.dataclass(frozen=True)
class ParamRules:
    param_group: Callable | None = None   # (names, config) -> 'frozen' | 'no_decay' | None
    duplicates: Callable | None = None    # names -> how often the official optimizer lists it


def register_backbone(name: str, build: Callable, *, param_group: Callable | None = None,
                      duplicates: Callable | None = None) -> None:
    BACKBONES[name] = build
    PARAM_RULES[name] = ParamRules(param_group, duplicates)


def register_head(name: str, build: Callable, output_stride: int, align_corners: bool = False) -> None:
    HEADS[name] = HeadSpec(build, output_stride, align_corners)


def register_segmentor(name: str, cls: Callable) -> None:
    SEGMENTORS[name] = cls


def _lookup(table: dict, field: str, name):
    _populate()
    if name not in table:
        raise ValueError(f"config.model.{field} = {name!r}: expected one of {', '.join(sorted(table))}")
    return table[name]


def build_backbone(config, **kw):
    return _lookup(BACKBONES, "backbone", str(config.backbone))(config, **kw)


def build_head(config, in_channels, **kw):
    return _lookup(HEADS, "decode_head", str(config.decode_head)).build(config, in_channels, **kw)


def head_stride(name: str) -> int:
    return _lookup(HEADS, "decode_head", str(name)).output_stride


def head_spec(name: str) -> HeadSpec:
    return _lookup(HEADS, "decode_head", str(name))


def param_rules(backbone: str) -> ParamRules:
    _lookup(BACKBONES, "backbone", str(backbone))
    return PARAM_RULES.get(str(backbone), ParamRules())


def segmentor_class(name: str):
    return _lookup(SEGMENTORS, "segmentor", str(name))


_POPULATED = False


def _populate() -> None:
    """Registers the built-in networks (imported here, on first use, to keep imports acyclic)."""
    global _POPULATED
    if _POPULATED:
        return
    _POPULATED = True
    from pipa_jax.models import heads, hrda, mit, proda_head, resnet, segmentor

    for variant in mit.MIT_VARIANTS:
        register_backbone(f"mit_{variant}", lambda config, *, v=variant, **kw: mit.MixVisionTransformer(
            v, drop_path_rate=config.drop_path_rate, **kw), param_group=mit.param_group)
    register_head("daformer", lambda config, dims, **kw: heads.DAFormerHead(
        dims, config.num_classes, config.embed_dim, dropout=config.dropout, **kw), output_stride=4)
    register_head("segformer", lambda config, dims, **kw: heads.SegFormerHead(
        dims, config.num_classes, config.embed_dim, dropout=config.dropout, **kw), output_stride=4)
    resnet.register(register_backbone, register_head)
    proda_head.register(register_head)
    register_segmentor("encoder_decoder", segmentor.EncoderDecoder)
    register_segmentor("hrda", hrda.HRDA)
