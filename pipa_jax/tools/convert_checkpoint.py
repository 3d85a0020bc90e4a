"""Converts an official PyTorch checkpoint into a pipa_jax model directory.

  python -m pipa_jax.tools.convert_checkpoint --input pipa_gta_to_cs.pth --output ckpt/ [--which student|teacher]
  python -m pipa_jax.tools.convert_checkpoint --input mit_b5.pth --output pretrained/mit_b5/

The architecture (MiT variant, decoder, classes, PiPa heads) is read from the checkpoint's keys
and shapes. Trained DAFormer / PiPa checkpoints give a full Segmentor; an ImageNet mit_b*.pth
gives the encoder with a freshly initialised decoder (the pretrained starting point of training).
The output directory is read by pipa_jax.model_io.load_model (evaluation, prediction, init).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from pipa_jax import convert, model_io
from pipa_jax.models import build_segmentor, default_model_config

PREFIXES = {"student": "model.", "teacher": "ema_model."}


def convert_file(input_path: str, output_dir: str, which: str = "student", seed: int = 0) -> dict:
    """Returns a summary dict; raises CheckpointError with the keys when the file does not fit."""
    if which not in PREFIXES:
        raise ValueError(f"--which must be 'student' or 'teacher', got {which!r}")
    ckpt = convert.read_checkpoint(input_path)
    shapes = {k: tuple(v.shape) for k, v in ckpt.items()}
    trained = any(k.startswith("model.") for k in ckpt)
    prefix = PREFIXES[which] if trained else ""
    if trained and not any(k.startswith(prefix) for k in ckpt):
        raise convert.CheckpointError(
            f"{input_path} has no '{prefix}' keys for --which {which}: {convert.describe_checkpoint(shapes)}")
    info = convert.detect_architecture(shapes, prefix)
    if info is None:
        raise convert.CheckpointError(
            f"{input_path} holds no MiT encoder under prefix {prefix!r}: {convert.describe_checkpoint(shapes)}. "
            "Expected an official SegFormer mit_b*.pth or a DAFormer / HRDA / PiPa checkpoint")
    if not info["backbone"].startswith("mit_b"):
        raise convert.CheckpointError(f"{input_path}: unsupported encoder {info['backbone']}")
    if info["decode_head"] == "hrda":
        raise convert.CheckpointError(
            f"{input_path} is an HRDA checkpoint (decode_head.head.* + scale_attention.*). The HRDA "
            "multi-resolution segmentor is not in pipa_jax yet; its parts load with load_torch_weights: "
            "MixVisionTransformer with prefix 'model.backbone.', DAFormerHead with prefix "
            "'model.decode_head.head.', DAFormerHead(fusion='conv') with 'model.decode_head.scale_attention.'")
    config = default_model_config()
    config.backbone = info["backbone"]
    if info["decode_head"]:
        config.decode_head = info["decode_head"]
        config.num_classes = int(info["num_classes"])
        config.embed_dim = int(info["embed_dim"])
    config.pixel_head = bool(info["pixel_head"])
    if info["pixel_proj_dim"]:
        config.pixel_proj_dim = int(info["pixel_proj_dim"])
    # The official patch projector sits beside the student only; the teacher has none.
    config.patch_head = bool(info["patch_head"]) and which == "student"
    if info["patch_proj_dim"]:
        config.patch_proj_dim = int(info["patch_proj_dim"])
    model = build_segmentor(config, seed=seed)
    if info["decode_head"]:
        report = convert.load_torch_weights(model, ckpt, prefix=prefix)
    else:  # ImageNet encoder only: the decoder and heads stay at their initialisation.
        report = convert.load_torch_weights(model.backbone, ckpt, prefix=prefix)
    source = {"input": input_path, "prefix": prefix, "which": which if trained else "imagenet_encoder",
              "loaded_tensors": len(report.loaded),
              "initialised_not_loaded": [] if info["decode_head"] else ["decode_head", "pixel_head", "patch_head"]}
    model_io.save_model(output_dir, model, config, source=source)
    return {"config": config.to_dict(), **source}


FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "Official checkpoint (.pth, .npz or .safetensors).")
flags.DEFINE_string("output", None, "Output model directory.")
flags.DEFINE_enum("which", "student", list(PREFIXES), "Which network of a trained checkpoint.")
flags.DEFINE_integer("seed", 0, "Seed for parts that are initialised, not loaded.")


def main(argv):
    del argv
    if not FLAGS.input or not FLAGS.output:
        raise app.UsageError("--input and --output are required")
    try:
        summary = convert_file(FLAGS.input, FLAGS.output, FLAGS.which, FLAGS.seed)
    except (convert.CheckpointError, FileNotFoundError, ImportError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {FLAGS.output}: {summary['config']['backbone']} + {summary['config']['decode_head']} head, "
          f"{summary['loaded_tensors']} tensors from {summary['input']} (prefix {summary['prefix']!r})")
    return 0


if __name__ == "__main__":
    app.run(main)
