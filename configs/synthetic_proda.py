"""ProDA on the procedural synthetic domain pair (no downloads), every stage in one workdir:

  python -m pipa_jax.proda run --config configs/synthetic_proda.py --workdir runs/proda_demo

ProDA's network (DeepLabV2 with its GroupNorm + SE head) on a reduced dilated ResNet (resnet14:
one bottleneck per stage, same stem, dilations and widths) from random weights; the synthetic
pair's sizes and data follow configs/synthetic.py. Schedule: 400 warm-up steps, then 100 per
stage, 700 in all (DACS on ResNet-50 in configs/synthetic.py: 500). Measured on a 2-core CPU, one
run alone: 1.16 s a warm-up step once the head's dilation-12/18/24 branches, which on the 12 x 12
map read nothing but padding off their centre, run as 1x1 convolutions (layers.Conv2d drops such
taps exactly; 2.08 s before). Options: stage=warmup|stage1|stage2|stage3 (what
`pipa_jax.main` runs alone; `pipa_jax.proda run` sets it per stage), warmup=adversarial|
source_only, backbone=resnet14|resnet50, kd_bug, tiny (a few steps at 64x64: CI).
"""
from pipa_jax import config as config_lib

_synthetic = config_lib.sibling_config(__file__, "synthetic.py")
_proda = config_lib.sibling_config(__file__, "gta2cs_proda.py")

# From random weights SGD's rates are raised as configs/synthetic.py raises DACS's (x10 over the
# official 2.5e-4 warm-up rate). Stage steps: the warm-up learns the source, the stages adapt.
WARMUP_STEPS, STAGE_STEPS = 400, 100
LR = {"warmup": 2.5e-3, "stage1": 1e-3, "stage2": 2.5e-3, "stage3": 2.5e-3}


def get_config(arg: str = ""):
    opts = config_lib.parse_options(arg, stage="warmup", warmup="adversarial", backbone="resnet14", kd_bug=False,
                                    tiny=False)
    proda = _proda.build("gta", (1, 1), f"stage={opts.stage},warmup={opts.warmup}" + (",kd_bug" if opts.kd_bug else ""),
                         regular_weight=0.1)
    c = _synthetic.get_config("method=source_only" + (",tiny" if opts.tiny else ""))
    # ProDA's network, losses and optimizer groups from the real recipe; the synthetic data setup.
    for group in ("proda", "optimizer"):
        c[group] = proda[group]
    for key in ("self_training", "class_mix", "ema_alpha", "ema_ramp", "source_ce_average", "fd",
                "jitter_p", "jitter_strength", "blur_p"):
        c.uda[key] = proda.uda[key]
    c.model.backbone, c.model.decode_head = opts.backbone, "proda"
    c.model.resnet = proda.model.resnet
    # From random weights BatchNorm must learn: the official warm-up's frozen BN (--freeze_bn, on
    # ImageNet statistics) would freeze the random init's mean 0 / variance 1 here.
    c.model.resnet.frozen_bn_affine = c.model.resnet.frozen_bn_stats = False
    c.model.pixel_head = c.model.patch_head = False
    c.model.require_pretrained = False
    c.data.flip = True
    c.optimizer.learning_rate = LR[opts.stage]
    c.optimizer.schedule_steps = 0
    c.total_steps = WARMUP_STEPS if opts.stage == "warmup" else STAGE_STEPS
    c.eval_every = c.checkpoint_every = c.total_steps
    c.proda.prototype_passes = 1
    c.uda.ema_alpha = 0.99                    # as configs/synthetic.py: ~100 steps of a short run
    if opts.tiny:
        c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 2, 1, 2, 0
        c.data.num_train = 8
        c.proda.proto_min_pixels = 1
    return c
