"""Converts an official PyTorch checkpoint into a pipa_jax model directory.

  python -m pipa_jax.tools.convert_checkpoint --input pipa_gta_to_cs.pth --output ckpt/ [--which student|teacher]
  python -m pipa_jax.tools.convert_checkpoint --input mit_b5.pth --output pretrained/mit_b5/
  python -m pipa_jax.tools.convert_checkpoint --input hrda.pth --output ckpt/ [--config configs/gta2cs_hrda.py]

The architecture (MiT variant, decoder, HRDA or single scale, classes, PiPa heads) is read from
the checkpoint's keys and shapes. Trained DAFormer / PiPa checkpoints give an EncoderDecoder,
HRDA / MIC / PiPa-HRDA checkpoints (decode_head.head.* + decode_head.scale_attention.*) an HRDA
segmentor with the official HRDA settings (docs/method.md §6; its crop sizes and strides are not
stored in the file); an ImageNet mit_b*.pth gives the encoder with a freshly initialised decoder
(the pretrained starting point of training). Training-only extras of PiPa checkpoints (cls_head,
PiPa-HRDA's logit projector `project.*` / `classifier.*`) are reported and left out. HRDA's crop
and window settings (model.hrda.*) are not in the file: they default to the official values, or
come from `--config` (a run config whose model.hrda group applies).
The output directory is read by pipa_jax.model_io.load_model (evaluation, prediction, init).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pipa_jax import convert, model_io
from pipa_jax.models import build_segmentor, default_model_config

PREFIXES = {"student": "model.", "teacher": "ema_model."}


def convert_file(input_path: str, output_dir: str, which: str = "student", seed: int = 0,
                 hrda_settings=None) -> dict:
    """Returns a summary dict; raises CheckpointError with the keys when the file does not fit.
    `hrda_settings` (a model.hrda ConfigDict or dict) replaces the official HRDA defaults."""
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
    if info is None and convert.detect_resnet(shapes, prefix) is not None:
        return _convert_resnet(ckpt, shapes, input_path, output_dir, prefix, which, trained, seed)
    if info is None:
        raise convert.CheckpointError(
            f"{input_path} holds no MiT or ResNet encoder under prefix {prefix!r}: {convert.describe_checkpoint(shapes)}. "
            "Expected an official SegFormer mit_b*.pth, a DAFormer / HRDA / PiPa checkpoint, a DeepLab / "
            "torchvision ResNet or a DACS checkpoint")
    if not info["backbone"].startswith("mit_"):   # a registered variant, not a description
        raise convert.CheckpointError(f"{input_path}: unsupported encoder {info['backbone']}")
    if info["decode_head"] == "unknown":
        raise convert.CheckpointError(
            f"{input_path}: an HRDA checkpoint whose decode_head.head is not a DAFormer head "
            f"({convert.describe_checkpoint(shapes)}); pipa_jax's HRDA runs the DAFormer head")
    config = default_model_config()
    config.backbone = info["backbone"]
    config.segmentor = info["segmentor"]
    if info["segmentor"] == "hrda":
        if hrda_settings is not None:
            config.hrda.update(dict(hrda_settings))
        config.hrda.attention_classwise = info["attention_classes"] != 1
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
              "loaded_tensors": len(report.loaded), "skipped_training_only": report.skipped,
              "initialised_not_loaded": [] if info["decode_head"] else ["decode_head", "pixel_head", "patch_head"]}
    model_io.save_model(output_dir, model, config, source=source)
    return {"config": config.to_dict(), **source}


def _convert_resnet(ckpt, shapes, input_path, output_dir, prefix, which, trained, seed) -> dict:
    """DeepLabV2 (DACS checkpoints, the COCO init) or a bare torchvision ImageNet ResNet."""
    info = convert.detect_resnet(shapes, prefix)
    if not info["backbone"].startswith("resnet"):
        raise convert.CheckpointError(f"{input_path}: unsupported encoder {info['backbone']} "
                                      "(pipa_jax builds resnet50 = (3, 4, 6, 3) and resnet101 = (3, 4, 23, 3))")
    config = default_model_config()
    config.backbone = info["backbone"]
    config.decode_head = "deeplabv2"
    config.pixel_head = config.patch_head = False
    # torchvision's ImageNet files (with their `fc`) were trained on ImageNet-normalised RGB; the
    # DeepLab / DACS files on BGR minus the Caffe mean. (torchvision's stride sits on the 3x3 conv;
    # its weights still run in the DeepLab graph, as ProDA does.)
    config.resnet.input_convention = "imagenet_rgb" if info["classifier"] == "fc" else "caffe_bgr"
    # A 19-class DeepLabV2 classifier loads with the model; any other (the COCO init's) stays at init.
    with_head = info["decode_head"] == "deeplabv2" and trained
    if with_head:
        config.num_classes = int(info["num_classes"])
    model = build_segmentor(config, seed=seed)
    report = convert.load_torch_weights(model if with_head else model.backbone, ckpt, prefix=prefix)
    source = {"input": input_path, "prefix": prefix, "which": which if trained else "pretrained_encoder",
              "loaded_tensors": len(report.loaded), "skipped_training_only": report.skipped,
              "initialised_not_loaded": [] if with_head else ["decode_head"],
              "input_convention": config.resnet.input_convention}
    model_io.save_model(output_dir, model, config, source=source)
    return {"config": config.to_dict(), **source}


FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "Official checkpoint (.pth, .npz or .safetensors).")
flags.DEFINE_string("output", None, "Output model directory.")
flags.DEFINE_enum("which", "student", list(PREFIXES), "Which network of a trained checkpoint.")
flags.DEFINE_integer("seed", 0, "Seed for parts that are initialised, not loaded.")
config_flags.DEFINE_config_file("config", None, "HRDA checkpoints: a config file (with an optional ':variant') "
                                "whose model.hrda settings (crop sizes, strides, loss weights) the model keeps.")


def main(argv):
    del argv
    if not FLAGS.input or not FLAGS.output:
        raise app.UsageError("--input and --output are required")
    try:
        hrda = FLAGS.config.model.hrda if FLAGS.config is not None else None
        summary = convert_file(FLAGS.input, FLAGS.output, FLAGS.which, FLAGS.seed, hrda_settings=hrda)
    except (convert.CheckpointError, FileNotFoundError, ImportError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    kind = " (HRDA)" if summary["config"]["segmentor"] == "hrda" else ""
    print(f"wrote {FLAGS.output}: {summary['config']['backbone']} + {summary['config']['decode_head']} head{kind}, "
          f"{summary['loaded_tensors']} tensors from {summary['input']} (prefix {summary['prefix']!r})")
    if summary["skipped_training_only"]:
        print(f"left out {len(summary['skipped_training_only'])} training-only tensors: "
              + ", ".join(summary["skipped_training_only"][:6]) + (" ..." if len(summary["skipped_training_only"]) > 6 else ""))
    return 0


if __name__ == "__main__":
    app.run(main)
