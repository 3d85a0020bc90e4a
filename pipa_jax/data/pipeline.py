"""grain pipelines: deterministic, random-access, checkpointable.

Training batches come from a grain MapDataset: shuffled, repeated, randomly cropped and flipped
per index with a seed, so batch t is a pure function of (seed, t). The iterator's state is one
integer, saved with every checkpoint, which makes resume exact. Decoding, resizing and cropping
run on host threads or grain worker processes (data.workers, see TrainIterator); normalisation,
mixing and augmentation run on device inside the step. Each process reads only its slice of
every global batch (multi-host). Real datasets (GTA5, SYNTHIA, Cityscapes) come from
pipa_jax.data.sources (official layouts) or pipa_jax.data.tfds_builders (array_record);
Rare Class Sampling and the crop rules live in pipa_jax.data.transforms.
"""
from __future__ import annotations

import sys

import grain
import jax
import ml_collections
import numpy as np

from pipa_jax import labels as L
from pipa_jax.data import sources
from pipa_jax.data.synthetic import SyntheticSource
from pipa_jax.data import transforms
from pipa_jax.data.transforms import RandomCropFlip, RareClassSampling, ValidMargins

SYNTHETIC = ("synthetic_source", "synthetic_target")
REAL = ("gta", "synthia", "cityscapes")   # GTA5 / SYNTHIA: source domain; Cityscapes: target


def source_size(name: str, c: ml_collections.ConfigDict) -> tuple[int, int]:
    """(long, short) keep-ratio size of a real dataset: Cityscapes uses data.target_size (also
    at test time), GTA5 / SYNTHIA data.source_size."""
    return tuple(c.data.target_size) if name == "cityscapes" else tuple(c.data.source_size)


def make_source(name: str, split: str, c: ml_collections.ConfigDict):
    """A random-access source of {'image': uint8 [H,W,3], 'label': uint8 [H,W], 'name': str}.

    Names: 'synthetic_source' / 'synthetic_target' (procedural, no files), 'gta' and 'synthia'
    (split 'train', root data.source_root, resized to data.source_size), 'cityscapes' (splits
    'train' / 'val', root data.target_root, resized to data.target_size). Cityscapes 'val' keeps
    the label at full resolution (the evaluator upsamples logits to it). With
    data.format == 'tfds' the real datasets come from the array_record datasets built by
    pipa_jax.data.tfds_builders in data.tfds_data_dir instead of the file layouts.
    """
    if name in SYNTHETIC:
        h, w = c.data.image_size
        n = c.data.num_train if split == "train" else c.data.num_val
        src = SyntheticSource(name.split("_")[1], split, n, h, w, seed=c.seed,
                              omit_classes=tuple(c.data.synthetic_omit_classes))
        scale = float(c.data.get("synthetic_scale", 1.0))
        return src if scale == 1.0 else ScaledSource(src, scale, scale_labels=split == "train")
    if name in REAL:
        # eval.labels_at_test_size: DACS's own evaluator, labels nearest-resized to the test size.
        full_res_label = name == "cityscapes" and split == "val" and not c.eval.get("labels_at_test_size", False)
        size = source_size(name, c)
        # DACS resizes GTA5 to exactly 1280x720 (data.source_keep_ratio = False); Cityscapes'
        # 2:1 frames fit their box either way.
        keep_ratio = bool(c.data.get("target_keep_ratio" if name == "cityscapes" else "source_keep_ratio", True))
        if c.data.format == "tfds":
            from pipa_jax.data import tfds_builders  # imports TFDS only when asked for
            return tfds_builders.TfdsSource(name, split, c.data.tfds_data_dir or None, size,
                                            full_res_label, keep_ratio)
        if c.data.format != "files":
            raise ValueError(f"config.data.format = {c.data.format!r}: expected 'files' or 'tfds'")
        root = c.data.target_root if name == "cityscapes" else c.data.source_root
        if not root:
            key = "target_root" if name == "cityscapes" else "source_root"
            raise sources.DatasetLayoutError(
                f"config.data.{key} is empty: set it to the {name} root, e.g. "
                f"--config.data.{key}=/data/{name} (then run {sources.prepare_command(name, '/data/' + name)} once)")
        return sources.FileSource(name, root, split, size, full_res_label, keep_ratio)
    raise ValueError(f"unknown data source {name!r}; expected one of {SYNTHETIC + REAL}")


class ScaledSource:
    """A source whose images are resized by `scale` (bilinear, as the real datasets' keep-ratio
    resize) and, when `scale_labels`, its labels too (nearest); validation keeps full-resolution
    labels, so the evaluator upsamples logits to them (the Cityscapes protocol). Used by the
    synthetic pair to train and test a model at a lower resolution than the scenes are rendered
    (data.synthetic_scale). Class statistics (RCS) stay those of the full-resolution labels."""

    def __init__(self, source, scale: float, *, scale_labels: bool):
        self.source, self.scale, self.scale_labels = source, float(scale), bool(scale_labels)

    def __len__(self):
        return len(self.source)

    def _size(self, hw):
        return max(1, round(hw[0] * self.scale)), max(1, round(hw[1] * self.scale))

    def __getitem__(self, index):
        ex = dict(self.source[index])
        size = self._size(ex["image"].shape[:2])
        ex["image"] = transforms.resize_bilinear(ex["image"], size)
        if self.scale_labels:
            ex["label"] = transforms.resize_nearest(ex["label"], size)
        return ex

    def class_stats(self):
        return self.source.class_stats()

    def __repr__(self):
        return f"ScaledSource({self.source!r}, scale={self.scale}, scale_labels={self.scale_labels})"


def _combine(pair):
    src, tgt = pair
    out = {"source_image": src["image"], "source_label": src["label"],
           "target_image": tgt["image"], "target_label": tgt["label"]}
    if "valid" in tgt:  # HRDA / MIC pseudo-label margins of the target frame (uint8 [H, W])
        out["target_valid"] = tgt["valid"]
    return out


def source_dataset(c: ml_collections.ConfigDict) -> grain.MapDataset:
    """Infinite source-domain stream of cropped examples; element i is a function of (seed, i)."""
    src = make_source(c.data.source, "train", c)
    crop = RandomCropFlip(tuple(c.data.crop_size), c.data.flip, float(c.data.source_cat_max_ratio))
    if c.data.rcs.enabled:
        if not hasattr(src, "class_stats"):
            raise ValueError(
                f"config.data.rcs.enabled = True, but the source {c.data.source!r} has no class "
                "statistics; set --config.data.rcs.enabled=False")
        rcs = RareClassSampling(src, src.class_stats(), crop, c.data.rcs.temperature,
                                c.data.rcs.min_pixels, c.data.rcs.min_crop_ratio)
        # Every element samples its own class and image (with replacement), as the official code.
        return grain.MapDataset.range(sys.maxsize).seed(c.seed).random_map(rcs)
    return grain.MapDataset.source(src).seed(c.seed).shuffle().repeat(None).random_map(crop)


def target_dataset(c: ml_collections.ConfigDict) -> grain.MapDataset:
    """Infinite target-domain stream: shuffled epochs, unconstrained crops."""
    crop = RandomCropFlip(tuple(c.data.crop_size), c.data.flip)
    tgt = grain.MapDataset.source(make_source(c.data.target, "train", c)).seed(c.seed + 1)
    margins = tuple(c.data.get("target_valid_margins", ()))
    if margins:
        tgt = tgt.map(ValidMargins(margins))
    return tgt.shuffle().repeat(None).random_map(crop)


def train_dataset(c: ml_collections.ConfigDict) -> grain.MapDataset:
    """This process's batches: element t is its share of global batch t, the contiguous rows
    [p * b / n, (p + 1) * b / n) of the global batch (examples t * b ... t * b + b - 1), so the
    global batch is the same examples in the same order whatever the number of processes."""
    pairs = grain.experimental.ZipMapDataset([source_dataset(c), target_dataset(c)]).map(_combine)
    n_proc, pid = jax.process_count(), jax.process_index()
    return pairs.batch(c.batch_size // n_proc, drop_remainder=True)[pid::n_proc]


class TrainIterator:
    """Iterator over `train_dataset(c)` from batch `start_index` on, with the trainer's
    checkpoint contract: `get_state()` == {'next_index': k} (k = the next batch's index) and
    `set_state` / `train_iterator(c, k)` continue exactly there.

    Parallelism: data.workers == 0 reads in this process with grain's ReadOptions threads
    (data.prefetch of them); PNG decoding (zlib) and the NumPy resizes release the GIL only in
    part, so threads give well under one core per thread. data.workers > 0 adds grain's
    mp_prefetch: that many worker processes, each producing whole batches in turn, which
    scales with cores (what GTA-size decoding needs on a GPU host) at the price of a few seconds
    of worker start-up. Because every batch is a pure function of (seed, index), resuming just
    slices the dataset at k, so the state stays one integer in both modes.
    """

    def __init__(self, c: ml_collections.ConfigDict, start_index: int = 0):
        self._dataset = train_dataset(c)
        self._threads = max(1, int(c.data.prefetch))
        self._workers = int(c.data.workers)
        self._start(int(start_index))

    def _start(self, k: int):
        ds = self._dataset[k:] if k else self._dataset
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self._threads,
                                                     prefetch_buffer_size=self._threads))
        if self._workers > 0:
            from absl import flags
            if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
                flags.FLAGS.mark_as_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers,
                                                                   per_worker_buffer_size=2))
        self._it = iter(it_ds)
        self._next_index = k

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self._next_index += 1
        return batch

    def get_state(self) -> dict:
        return {"next_index": self._next_index}

    def set_state(self, state: dict) -> None:
        self._start(int(state["next_index"]))

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def train_iterator(c: ml_collections.ConfigDict, start_index: int = 0) -> TrainIterator:
    return TrainIterator(c, start_index)


def eval_batches(c: ml_collections.ConfigDict):
    """This process's share of the target validation set in batches of data.eval_batch_size
    (global); the last batch is padded with ignored labels so shapes stay static."""
    src = make_source(c.data.target, "val", c)
    bs = c.data.eval_batch_size
    n_proc, pid = jax.process_count(), jax.process_index()
    local = bs // n_proc
    for start in range(0, len(src), bs):
        idx = list(range(start, min(start + bs, len(src))))
        exs = [src[i] for i in idx]
        imgs = np.stack([e["image"] for e in exs])
        labs = np.stack([e["label"] for e in exs])
        if len(idx) < bs:
            pad = bs - len(idx)
            imgs = np.concatenate([imgs, np.zeros((pad,) + imgs.shape[1:], imgs.dtype)])
            labs = np.concatenate([labs, np.full((pad,) + labs.shape[1:], L.IGNORE_INDEX, labs.dtype)])
        yield imgs[pid * local:(pid + 1) * local], labs[pid * local:(pid + 1) * local]
