"""grain pipelines: deterministic, random-access, checkpointable.

Training batches come from a grain MapDataset: shuffled, repeated, randomly cropped and flipped
per index with a seed, so batch t is a pure function of (seed, t). The iterator's state is one
integer, saved with every checkpoint, which makes resume exact. Decoding and cropping run on
host threads; normalisation, mixing and augmentation run on device inside the step.
Each process reads only its slice of every global batch (multi-host).
"""
from __future__ import annotations

import dataclasses

import grain
import jax
import ml_collections
import numpy as np

from pipa_jax import labels as L
from pipa_jax.data.synthetic import SyntheticSource


def make_source(name: str, split: str, c: ml_collections.ConfigDict):
    """A random-access source of {'image': uint8 [H,W,3], 'label': uint8 [H,W]} by config name."""
    h, w = c.data.image_size
    if name in ("synthetic_source", "synthetic_target"):
        n = c.data.num_train if split == "train" else c.data.num_val
        return SyntheticSource(name.split("_")[1], split, n, h, w, seed=c.seed)
    raise ValueError(f"unknown data source {name!r}; expected 'synthetic_source' or 'synthetic_target' "
                     "(GTA5 / SYNTHIA / Cityscapes loaders come with the real-data layer)")


@dataclasses.dataclass(frozen=True)
class RandomCropFlip:
    """Random crop to `crop_hw` (zero / 255 padding when smaller) and horizontal flip p=0.5."""
    crop_hw: tuple[int, int]
    flip: bool = True

    def __call__(self, ex, rng: np.random.Generator):
        img, lab = ex["image"], ex["label"]
        ch, cw = self.crop_hw
        h, w = lab.shape
        if h < ch or w < cw:
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
            lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=L.IGNORE_INDEX)
            h, w = lab.shape
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        img, lab = img[y:y + ch, x:x + cw], lab[y:y + ch, x:x + cw]
        if self.flip and rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        return {"image": np.ascontiguousarray(img), "label": np.ascontiguousarray(lab)}


def _combine(pair):
    src, tgt = pair
    return {"source_image": src["image"], "source_label": src["label"],
            "target_image": tgt["image"], "target_label": tgt["label"]}


def train_dataset(c: ml_collections.ConfigDict) -> grain.MapDataset:
    """This process's batches: element t is its share of global batch t."""
    crop = RandomCropFlip(tuple(c.data.crop_size), c.data.flip)
    src = grain.MapDataset.source(make_source(c.data.source, "train", c)).seed(c.seed)
    tgt = grain.MapDataset.source(make_source(c.data.target, "train", c)).seed(c.seed + 1)
    src = src.shuffle().repeat(None).random_map(crop)
    tgt = tgt.shuffle().repeat(None).random_map(crop)
    pairs = grain.experimental.ZipMapDataset([src, tgt]).map(_combine)
    n_proc, pid = jax.process_count(), jax.process_index()
    return pairs[pid::n_proc].batch(c.batch_size // n_proc, drop_remainder=True)


def train_iterator(c: ml_collections.ConfigDict, start_index: int = 0):
    it = iter(train_dataset(c).to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, c.data.prefetch), prefetch_buffer_size=c.data.prefetch)))
    if start_index:
        it.set_state({"next_index": int(start_index)})
    return it


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
