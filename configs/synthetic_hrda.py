"""HRDA and HRDA + PiPa on a higher-resolution synthetic domain pair (no downloads).

  python -m pipa_jax.main --config configs/synthetic_hrda.py:method=pipa --workdir runs/demo_hrda
Variants: method=source_only|hrda|pipa|oracle|daformer|mic|pipa_mic, and `tiny` (a few steps at
64x64 crops on mit_tiny, used by the tests), e.g. configs/synthetic_hrda.py:method=pipa,tiny

The scenes of configs/synthetic.py rendered at twice its resolution (192x384), where thin poles,
traffic lights and signs, and distant people are a few pixels wide and a half-resolution model
loses them. Traffic lights and signs are drawn here (configs/synthetic.py leaves them out).
- hrda / pipa / source_only / oracle: the HRDA segmentor (MiT-b0) on 192x192 crops: context = the
  crop at 96x96, detail = a 96x96 crop at full resolution; test on the 192x384 val images in
  192x192 windows every 96 (detail windows 96 every 48 inside each).
- daformer: the single-scale DAFormer network at the SAME number of student pixels per view: the
  scenes resized to 96x192 (half resolution) and 96x192 crops (HRDA: 96x96 context + 96x96 detail),
  tested on the 96x192 images with logits upsampled to the 192x384 labels (the DAFormer protocol
  on Cityscapes, 1024x512 against 2048x1024 labels).
- mic / pipa_mic: MIC(HRDA) and HRDA + PiPa + MIC; MIC's blocks are 12x12 at full resolution (16
  across the 192x192 crop, as 64 across MIC(HRDA)'s 1024 crops).
Everything else is the embedded default's (configs/synthetic.py): 2 + 2 images a step, 1000 steps,
random initialisation, EMA 0.99, RCS (min crop ratio 2.0 for HRDA, as the recipe).
"""
import importlib.util
import os

from pipa_jax import config as config_lib

_spec = importlib.util.spec_from_file_location(
    "pipa_jax_configs_synthetic", os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic.py"))
_synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synthetic)

# method -> the framework method (config.apply_method) and whether the HRDA segmentor is used
METHODS = {"source_only": ("source_only", True), "hrda": ("daformer", True), "pipa": ("pipa", True),
           "oracle": ("oracle", True), "daformer": ("daformer", False), "mic": ("mic", True),
           "pipa_mic": ("pipa_mic", True)}


def get_config(arg: str = ""):
    opts = config_lib.parse_options(arg, method="pipa", tiny=False)
    if opts.method not in METHODS:
        raise ValueError(f"method={opts.method}: expected one of {', '.join(METHODS)}")
    framework, hrda = METHODS[opts.method]
    c = _synthetic.get_config(f"method={framework}" + (",tiny" if opts.tiny else ""))
    c.data.image_size = (192, 384)
    c.data.synthetic_omit_classes = ("wall", "fence", "train", "motorcycle")
    c.data.rcs.min_pixels = 200          # class statistics at 192x384 (the default's 50 at 96x192)
    c.pipa.patch.weight = 0.01           # HRDA + PiPa's weight
    if hrda:
        c.model.segmentor = "hrda"
        c.model.hrda.hr_crop_size = (96, 96)
        c.model.hrda.hr_slide_stride = (48, 48)
        c.data.crop_size = (192, 192)
        c.data.rcs.min_crop_ratio = 2.0
        c.eval.mode = "slide"
        c.eval.crop_size = (192, 192)
        c.eval.stride = (96, 96)
        c.pipa.patch.crop_size = (128, 128)
        c.mic.block_size = 12
    else:
        c.data.synthetic_scale = 0.5
        c.data.crop_size = (96, 192)
    if opts.tiny:
        c.data.image_size = (64, 128)
        c.data.rcs.min_pixels = 10
        c.data.rcs.min_crop_ratio = 0.0
        c.data.crop_size = (64, 64) if hrda else (32, 64)
        c.model.hrda.hr_crop_size = (32, 32)
        c.model.hrda.hr_slide_stride = (16, 16)
        c.eval.crop_size = (64, 64)
        c.eval.stride = (32, 32)
        c.pipa.patch.crop_size = (64, 64)       # HRDA's context view of it (32x32) is MiT's smallest input
        c.mic.block_size = 4
    return c
