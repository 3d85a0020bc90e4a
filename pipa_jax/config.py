"""The configuration schema: every field pipa_jax reads, with its default and meaning.

Config files in configs/ start from `base_config()` and override; the library reads
hyperparameters only from the config. Defaults are the DAFormer + PiPa recipe (METHOD.md §3-5).
"""
from __future__ import annotations

import ml_collections

from pipa_jax.models import default_model_config

METHODS = ("source_only", "dacs", "daformer", "pipa", "pixel_only", "patch_only", "oracle")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0                    # one seed for init, data order and every random draw of the step
    c.total_steps = 60000         # optimizer steps (PiPa's released configs: 60k; DAFormer 40k)
    c.batch_size = 2              # images per domain per step, global over all devices/hosts
    c.log_every = 50              # steps between metric logs (metrics leave the device only then)
    c.eval_every = 4000           # steps between evaluations on the target validation split (0: end only)
    c.checkpoint_every = 2000     # steps between checkpoints (always one at the end and on SIGTERM)
    c.keep_checkpoints = 2        # most recent checkpoints kept
    c.mesh_shape = -1             # devices on the 'data' axis; -1 = all devices
    # XLA's persistent compilation cache: a resumed or repeated run skips recompiling the step
    # (minutes for MiT-b5). '' disables it.
    c.compilation_cache_dir = "~/.cache/pipa_jax/xla"

    c.model = default_model_config()

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic_source"   # 'synthetic_source' (later: 'gta', 'synthia')
    c.data.target = "synthetic_target"   # 'synthetic_target' (later: 'cityscapes')
    c.data.crop_size = (512, 512)        # training crop (height, width)
    c.data.image_size = (256, 512)       # synthetic sources: rendered (height, width)
    c.data.num_train = 2000              # synthetic sources: examples per domain (train split)
    c.data.num_val = 100                 # synthetic target: validation examples
    c.data.flip = True                   # random horizontal flip p=0.5
    c.data.eval_batch_size = 4           # global
    c.data.prefetch = 2                  # batches prepared ahead by host threads

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 6e-5
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.01
    c.optimizer.head_lr_mult = 10.0      # decoder and PiPa heads learn 10x faster
    c.optimizer.encoder_norm_decay = False  # no weight decay on encoder LayerNorms (official paramwise_cfg)
    c.optimizer.warmup_steps = 1500
    c.optimizer.warmup_ratio = 1e-6      # linear warmup starts at lr * ratio
    c.optimizer.poly_power = 1.0         # (1 - t/T)^power, multiplied with the warmup

    c.uda = ml_collections.ConfigDict()
    c.uda.self_training = True           # EMA teacher + pseudo-labels + mixing (False: source-only)
    c.uda.ema_alpha = 0.999
    c.uda.pseudo_threshold = 0.968
    c.uda.margin_top = 15                # pseudo-label weight 0 on the top rows of the target crop
    c.uda.margin_bottom = 120            # ... and on the bottom rows (DAFormer: the ego vehicle)
    c.uda.mix_ignore_class = True        # official ClassMix quirk: 255 counts as a class to paste
    c.uda.strong_augment = True          # colour jitter + Gaussian blur on the mixed images
    c.uda.jitter_p = 0.2
    c.uda.jitter_strength = 0.2
    c.uda.blur_p = 0.5
    c.uda.fd = True                      # ImageNet feature distance on thing classes
    c.uda.fd_weight = 0.005
    c.uda.fd_min_ratio = 0.75
    c.uda.target_supervised = False      # oracle: train on target labels (the upper bound)

    c.pipa = ml_collections.ConfigDict()
    c.pipa.pixel = ml_collections.ConfigDict()
    c.pipa.pixel.enabled = True
    c.pipa.pixel.weight = 0.1
    c.pipa.pixel.temperature = 0.1
    c.pipa.pixel.base_temperature = 0.07
    c.pipa.pixel.max_samples = 1024
    c.pipa.pixel.max_views = 100
    c.pipa.pixel.min_pixels = 100
    c.pipa.pixel.include_ignore_class = False  # True reproduces the official quirk
    c.pipa.patch = ml_collections.ConfigDict()
    c.pipa.patch.enabled = True
    c.pipa.patch.weight = 0.1            # 0.1 DAFormer, 0.01 HRDA
    c.pipa.patch.start_step = 10000
    c.pipa.patch.crop_size = (384, 384)  # the two overlapping crops (multiples of 8)
    c.pipa.patch.iou_range = (0.1, 1.0)
    c.pipa.patch.temperature = 0.1
    c.pipa.patch.confidence_threshold = 0.9
    c.pipa.patch.bank_steps = 2          # FIFO bank: detached cells of the last N steps
    c.pipa.patch.bank_cells = 1600       # cells pushed per crop per step
    c.pipa.patch.flip = True             # independent flips of the two crops
    c.pipa.patch.chunk_size = 256
    return c


def apply_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """Switches the loss terms for a named method (one config file serves all of them)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    st = method not in ("source_only", "oracle")
    c.uda.self_training = st
    c.uda.fd = method in ("daformer", "pipa", "pixel_only", "patch_only")
    c.uda.target_supervised = method == "oracle"
    c.pipa.pixel.enabled = method in ("pipa", "pixel_only")
    c.pipa.patch.enabled = method in ("pipa", "patch_only")
    c.model.pixel_head = c.pipa.pixel.enabled
    c.model.patch_head = c.pipa.patch.enabled
    return c


def validate(c: ml_collections.ConfigDict, num_devices: int) -> None:
    """Clear errors for config values that cannot work, before anything is built."""
    def err(key, value, expected):
        raise ValueError(f"config.{key} = {value!r}: expected {expected}")
    for key in ("total_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        if int(c[key]) <= 0:
            err(key, c[key], "a positive integer")
    mesh = num_devices if c.mesh_shape == -1 else c.mesh_shape
    if mesh <= 0 or num_devices % mesh:
        err("mesh_shape", c.mesh_shape, f"-1 or a divisor of the {num_devices} devices")
    if c.batch_size % mesh:
        err("batch_size", c.batch_size, f"a multiple of the {mesh} devices on the data axis "
            f"(e.g. {mesh * max(1, c.batch_size // mesh)}), or set --config.mesh_shape")
    if c.data.eval_batch_size % mesh:
        err("data.eval_batch_size", c.data.eval_batch_size, f"a multiple of the {mesh} devices")
    ch, cw = c.data.crop_size
    if ch % 32 or cw % 32:
        err("data.crop_size", tuple(c.data.crop_size), "multiples of 32 (the encoder's output stride)")
    if c.pipa.patch.enabled:
        ph, pw = c.pipa.patch.crop_size
        if ph % 32 or pw % 32 or ph > ch or pw > cw:
            err("pipa.patch.crop_size", tuple(c.pipa.patch.crop_size),
                f"multiples of 32 no larger than data.crop_size {tuple(c.data.crop_size)}")
        if not c.model.patch_head:
            err("model.patch_head", False, "True when pipa.patch.enabled")
        if not c.uda.self_training:
            # The patch term contrasts crops of the mixed image, which only self-training makes.
            err("pipa.patch.enabled", True, "False when uda.self_training is False (it needs the mixed image)")
    if c.pipa.pixel.enabled and not c.model.pixel_head:
        err("model.pixel_head", False, "True when pipa.pixel.enabled")
    if not 0 < c.uda.ema_alpha < 1:
        err("uda.ema_alpha", c.uda.ema_alpha, "a value in (0, 1)")
    if c.model.num_classes != 19:
        err("model.num_classes", c.model.num_classes, "19 (Cityscapes train ids)")
