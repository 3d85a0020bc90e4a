"""GTA5 -> Cityscapes with HRDA (multi-resolution), HRDA + PiPa, and the source-only baseline.

  python -m pipa_jax.main --config configs/gta2cs_hrda.py:method=pipa --workdir runs/gta2cs_hrda_pipa \
      --config.data.source_root=/data/gta --config.data.target_root=/data/cityscapes \
      --config.model.pretrained=pretrained/mit_b5
  python -m pipa_jax.evaluate --workdir runs/gta2cs_hrda_pipa
Prepare the roots once (python -m pipa_jax.tools.prepare_data gta /data/gta, and cityscapes) and
convert the ImageNet encoder once (python -m pipa_jax.tools.convert_checkpoint --input mit_b5.pth
--output pretrained/mit_b5).

Variants (after the colon, comma-separated):
  method=hrda         HRDA: self-training on the multi-resolution segmentor, FD, RCS: 40k steps,
                      evaluation every 4000 (published 73.8 mIoU)
  method=pipa         HRDA + PiPa: + pixel contrast (0.1) + patch contrast (0.01 from step 10000):
                      60k steps, evaluation every 5000 (published 75.6) - the default
  method=source_only  the HRDA segmentor trained on GTA5 only, no RCS: 40k steps
  method=mic          MIC(HRDA): HRDA + masked image consistency on the target (blocks of 64 at full
                      resolution, 70 % masked, weight 1): 40k steps (published 75.9 / 67.3)
  method=pipa_mic     HRDA + PiPa + MIC (no official code runs both): PiPa's 60k steps
  smoke               a few steps of an HRDA on mit_tiny at 64x64 crops, for CI on fake layouts

The recipe (docs/method.md §6, §8): GTA resized into 2560x1440 (1914x1052 -> 2560x1407),
Cityscapes kept at 2048x1024, 1024x1024 crops (the source's redrawn until no class covers 75 %),
flips; context = the crop at 0.5x, detail = a 512x512 crop, offsets multiples of 8; fused CE 0.9 +
detail CE 0.1; the teacher's pseudo-labels from its full two-scale inference (detail windows 512
every 256) with BatchNorm on batch statistics; pseudo-label margins (30, 240, 30, 30) on the
2048x1024 target frame, carried through crop and flip; FD on the source's context features; RCS
T = 0.01 with min crop ratio 2.0; AdamW 6e-5, head x10, warm-up 1500, poly; EMA 0.999; batch 2 + 2;
test on 2048x1024 in 1024x1024 windows every 512, logits averaged.

Every setting that differs from the official code, and why:
- model.dtype = 'bfloat16' for compute (parameters, optimizer state, softmax, losses and EMA stay
  float32); float32 reproduces the official arithmetic. HRDA's official runs fill a 24 GB GPU.
- HRDA + PiPa's pixel contrast reads the student's detail-crop features with the source label cut by
  the same box (docs/method.md §6.6). The official PiPa-HRDA code pairs the detail features with the
  label of the whole crop (misaligned, 4x the area), treats 255 as a class and splits hard / easy
  anchors with an untrained classifier.
- HRDA + PiPa's patch contrast runs two 768x768 crops of the mixed image through the student with
  gradients and reads the context view's decoder features (stride 8; the patch head pools them to
  stride 16, so crop offsets are multiples of 16). The official code runs the detached EMA teacher on
  two 720x720 crops of one re-loaded Cityscapes image, so its loss trains only an unused projector,
  and its overlap indexing assumes stride 8 on a stride-2 map (docs/method.md §5).
- Resume continues exactly (step, EMA teacher, patch warm-up, data order); the official code resets
  the UDA step counter on resume.
- Deterministic data order and augmentation (grain, seeded); the official runs use cudnn benchmark.
- Checkpoints every 2000 steps (2 kept) so that preempted runs resume: bookkeeping only.
- MIC: its weight multiplies the whole masked HRDA loss (fused 0.9 + detail 0.1); the official
  mask_lambda multiplies only the fused part, which is the same thing at the published lambda = 1.
  MIC's official runs use seed 2; the seed here is a config field like any other.
"""
import importlib.util
import os

from pipa_jax import config as config_lib

_spec = importlib.util.spec_from_file_location(
    "pipa_jax_configs_gta2cs", os.path.join(os.path.dirname(os.path.abspath(__file__)), "gta2cs.py"))
_gta2cs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gta2cs)

# method -> (the framework method of config.apply_method, steps, evaluation interval)
METHODS = {"hrda": ("daformer", 40000, 4000), "pipa": ("pipa", 60000, 5000), "source_only": ("source_only", 40000, 4000),
           "mic": ("mic", 40000, 4000), "pipa_mic": ("pipa_mic", 60000, 5000)}


def build_hrda(source: str, source_size: tuple, arg: str):
    """The HRDA recipe for `source` ('gta' or 'synthia') -> Cityscapes; `arg` holds the variants."""
    opts = config_lib.parse_options(arg, method="pipa", smoke=False)
    if opts.method not in METHODS:
        raise ValueError(f"method={opts.method}: expected one of {', '.join(METHODS)}")
    framework, steps, eval_every = METHODS[opts.method]
    # The DAFormer recipe of configs/gta2cs.py (optimizer, EMA, thresholds, FD, PiPa weights), then
    # what HRDA changes.
    c = _gta2cs.build(source, source_size, f"method={framework},res=512" + (",smoke" if opts.smoke else ""),
                      default_res_pipa=512, rcs_temperature_daformer=0.01)
    c.model.segmentor = "hrda"
    c.model.hrda.context_scale = 0.5
    c.model.hrda.hr_crop_size = (512, 512)
    c.model.hrda.crop_coord_divisible = 8
    c.model.hrda.hr_loss_weight = 0.1
    c.model.hrda.lr_loss_weight = 0.0
    c.model.hrda.hr_slide_stride = (256, 256)
    c.total_steps = steps
    c.eval_every = eval_every
    c.data.source_size = tuple(source_size)
    c.data.target_size = (2048, 1024)
    c.data.crop_size = (1024, 1024)
    c.data.target_valid_margins = (30, 240, 30, 30)   # on the 2048x1024 frame, before crop and flip
    c.uda.margin_top = 0                               # (DAFormer's crop margins are not used)
    c.uda.margin_bottom = 0
    c.data.rcs.temperature = 0.01                      # HRDA and PiPa-HRDA
    c.data.rcs.min_crop_ratio = 2.0
    c.data.eval_batch_size = 2
    c.eval.mode = "slide"
    c.eval.crop_size = (1024, 1024)
    c.eval.stride = (512, 512)
    c.pipa.patch.weight = 0.01
    c.pipa.patch.start_step = 10000
    c.pipa.patch.crop_size = (768, 768)
    c.mic.block_size = 64                             # MIC(HRDA): full resolution
    c.mic.mask_ratio = 0.7
    if opts.smoke:
        # CI on fake layouts: tiny images and a tiny HRDA; the numbers mean nothing.
        c.total_steps = 4
        c.eval_every = 0
        c.model.hrda.hr_crop_size = (32, 32)
        c.model.hrda.hr_slide_stride = (16, 16)
        c.data.source_size = (128, 64)
        c.data.target_size = (128, 64)
        c.data.crop_size = (64, 64)
        c.data.target_valid_margins = (2, 8, 2, 2)
        c.data.rcs.min_crop_ratio = 0.0
        c.eval.crop_size = (64, 64)
        c.eval.stride = (32, 32)
        c.pipa.patch.crop_size = (64, 64)       # HRDA's context view of it (32x32) is MiT's smallest input
        c.pipa.patch.start_step = 0
        c.mic.block_size = 4
    return c


def get_config(arg: str = ""):
    return build_hrda("gta", (2560, 1440), arg)
