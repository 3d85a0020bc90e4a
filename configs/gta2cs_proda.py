"""GTA5 -> Cityscapes: ProDA (CVPR 2021, 57.5 mIoU) on its DeepLabV2-ResNet-101, stage by stage.

  python -m pipa_jax.proda run --config configs/gta2cs_proda.py --workdir runs/proda \
      --config.data.source_root=/data/gta --config.data.target_root=/data/cityscapes \
      --config.model.pretrained=resnet101-imagenet.pth
runs every stage in order in one workdir (warmup/, prototypes.npz, stage1/, stage2/, stage3/),
resuming wherever it stopped. One stage alone: `python -m pipa_jax.main --config
configs/gta2cs_proda.py:stage=stage1 --workdir ... --config.init_from=... --config.proda.frozen_from=...
--config.proda.prototypes=...` (`run` fills these in). The pretrained file is a torchvision ImageNet
resnet101 (its fc is skipped); ProDA feeds it RGB in [0, 1] without mean or std, as here.

Options (after the colon): stage=warmup (default) | stage1 | stage2 | stage3; warmup=adversarial
(default) | source_only; kd_bug (the official distillation, softmax for log_softmax); smoke (a few
steps of a ResNet-50 at 64x64 crops on tiny images: CI on fake layouts, not results).

The recipe (docs/method.md §15), per stage:
- warm-up: source CE + 0.01 x LS-GAN on the target softmax (FCDiscriminator, Adam 1e-4, betas
  0.9 / 0.99), BN frozen (running statistics, affine not trained: --freeze_bn), SGD 2.5e-4 with the
  classifier 10x and the official repeated backbone updates, weight decay 2e-4;
- stage 1: from the warm-up; EMA teacher (0.999, no ramp, in training mode); soft pseudo-labels of
  the frozen warm-up model rectified by prototype weights (T = 1); 0.1 CE + 1.0 RCE; 0.1 x MRKLD
  regulariser; 10 x prototype consistency (weak teacher vs strong student); moving prototypes
  (momentum 1e-4); SGD 1e-4 in ONE group (no 10x, no repeats), weight decay 2e-4, BN trained;
- stages 2-3: student from ImageNet (stage 2) or stage 2 (stage 3), frozen teacher = the previous
  stage; CE on its flip-averaged hard pseudo-labels (confidence > 0.95) of the strong view + 1 x KD;
  SGD 6e-4, classifier 10x, the repeated updates, weight decay 2e-4.
All stages: batch 4 + 4, 896x512 crops, flip, poly 0.9 over 90k steps stopped at 62,412 (84
epochs of 743 target batches), Cityscapes val at full resolution every 1000 steps.

Deviations from the official code, and why:
- Resize: the official RandomSized(2200) draws a width in [1100, 3300] per image; pipa_jax's
  pipeline resizes to one size, so images are resized to the mean scale (2200 wide) before the
  crop.
- The strong view: RandAugment (14 ops, geometric ones with label warping) is replaced by the
  DACS colour jitter + blur and FixMatch's cutout; with no geometric change no label or feature
  needs warping (the cutout area is ignored, as the official warping sets it to 250).
- Pseudo-labels are computed on the fly by the frozen network on the weak crop instead of being
  written once over the full frame (7.5 GB of soft labels for GTA5 -> Cityscapes); the EMA
  teacher too sees the weak crop, not the full 2048x1024 frame (a quarter of its compute).
- The EMA's BatchNorm statistics are the student's (copied, as the official code), its dropout on.
- SimCLR students (--student_init simclr, --bn_clr) are not provided: stage 2 starts from the
  ImageNet weights of model.pretrained.
"""
from pipa_jax import config as config_lib

STAGES = ("warmup", "stage1", "stage2", "stage3")
TOTAL_STEPS = 62412          # 84 epochs x 743 target batches of 4
SCHEDULE_STEPS = 90000       # --train_iters: the poly decay's horizon


def build(source: str, source_size: tuple, arg: str, *, regular_weight: float, miou_subsets=(19,)):
    opts = config_lib.parse_options(arg, stage="warmup", warmup="adversarial", kd_bug=False, smoke=False)
    if opts.stage not in STAGES:
        raise ValueError(f"stage={opts.stage}: expected one of {', '.join(STAGES)}")
    c = config_lib.base_config()
    c.total_steps = TOTAL_STEPS
    c.batch_size = 4
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.log_every = 50

    m = c.model
    m.backbone, m.decode_head = "resnet101", "proda"
    m.dropout = 0.1
    m.pixel_head = m.patch_head = False
    m.resnet.input_convention = "unit_rgb"
    m.resnet.frozen_bn_affine = opts.stage == "warmup"       # --freeze_bn in the warm-up only
    m.resnet.frozen_bn_stats = opts.stage == "warmup"
    m.resnet.bn_weight_decay = True
    m.require_pretrained = opts.stage in ("warmup", "stage2")

    d = c.data
    d.source, d.target, d.format = source, "cityscapes", "files"
    d.source_size = tuple(source_size)
    d.target_size = (2200, 1100)
    d.crop_size = (512, 896)
    d.source_cat_max_ratio = 1.0
    d.flip = True
    d.rcs.enabled = False
    d.eval_batch_size = 4
    d.workers = 4
    c.eval.mode = "whole"
    c.eval.miou_subsets = tuple(miou_subsets)

    o = c.optimizer
    o.name = "sgd"
    o.momentum = 0.9
    o.weight_decay = 2e-4
    o.warmup_steps = 0
    o.poly_power = 0.9
    o.schedule_steps = SCHEDULE_STEPS
    if opts.stage == "stage1":
        o.learning_rate, o.head_lr_mult, o.sgd_duplicate_updates = 1e-4, 1.0, False
    else:
        o.learning_rate = 2.5e-4 if opts.stage == "warmup" else 6e-4
        o.head_lr_mult, o.sgd_duplicate_updates = 10.0, True

    u = c.uda
    u.fd = False
    u.target_supervised = False
    u.source_ce_average = "valid"             # ProDA's cross_entropy2d: mean over labelled pixels
    u.self_training = opts.stage == "stage1"  # stage 1's EMA teacher
    u.class_mix = False
    u.ema_alpha = 0.999
    u.ema_ramp = False
    u.margin_top = u.margin_bottom = 0
    u.jitter_p, u.jitter_strength, u.blur_p = 0.2, 0.25, 0.5   # the strong view's colour change
    c.pipa.pixel.enabled = c.pipa.patch.enabled = False
    c.mic.enabled = False

    p = c.proda
    p.stage = opts.stage
    p.warmup = opts.warmup
    p.regular_weight = regular_weight
    p.kd_softmax_bug = opts.kd_bug

    if opts.smoke:
        config_lib.resnet_smoke(c, total_steps=2, log_every=1)
        c.batch_size = 2
        o.schedule_steps = 0
        p.prototype_passes = 1
    return c


def get_config(arg: str = ""):
    # GTA5 keeps its native 1914x1052 frames in ProDA; resized here to the RandomSized mean (2200 wide).
    return build("gta", (2200, 1209), arg, regular_weight=0.1)
