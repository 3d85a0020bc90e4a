"""Stand-alone model checkpoints: a Segmentor's parameters and BatchNorm statistics plus the
model config that rebuilds it. Written by tools.convert_checkpoint (official weights) and read
by evaluation, prediction and training initialisation.

Layout of DIR:
  DIR/model_config.json   the model ConfigDict (see models.default_model_config)
  DIR/model/              Orbax StandardCheckpointer tree {'params': ..., 'batch_stats': ...}
  DIR/source.json         where the weights came from (path, prefix, what was left at init)
Orbax writes into a temporary directory and renames it when complete, so an interrupted save
never leaves a half-written model behind.
"""
from __future__ import annotations

import json
import os

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from pipa_jax import config as config_lib
from pipa_jax import io as io_lib
from pipa_jax.models import Segmentor, build_segmentor, default_model_config


def save_model(directory: str, model: Segmentor, model_config: ml_collections.ConfigDict,
               source: dict | None = None) -> str:
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    tree = {
        "params": nnx.state(model, nnx.Param).to_pure_dict(),
        "batch_stats": nnx.state(model, nnx.BatchStat).to_pure_dict(),
    }
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "model"), tree, force=True)
    # Only the architecture: run settings kept in a training config's model group (such as
    # `pretrained`) describe how a run started, not the model in this directory.
    arch = set(default_model_config().keys())
    io_lib.write_json_atomic(os.path.join(directory, "model_config.json"),
                {k: v for k, v in model_config.to_dict().items() if k in arch})
    if source is not None:
        io_lib.write_json_atomic(os.path.join(directory, "source.json"), source)
    return directory


def load_model_config(directory: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.abspath(directory), "model_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a pipa_jax model directory (expected model_config.json "
            "and model/ as written by `python -m pipa_jax.tools.convert_checkpoint`)")
    with open(path) as f:
        values = json.load(f)
    config = default_model_config()
    unknown = sorted(set(values) - set(config.keys()))
    if unknown:
        raise ValueError(f"{path} has unknown model fields {unknown}; written by a newer pipa_jax?")
    config_lib.merge_json(config, values)  # e.g. a bool scan_blocks written before 'auto' existed
    return config


def load_model(directory: str, **overrides) -> Segmentor:
    """Rebuilds the Segmentor of `directory` and restores its weights (`overrides` change model
    config fields that do not affect parameters, e.g. dtype='bfloat16' or dwconv_impl)."""
    directory = os.path.abspath(directory)
    config = load_model_config(directory)
    config.update(overrides)
    model = build_segmentor(config)
    target = {
        "params": nnx.state(model, nnx.Param).to_pure_dict(),
        "batch_stats": nnx.state(model, nnx.BatchStat).to_pure_dict(),
    }
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(directory, "model"), target)
    for part in ("params", "batch_stats"):
        state = nnx.state(model, nnx.Param if part == "params" else nnx.BatchStat)
        nnx.replace_by_pure_dict(state, restored[part])
        nnx.update(model, state)
    return model
