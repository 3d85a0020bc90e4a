"""The configuration schema: every field pipa_jax reads, with its default and meaning.

Config files in configs/ start from `base_config()` and override; the library reads
hyperparameters only from the config. Defaults are the DAFormer + PiPa recipe (docs/method.md §3-5).
Config files parse their variants (`configs/x.py:method=pipa,tiny`) with `parse_options`.
"""
from __future__ import annotations

import os

import jax
import ml_collections

from pipa_jax.models import default_model_config

METHODS = ("source_only", "dacs", "daformer", "pipa", "pixel_only", "patch_only", "oracle", "mic", "pipa_mic")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0                    # one seed for init, data order and every random draw of the step
    c.total_steps = 60000         # optimizer steps (PiPa's released configs: 60k; DAFormer 40k)
    c.batch_size = 2              # images per domain per step, global over all devices/hosts
    c.log_every = 50              # steps between metric logs (metrics leave the device only then)
    c.eval_every = 4000           # steps between evaluations on the target validation split (0: end only)
    c.checkpoint_every = 2000     # steps between checkpoints (always one at the end and on SIGTERM)
    c.keep_checkpoints = 2        # most recent checkpoints kept
    c.mesh_shape = -1             # devices in the training mesh; -1 = all devices
    # Spatial partitioning: k > 1 gives a ('data', 'spatial') mesh of mesh_shape/k x k devices, with
    # every image, label and mask split along its height into k bands (pipa_jax.mesh), so the
    # released 2 + 2 recipe runs on 2k devices with the same result. 1 = data parallelism only.
    c.mesh_spatial = 1
    # XLA's persistent compilation cache: a resumed or repeated run skips recompiling the step
    # (minutes for MiT-b5). '' disables it.
    c.compilation_cache_dir = "~/.cache/pipa_jax/xla"
    # 'auto' | 'cond' | 'mask': how a loss term with a start step (the patch contrast) is switched on
    # (pipa_jax.terms.resolve_gate); 'auto' = mask on CPU, where XLA runs a conditional's branch far
    # slower, cond elsewhere. Both give the same updates.
    c.term_gate = "auto"
    # Profiling: a trace of profile_steps steps every profile_every steps into the workdir
    # (TensorBoard's profile tab; clu.periodic_actions.Profile), 0 = off.
    c.profile_every = 0
    c.profile_steps = 5
    # jax.transfer_guard level around the training steps ('' = JAX's default; 'disallow' or 'log'
    # proves that the loop moves data only where it says so: batches in, metrics out at log steps).
    c.loop_transfer_guard = ""

    c.model = default_model_config()
    # ImageNet-pretrained encoder to start from: a model directory written by
    # tools.convert_checkpoint, or an official mit_b*.pth. '' = random initialisation.
    c.model.pretrained = ""
    c.model.require_pretrained = False   # True: refuse to start without model.pretrained
    # The whole network (student; the EMA teacher starts as its copy) from a pipa_jax training
    # workdir (its latest checkpoint's student) or a model directory; '' = model.pretrained / random.
    # ProDA's stage 1 starts from its warm-up, stage 3 from stage 2.
    c.init_from = ""

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic_source"   # 'synthetic_source', 'gta' or 'synthia'
    c.data.target = "synthetic_target"   # 'synthetic_target' or 'cityscapes'
    # Real datasets (docs/method.md §8-9; prepare each root once: python -m pipa_jax.tools.prepare_data).
    c.data.format = "files"              # 'files': the official layouts under the roots below;
                                         # 'tfds': array_record datasets built by pipa_jax.data.tfds_builders
    c.data.source_root = ""              # GTA5 root (images/, labels/) or SYNTHIA root (RGB/, GT/LABELS/)
    c.data.target_root = ""              # Cityscapes root (leftImg8bit/, gtFine/)
    c.data.tfds_data_dir = ""            # format 'tfds': TFDS data_dir ('' = TFDS's default)
    c.data.source_size = (1280, 720)     # keep-ratio resize (long side, short side): GTA 1914x1052 -> 1280x704;
                                         # SYNTHIA recipes use (1280, 760), HRDA (2560, 1440)
    c.data.target_size = (1024, 512)     # Cityscapes train and test resize (long, short); PiPa's release (1280, 640)
    c.data.source_keep_ratio = True      # False: resize the source to exactly source_size (DACS: GTA5 720x1280)
    c.data.target_keep_ratio = True
    c.data.source_cat_max_ratio = 0.75   # source crops redrawn (<= 10x) until no class covers >= this; 1 = off
    c.data.workers = 0                   # grain worker processes (mp_prefetch); 0 = threads in this process.
                                         # GTA-size decoding needs ~4-8 on a GPU/TPU host
    c.data.rcs = ml_collections.ConfigDict()   # Rare Class Sampling on the source (needs prepared statistics)
    c.data.rcs.enabled = False           # True in the GTA5 / SYNTHIA / synthetic self-training recipes
    c.data.rcs.temperature = 0.1         # T in softmax((1 - f_c) / T): PiPa's released DAFormer config 0.1; DAFormer/HRDA 0.01
    c.data.rcs.min_pixels = 3000         # an image is a candidate for class c if it holds > this many pixels of c
    c.data.rcs.min_crop_ratio = 0.5      # re-crop (<= 10x) until > min_pixels * ratio pixels of c (HRDA: 2.0; 0 = off)
    c.data.crop_size = (512, 512)        # training crop (height, width)
    # Pseudo-label margins (top, bottom, left, right) on the target frame before crop and flip, in
    # pixels of the image as delivered (at data.target_size): HRDA / MIC (30, 240, 30, 30) at
    # 2048x1024. () = none (DAFormer uses the crop margins uda.margin_top / margin_bottom instead).
    c.data.target_valid_margins = ()
    c.data.image_size = (256, 512)       # synthetic sources: rendered (height, width)
    c.data.num_train = 2000              # synthetic sources: examples per domain (train split)
    c.data.num_val = 100                 # synthetic target: validation examples
    c.data.synthetic_omit_classes = ()   # synthetic sources: class names never drawn (see
                                         # pipa_jax.data.synthetic.OMITTABLE); () = all 19
    c.data.synthetic_scale = 1.0         # synthetic sources: images resized by this factor after rendering
                                         # (train labels too; val labels stay full-resolution)
    c.data.flip = True                   # random horizontal flip p=0.5
    c.data.eval_batch_size = 4           # global
    c.data.prefetch = 2                  # batches prepared ahead by host threads

    # Evaluation on the target val split and prediction (pipa_jax.inference, docs/method.md §6, §8).
    # The val source delivers images at the test size (data.target_size; pipa_jax.predict resizes
    # any image into the same box) and labels at FULL resolution; logits are computed at the test
    # size, bilinearly upsampled to the label size before the argmax, and one confusion matrix is
    # summed over the whole split.
    c.eval = ml_collections.ConfigDict()
    c.eval.mode = "whole"                # 'whole' (DAFormer, PiPa-DAFormer) or 'slide' (HRDA)
    c.eval.crop_size = (1024, 1024)      # slide: window (height, width) on the test-size image
    c.eval.stride = (512, 512)           # slide: window step (height, width), at most crop_size;
                                         # logits of overlapping windows are averaged
    c.eval.miou_subsets = (19,)          # mIoU rows reported: 19 and SYNTHIA's 16 / 13 classes
    c.eval.labels_at_test_size = False   # True: Cityscapes val labels nearest-resized to the test size (DACS's
                                         # evaluator: half-resolution labels); False: full-resolution labels

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"           # 'adamw' (DAFormer / HRDA / MIC / PiPa) or 'sgd' (DACS / ProDA)
    c.optimizer.learning_rate = 6e-5
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.01
    c.optimizer.head_lr_mult = 10.0      # decoder and PiPa heads learn 10x faster
    c.optimizer.encoder_norm_decay = False  # no weight decay on the encoder's norm parameters (each backbone
                                            # names them: MiT's LayerNorms, official paramwise_cfg)
    c.optimizer.momentum = 0.9           # sgd only
    # sgd only: reproduce the official DACS parameter list, which repeats backbone convs (3x, shortcuts
    # 4x) so that SGD updates them that many times a step (pipa_jax.optim, docs/method.md §14.3).
    c.optimizer.sgd_duplicate_updates = False
    c.optimizer.warmup_steps = 1500
    c.optimizer.warmup_ratio = 1e-6      # linear warmup starts at lr * ratio
    c.optimizer.poly_power = 1.0         # (1 - t/T)^power, multiplied with the warmup
    c.optimizer.schedule_steps = 0       # T of the poly decay; 0 = total_steps (ProDA: 90k, stopping at 62.4k)

    c.uda = ml_collections.ConfigDict()
    c.uda.self_training = True           # EMA teacher + pseudo-labels + mixing (False: source-only)
    c.uda.ema_alpha = 0.999
    c.uda.ema_ramp = True                # alpha = min(1 - 1/(t+1), ema_alpha); False: ema_alpha from step 0 (ProDA)
    c.uda.class_mix = True               # the ClassMix cross-entropy of self-training (False: ProDA, no mixing)
    c.uda.pseudo_threshold = 0.968
    c.uda.margin_top = 15                # pseudo-label weight 0 on the top rows of the target crop
    c.uda.margin_bottom = 120            # ... and on the bottom rows (DAFormer: the ego vehicle)
    c.uda.mix_ignore_class = True        # official ClassMix quirk: 255 counts as a class to paste
    c.uda.source_ce_average = "all"      # source CE over all pixels (mmseg) or 'valid' ones (DACS)
    c.uda.mix_per_image_classes = False  # True: classes drawn from each source image's own labels (DACS);
                                         # False: from the whole source batch (DAFormer / HRDA / MIC / PiPa)
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

    # What a finished run leaves for a person: iou_table.md and predictions.png (pipa_jax.report).
    # MIC: masked image consistency on the target (pipa_jax.terms.mic, docs/method.md §7). Every
    # switch of the official ablations is a field.
    c.mic = ml_collections.ConfigDict()
    c.mic.enabled = False
    c.mic.weight = 1.0                   # lambda of the masked term
    c.mic.mask_ratio = 0.7               # share of masked blocks, in [0, 1)
    c.mic.block_size = 64                # pixels per block side: 64 at HRDA's full resolution, 32 for
                                         # DAFormer's half resolution; must divide the training crop
    c.mic.color_augment = True           # DACS colour jitter + blur before masking ('separatetrgaug')
    c.mic.pseudo_weight = True           # False: weight 1 on every pixel of the masked view

    # ProDA (pipa_jax.terms.proda, docs/method.md §15): stage '' = off (every other method).
    c.proda = ml_collections.ConfigDict()
    c.proda.stage = ""                   # '' | 'warmup' | 'stage1' | 'stage2' | 'stage3'
    c.proda.warmup = "adversarial"       # warm-up: 'adversarial' (output-space LS-GAN) or 'source_only'
    c.proda.adv_weight = 0.01            # the generator's LS-GAN weight (--adv)
    c.proda.disc_lr = 1e-4               # the discriminator's Adam (poly schedule of the run)
    c.proda.disc_b1 = 0.9
    c.proda.disc_b2 = 0.99
    # The frozen network: stage 1 reads the warm-up model's soft pseudo-labels from it, stages 2-3
    # distil from it. A pipa_jax workdir (its latest student) or a model directory.
    c.proda.frozen_from = ""
    c.proda.prototypes = ""              # stage 1: initial prototypes (.npz of `python -m pipa_jax.proda prototypes`)
    c.proda.prototype_passes = 4         # passes of the prototype computation over the target train split
    c.proda.prototype_cap = 3000         # the cumulative mean's count cap (then a running average)
    c.proda.temperature = 1.0            # T of softmax(-d * T) (--proto_temperature)
    c.proda.proto_momentum = 1e-4        # moving prototypes: eta <- (1 - m) eta + m mean
    c.proda.proto_min_pixels = 10        # a class counts in an image from this many pixels
    c.proda.rectify_threshold = 0.0      # --train_thred: rectified confidence below it is ignored (0: none)
    c.proda.rce = True                   # symmetric CE: rce_alpha CE + rce_beta RCE (stage 1)
    c.proda.rce_alpha = 0.1
    c.proda.rce_beta = 1.0
    c.proda.regular_weight = 0.1         # MRKLD regulariser (GTA5 0.1, SYNTHIA 0)
    c.proda.consist_weight = 10.0        # prototype consistency weight (--proto_consistW)
    c.proda.teacher_dropout = True       # the official EMA runs in training mode (dropout on)
    c.proda.cutout = True                # the strong view's grey square (side min(H, W) // 3)
    c.proda.pl_threshold = 0.95          # stages 2-3: hard pseudo-labels need confidence > this
    c.proda.pl_flip = True               # ... averaged with the flipped image's prediction
    c.proda.kd_weight = 1.0              # stages 2-3: the distillation KL (--distillation)
    c.proda.kd_softmax_bug = False       # True: the official KD (softmax where log_softmax is meant)

    c.report = ml_collections.ConfigDict()
    c.report.grid_images = 6             # target val images in predictions.png (0: no picture)
    c.report.tile_width = 256            # pixels per picture column
    c.report.baseline_workdir = ""       # a finished run (e.g. source-only) whose predictions get a column
    return c


def apply_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """Switches the loss terms for a named method (one config file serves all of them)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    st = method not in ("source_only", "oracle")
    c.uda.self_training = st
    c.uda.fd = method in ("daformer", "pipa", "pixel_only", "patch_only", "mic", "pipa_mic")
    c.uda.target_supervised = method == "oracle"
    c.pipa.pixel.enabled = method in ("pipa", "pixel_only", "pipa_mic")
    c.pipa.patch.enabled = method in ("pipa", "patch_only", "pipa_mic")
    c.mic.enabled = method in ("mic", "pipa_mic")
    c.model.pixel_head = c.pipa.pixel.enabled
    c.model.patch_head = c.pipa.patch.enabled
    return c


def sibling_config(this_file: str, name: str):
    """The config module `name` in the folder of `this_file` (config files are loaded by path,
    not imported: the SYNTHIA files build their recipe with their GTA5 counterpart's `build`)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(this_file)), name)
    spec = importlib.util.spec_from_file_location(f"pipa_jax_configs_{os.path.splitext(name)[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resnet_smoke(c: ml_collections.ConfigDict, *, total_steps: int, log_every: int) -> None:
    """The `smoke` variant of the DeepLabV2 recipes (DACS, ProDA): a few steps of a ResNet-50
    from random weights at 64x64 crops of small images on one device, no compilation cache, for
    CI on the fake dataset layouts."""
    c.model.backbone = "resnet50"
    c.model.require_pretrained = False
    d = c.data
    d.source_size = d.target_size = (128, 64)
    d.crop_size = (64, 64)
    d.workers = 0
    d.eval_batch_size = 2
    c.mesh_shape = 1
    c.total_steps, c.log_every = total_steps, log_every
    c.eval_every = 0
    c.checkpoint_every = 2
    c.compilation_cache_dir = ""


def parse_options(arg: str, **spec):
    """The variants of a config file: `arg` = 'name=value,flag,...' (the part after ':' in
    --config=configs/x.py:...) parsed against `spec` (name -> default; the default's type converts
    the value: bool flags are True when named, ints and floats are parsed). Returns a ConfigDict
    of every option, defaults filled in; an unknown option or a bad value is a ValueError that
    lists what the file accepts."""
    opts = ml_collections.ConfigDict(dict(spec))
    accepted = ", ".join(f"{k}=<{type(v).__name__}>" if not isinstance(v, bool) else k for k, v in spec.items())
    for item in (p.strip() for p in (arg or "").split(",")):
        if not item:
            continue
        name, has_value, value = item.partition("=")
        if name not in spec:
            raise ValueError(f"unknown config option {name!r} in {arg!r}; this config accepts {accepted}")
        default = spec[name]
        try:
            if isinstance(default, bool):
                parsed = (value.lower() in ("1", "true", "yes")) if has_value else True
                if has_value and value.lower() not in ("0", "1", "true", "false", "yes", "no"):
                    raise ValueError(value)
            elif isinstance(default, int):
                parsed = int(value)
            elif isinstance(default, float):
                parsed = float(value)
            else:
                parsed = value
        except ValueError:
            raise ValueError(f"config option {item!r}: expected a {type(default).__name__} value") from None
        if not isinstance(default, bool) and not has_value:
            raise ValueError(f"config option {name!r} needs a value ({name}=...); this config accepts {accepted}")
        opts[name] = parsed
    return opts


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
    guards = ("", "allow", "log", "disallow", "log_explicit", "disallow_explicit")
    if c.get("loop_transfer_guard", "") not in guards:
        err("loop_transfer_guard", c.loop_transfer_guard, f"one of {guards}")
    if int(c.get("profile_every", 0)) < 0 or int(c.get("profile_steps", 1)) <= 0:
        err("profile_every / profile_steps", (c.profile_every, c.profile_steps), "profile_every >= 0 (0 = off) and profile_steps > 0")
    n_proc = jax.process_count()
    if n_proc > 1 and mesh != num_devices:
        err("mesh_shape", c.mesh_shape, f"-1 (all {num_devices} devices) with {n_proc} processes: every "
            "process feeds its own devices, so the mesh must span all of them")
    spatial = c.get("mesh_spatial", 1)
    if not isinstance(spatial, int) or spatial < 1 or mesh % spatial:
        err("mesh_spatial", spatial, f"a positive divisor of the mesh's {mesh} devices (1 = no spatial axis)")
    if n_proc > 1 and jax.local_device_count() % spatial:
        err("mesh_spatial", spatial, f"a divisor of each process's {jax.local_device_count()} devices with "
            f"{n_proc} processes (every image's bands stay on the devices of the process that reads it)")
    data = mesh // spatial
    if c.batch_size % data:
        hint = f"e.g. {data * max(1, c.batch_size // data)}"
        if spatial == 1 and mesh % c.batch_size == 0 and mesh > c.batch_size:
            hint += f", or --config.mesh_spatial={mesh // c.batch_size} to split each image over more devices"
        err("batch_size", c.batch_size, f"a multiple of the {data} devices on the data axis ({hint}), "
            "or set --config.mesh_shape")
    if c.data.eval_batch_size % data:
        err("data.eval_batch_size", c.data.eval_batch_size, f"a multiple of the {data} devices on the data axis")
    if spatial > 1 and c.data.crop_size[0] % (4 * spatial):
        # Every band holds whole rows of the stride-4 maps (the decoder's, the contrastive
        # features'); deeper stages with fewer rows than bands are padded by XLA's partitioner.
        err("mesh_spatial", spatial, f"a count that splits the crop height {c.data.crop_size[0]} into bands of "
            f"whole stride-4 rows (crop height a multiple of 4 x mesh_spatial = {4 * spatial})")
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
    if c.term_gate not in ("auto", "cond", "mask"):
        err("term_gate", c.term_gate, "'auto', 'cond' or 'mask'")
    if c.mic.enabled:
        _validate_mic(c, err)
    if "proda" in c:
        _validate_proda(c, err)
    if c.pipa.pixel.enabled and not c.model.pixel_head:
        err("model.pixel_head", False, "True when pipa.pixel.enabled")
    if c.model.get("segmentor", "encoder_decoder") == "hrda":
        _validate_hrda(c, err)
    _validate_optimizer_and_network(c, err)
    if c.model.require_pretrained and not (c.model.pretrained or c.get("init_from", "")):
        err("model.pretrained", c.model.pretrained,
            f"the ImageNet {c.model.backbone} weights this recipe starts from: convert mit_bX.pth once with "
            "`python -m pipa_jax.tools.convert_checkpoint --input mit_b5.pth --output pretrained/mit_b5` and "
            "pass --config.model.pretrained=pretrained/mit_b5 (or the .pth path); "
            "--config.model.require_pretrained=False trains from random weights")
    if not 0 < c.uda.ema_alpha < 1:
        err("uda.ema_alpha", c.uda.ema_alpha, "a value in (0, 1)")
    if c.eval.mode not in ("whole", "slide"):
        err("eval.mode", c.eval.mode, "'whole' or 'slide'")
    if c.eval.mode == "slide":
        (eh, ew), (sh, sw) = c.eval.crop_size, c.eval.stride
        if min(eh, ew, sh, sw) <= 0 or sh > eh or sw > ew:
            err("eval.stride", tuple(c.eval.stride),
                f"positive and no larger than eval.crop_size {tuple(c.eval.crop_size)}")
    if any(int(n) not in (19, 16, 13) for n in c.eval.miou_subsets):
        err("eval.miou_subsets", tuple(c.eval.miou_subsets), "a tuple of 19, 16, 13")
    _validate_data(c.data, err)
    if c.model.num_classes != 19:
        err("model.num_classes", c.model.num_classes, "19 (Cityscapes train ids)")


def _validate_proda(c: ml_collections.ConfigDict, err) -> None:
    p = c.proda
    from pipa_jax.terms.proda import STAGES
    if p.stage not in STAGES:
        err("proda.stage", p.stage, f"one of {STAGES} ('' = not ProDA)")
    if not p.stage:
        return
    if p.warmup not in ("adversarial", "source_only"):
        err("proda.warmup", p.warmup, "'adversarial' or 'source_only'")
    if c.model.get("segmentor", "encoder_decoder") != "encoder_decoder" or c.model.decode_head != "proda":
        err("model.decode_head", c.model.decode_head, "'proda' with segmentor 'encoder_decoder' (ProDA's "
            "prototypes live in its head's 256-d feature)")
    if p.stage in ("stage1", "stage2", "stage3") and not p.frozen_from:
        made_by = "the warm-up" if p.stage == "stage1" else f"stage {int(p.stage[-1]) - 1}"
        err("proda.frozen_from", p.frozen_from, f"the workdir of {made_by} (run the stages in order with "
            "`python -m pipa_jax.proda run --config ... --workdir DIR`, which sets it)")
    if p.stage == "stage1" and not (c.uda.self_training and not c.uda.get("class_mix", True)):
        err("uda.self_training / uda.class_mix", (c.uda.self_training, c.uda.class_mix),
            "(True, False) in ProDA stage 1 (an EMA teacher, no ClassMix)")
    if p.stage in ("warmup", "stage2", "stage3") and c.uda.self_training:
        err("uda.self_training", True, f"False in ProDA's {p.stage} (no EMA teacher)")
    for key in ("pl_threshold", "rectify_threshold"):
        if not 0.0 <= float(p[key]) < 1.0:
            err(f"proda.{key}", p[key], "a value in [0, 1)")
    if not 0.0 < float(p.proto_momentum) <= 1.0:
        err("proda.proto_momentum", p.proto_momentum, "a value in (0, 1]")
    h, w = c.data.crop_size
    if h % 4 or w % 4:
        err("data.crop_size", c.data.crop_size, "multiples of 4 for ProDA (its targets are at a quarter of the crop)")


def _validate_mic(c: ml_collections.ConfigDict, err) -> None:
    m, crop = c.mic, tuple(c.data.crop_size)
    if not c.uda.self_training:
        err("mic.enabled", True, "False when uda.self_training is False (the masked view learns from the "
            "teacher's pseudo-labels)")
    if not 0 <= float(m.mask_ratio) < 1:
        err("mic.mask_ratio", m.mask_ratio, "a value in [0, 1) (the share of masked blocks; MIC: 0.7)")
    b = m.block_size
    if int(b) != b or b <= 0 or crop[0] % b or crop[1] % b:
        divisors = [d for d in range(2, min(crop) + 1) if crop[0] % d == 0 and crop[1] % d == 0]
        hint = ", ".join(str(d) for d in divisors if min(crop) // d >= 4)[-40:]
        err("mic.block_size", b, f"a divisor of the training crop {crop} that leaves a grid of blocks (MIC: 64 "
            f"for 1024 crops at full resolution, 32 for 512 crops); this crop allows e.g. {hint}")
    if min(crop) // b < 2:
        err("mic.block_size", b, f"at most half the training crop {crop} (a grid of at least 2x2 blocks)")


def _validate_optimizer_and_network(c: ml_collections.ConfigDict, err) -> None:
    o, m = c.optimizer, c.model
    if o.get("name", "adamw") not in ("adamw", "sgd"):
        err("optimizer.name", o.name, "'adamw' or 'sgd'")
    if o.get("sgd_duplicate_updates", False) and o.name != "sgd":
        err("optimizer.sgd_duplicate_updates", True, "False with optimizer.name = 'adamw' (it reproduces DACS's SGD)")
    if o.get("name") == "sgd" and not 0 <= o.momentum < 1:
        err("optimizer.momentum", o.momentum, "a value in [0, 1)")
    if c.uda.get("source_ce_average", "all") not in ("all", "valid"):
        err("uda.source_ce_average", c.uda.source_ce_average, "'all' (mmseg) or 'valid' (DACS)")
    from pipa_jax.models.resnet import INPUT_CONVENTIONS
    if m.resnet.input_convention not in INPUT_CONVENTIONS:
        err("model.resnet.input_convention", m.resnet.input_convention,
            "'caffe_bgr' (DACS), 'imagenet_rgb' (torchvision) or 'unit_rgb' (ProDA)")
    if int(m.deeplabv2.branches) not in (1, 2, 3, 4):
        err("model.deeplabv2.branches", m.deeplabv2.branches, "1..4 (2 = the official DACS forward, 4 = all summed)")
    if m.get("segmentor", "encoder_decoder") == "hrda" and m.decode_head != "daformer":
        err("model.decode_head", m.decode_head, "'daformer' with segmentor 'hrda' (HRDA's heads are DAFormer heads)")
    if c.uda.fd and not str(m.backbone).startswith("mit_"):
        err("uda.fd", True, f"False with backbone {m.backbone!r} (the feature distance reads a frozen ImageNet MiT; "
            "DAFormer's recipe has it, DACS's does not)")


def _validate_hrda(c: ml_collections.ConfigDict, err) -> None:
    """The crops HRDA cuts must fit what they are cut from (the model checks its own strides)."""
    hr = tuple(int(v) for v in c.model.hrda.hr_crop_size)
    crop = tuple(c.data.crop_size)
    if hr[0] > crop[0] or hr[1] > crop[1]:
        err("model.hrda.hr_crop_size", hr, f"no larger than the training crop data.crop_size {crop} (HRDA's "
            f"detail crop is cut from it; HRDA: 512x512 in 1024x1024)")
    if c.eval.mode == "slide":
        win = tuple(c.eval.crop_size)
        if hr[0] > win[0] or hr[1] > win[1]:
            err("eval.crop_size", win, f"at least model.hrda.hr_crop_size {hr} (each test window runs HRDA's "
                "detail branch over it)")
    if c.pipa.patch.enabled:
        pc = tuple(c.pipa.patch.crop_size)
        if pc[0] < hr[0] or pc[1] < hr[1]:
            err("pipa.patch.crop_size", pc, f"at least model.hrda.hr_crop_size {hr} (each patch crop goes through "
                "HRDA's training forward)")


def _validate_data(d: ml_collections.ConfigDict, err) -> None:
    sources, targets = ("synthetic_source", "gta", "synthia"), ("synthetic_target", "cityscapes")
    if d.source not in sources:
        err("data.source", d.source, f"one of {sources}")
    if d.target not in targets:
        err("data.target", d.target, f"one of {targets}")
    if d.format not in ("files", "tfds"):
        err("data.format", d.format, "'files' (official layouts) or 'tfds' (array_record datasets)")
    if d.format == "files":
        if d.source in ("gta", "synthia") and not d.source_root:
            err("data.source_root", d.source_root, f"the {d.source} dataset root, e.g. "
                f"--config.data.source_root=/data/{d.source}")
        if d.target == "cityscapes" and not d.target_root:
            err("data.target_root", d.target_root,
                "the Cityscapes root, e.g. --config.data.target_root=/data/cityscapes")
    for key in ("source_size", "target_size"):
        size = tuple(d[key])
        if len(size) != 2 or any(int(v) != v or v <= 0 for v in size):
            err(f"data.{key}", size, "(long side, short side), two positive integers")
    if not 0 < d.source_cat_max_ratio <= 1:
        err("data.source_cat_max_ratio", d.source_cat_max_ratio, "a value in (0, 1] (1 disables the rule)")
    if not 0 < float(d.get("synthetic_scale", 1.0)) <= 1:
        err("data.synthetic_scale", d.synthetic_scale, "a factor in (0, 1] (1: train and test at the rendered size)")
    if int(d.workers) != d.workers or d.workers < 0:
        err("data.workers", d.workers, "an integer >= 0 (0: threads only)")
    if d.rcs.enabled:
        if d.source not in ("gta", "synthia", "synthetic_source"):
            err("data.rcs.enabled", True, f"False for the source {d.source!r} (RCS needs the class "
                "statistics of a prepared GTA5 / SYNTHIA root or the synthetic source)")
        if not d.rcs.temperature > 0:
            err("data.rcs.temperature", d.rcs.temperature, "a positive number")
        if d.rcs.min_pixels < 0:
            err("data.rcs.min_pixels", d.rcs.min_pixels, "a number >= 0")
        if d.rcs.min_crop_ratio < 0:
            err("data.rcs.min_crop_ratio", d.rcs.min_crop_ratio, "a number >= 0 (0: no re-crop)")


def merge_json(base: ml_collections.ConfigDict, values: dict) -> None:
    """Overwrites `base` with JSON `values` (lists back to tuples; unknown keys added; a field whose
    type changed between versions takes the file's value). Used for run and model configs."""
    with base.unlocked():
        for key, value in values.items():
            old = base.get(key) if key in base else None
            if isinstance(old, ml_collections.ConfigDict) and isinstance(value, dict):
                merge_json(old, value)
                continue
            if isinstance(value, list) and isinstance(old, tuple):
                value = tuple(value)
            elif isinstance(value, dict):
                value = ml_collections.ConfigDict(value)
            try:
                base[key] = value
            except TypeError:  # a field whose type changed between versions: take the run's value
                del base[key]
                base[key] = value


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> None:
    """Sets dotted keys ({'model.backbone': 'resnet50', ...}, as --config.key=value gives them) on
    `c`; an unknown key is a KeyError naming it."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = c
        for part in parents:
            if part not in node:
                raise KeyError(f"config override {dotted!r}: no field {part!r}")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"config override {dotted!r}: no field {leaf!r}")
        node[leaf] = value


def enable_compilation_cache(c) -> None:
    """XLA's persistent compilation cache in config.compilation_cache_dir ('' = off), for the
    trainer, the evaluator and the predictor alike: a second run of the same architecture loads
    its programs instead of compiling them.

    Every program is cached, not only those that took a second or more to compile (JAX's
    default): building a model eagerly compiles one small program per parameter shape, ~130 for
    the tiny synthetic config and 0.1-0.6 s each on a 2-core CPU. Measured with a warm cache: a
    tiny 8-step run took 45.7 s with all programs cached vs 71.5 s with JAX's 1 s threshold.
    """
    path = c.get("compilation_cache_dir", "") if hasattr(c, "get") else ""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
