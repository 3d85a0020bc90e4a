"""Random-access sources for the official dataset layouts (docs/method.md §8-9).

Layouts (ROOT is what the user passes):

    gta        ROOT/images/NNNNN.png, ROOT/labels/NNNNN.png (label ids, uint8)
    synthia    ROOT/RGB/NNNNNNN.png, ROOT/GT/LABELS/NNNNNNN.png (16-bit RGB, class id in channel 0)
    cityscapes ROOT/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
               ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Training reads the prepared `<label stem>_labelTrainIds.png` beside each label (uint8 train ids,
255 ignored), written once by `python -m pipa_jax.tools.prepare_data DATASET ROOT`, which also
writes the class statistics Rare Class Sampling needs (`class_stats_file(root, split)`).

A source (`FileSource`) is a grain random-access data source: `len(source)` and `source[i]` ->
{'image': uint8 [h, w, 3] RGB, 'label': uint8 [h', w'] train ids, 'name': frame id}. Images are
resized keeping their aspect ratio to the configured (long side, short side) (bilinear for images,
nearest for labels); with `full_res_label=True` (Cityscapes val) the label keeps its original
resolution, because the evaluator scores logits upsampled to the full ground truth. A source holds
only paths, so it pickles cheaply into grain worker processes.

Every layout problem raises `DatasetLayoutError` (a ValueError) naming the path, what was expected
there and how to fix it.
"""
from __future__ import annotations

import dataclasses
import json
import operator
import os
import re

import numpy as np

from pipa_jax import io as io_lib
from pipa_jax import labels as L
from pipa_jax.data import transforms

DATASETS = ("gta", "synthia", "cityscapes")
TRAIN_ID_SUFFIX = "_labelTrainIds.png"
STATS_FORMAT = "pipa_jax.class_stats/1"
_SHOW = 5  # how many offending paths an error lists


class DatasetLayoutError(ValueError):
    """A dataset root that does not match its official layout or is not prepared."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One example on disk: `name` is the frame id (file stem without suffixes)."""
    name: str
    image: str
    label: str          # the official label file (label ids)
    train_label: str    # the prepared train-id file written beside it


def prepare_command(dataset: str, root: str) -> str:
    return f"python -m pipa_jax.tools.prepare_data {dataset} {root}"


def class_stats_file(root: str, split: str = "train") -> str:
    """Where prepare_data writes the class statistics of `split` (GTA5 / SYNTHIA: 'train')."""
    return os.path.join(root, f"pipa_class_stats_{split}.json")


def train_label_path(label_path: str) -> str:
    stem = label_path[:-len(".png")]
    if stem.endswith("_labelIds"):  # Cityscapes: ..._gtFine_labelIds.png -> ..._gtFine_labelTrainIds.png
        stem = stem[:-len("_labelIds")]
    return stem + TRAIN_ID_SUFFIX


# ------------------------------------------------------------------------------------------
# Layout discovery
# ------------------------------------------------------------------------------------------

def _check_root(dataset: str, root: str) -> str:
    if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
        raise DatasetLayoutError(
            f"no {dataset} root given: set the dataset root in the config "
            f"(--config.data.source_root=/path/to/{dataset} or --config.data.target_root=...)")
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.exists(root):
        raise DatasetLayoutError(
            f"{dataset} root {root} does not exist; expected the extracted dataset there "
            f"({_LAYOUT_HINT[dataset]}). Fix the path in the config or extract the dataset.")
    if not os.path.isdir(root):
        raise DatasetLayoutError(f"{dataset} root {root} is a file, expected a directory "
                                 f"({_LAYOUT_HINT[dataset]})")
    return root


_LAYOUT_HINT = {
    "gta": "ROOT/images/NNNNN.png and ROOT/labels/NNNNN.png",
    "synthia": "ROOT/RGB/NNNNNNN.png and ROOT/GT/LABELS/NNNNNNN.png",
    "cityscapes": "ROOT/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
                  "ROOT/gtFine/{train,val}/<city>/*_gtFine_labelIds.png",
}


def _require_dir(dataset: str, root: str, rel: str) -> str:
    path = os.path.join(root, rel)
    if os.path.isdir(path):
        return path
    extra = ""
    parent = root
    for _ in range(3):  # a root pointing inside the layout (e.g. at leftImg8bit/ or images/)
        parent = os.path.dirname(parent.rstrip(os.sep))
        if parent and os.path.isdir(os.path.join(parent, rel)):
            extra = f" {root} is a folder inside the layout: pass {parent} as the root."
            break
    raise DatasetLayoutError(
        f"{dataset} root {root} has no {rel}/ directory (expected {path}; layout: "
        f"{_LAYOUT_HINT[dataset]}).{extra or ' Point the root at the folder that holds ' + rel + '/.'}")


def _pngs(directory: str) -> list[str]:
    """Data PNGs in a directory: hidden files (our temporary files) and prepared outputs skipped."""
    return sorted(f for f in os.listdir(directory)
                  if f.endswith(".png") and not f.startswith(".") and not f.endswith(TRAIN_ID_SUFFIX))


def _pair_flat(dataset: str, img_dir: str, lab_dir: str) -> list[Item]:
    images = _pngs(img_dir)
    labels = set(_pngs(lab_dir))
    if not images:
        raise DatasetLayoutError(f"{dataset}: no .png images in {img_dir}; expected "
                                 f"{_LAYOUT_HINT[dataset]}. Extract the images there.")
    missing = [f for f in images if f not in labels]
    if missing:
        shown = ", ".join(os.path.join(lab_dir, f) for f in missing[:_SHOW])
        raise DatasetLayoutError(
            f"{dataset}: {len(missing)} of {len(images)} images in {img_dir} have no label in "
            f"{lab_dir} (missing: {shown}{', ...' if len(missing) > _SHOW else ''}). Extract the "
            f"matching label archives into {lab_dir}, or move the unlabelled images out of {img_dir}.")
    items = []
    for f in images:
        lab = os.path.join(lab_dir, f)
        items.append(Item(f[:-4], os.path.join(img_dir, f), lab, train_label_path(lab)))
    return items


def list_gta(root: str) -> list[Item]:
    root = _check_root("gta", root)
    img_dir = _require_dir("gta", root, "images")
    lab_dir = _require_dir("gta", root, "labels")
    return _pair_flat("gta", img_dir, lab_dir)


def list_synthia(root: str) -> list[Item]:
    root = _check_root("synthia", root)
    img_dir = _require_dir("synthia", root, "RGB")
    lab_dir = _require_dir("synthia", root, os.path.join("GT", "LABELS"))
    return _pair_flat("synthia", img_dir, lab_dir)


_CS_IMAGE = re.compile(r"^(.+)_leftImg8bit\.png$")


def list_cityscapes(root: str, split: str) -> list[Item]:
    if split not in ("train", "val"):
        raise ValueError(f"cityscapes split must be 'train' or 'val', got {split!r}")
    root = _check_root("cityscapes", root)
    img_root = _require_dir("cityscapes", root, os.path.join("leftImg8bit", split))
    lab_root = _require_dir("cityscapes", root, os.path.join("gtFine", split))
    items, missing = [], []
    for city in sorted(os.listdir(img_root)):
        cdir = os.path.join(img_root, city)
        if not os.path.isdir(cdir):
            continue
        for f in sorted(os.listdir(cdir)):
            m = _CS_IMAGE.match(f)
            if not m or f.startswith("."):
                continue
            name = m.group(1)
            lab = os.path.join(lab_root, city, f"{name}_gtFine_labelIds.png")
            if not os.path.isfile(lab):
                missing.append(lab)
                continue
            items.append(Item(name, os.path.join(cdir, f), lab, train_label_path(lab)))
    if missing:
        shown = ", ".join(missing[:_SHOW])
        raise DatasetLayoutError(
            f"cityscapes {split}: {len(missing)} images in {img_root} have no gtFine label "
            f"(missing: {shown}{', ...' if len(missing) > _SHOW else ''}). Extract gtFine_trainvaltest.zip "
            f"into {root} so that gtFine/ sits beside leftImg8bit/.")
    if not items:
        raise DatasetLayoutError(
            f"cityscapes {split}: no *_leftImg8bit.png images under {img_root}/<city>/; expected "
            f"{_LAYOUT_HINT['cityscapes']}. Extract leftImg8bit_trainvaltest.zip into {root}.")
    return items


def list_items(dataset: str, root: str, split: str = "train") -> list[Item]:
    """Every (image, label) pair of a dataset split, sorted by name; raises DatasetLayoutError."""
    if dataset == "gta":
        return list_gta(root)
    if dataset == "synthia":
        return list_synthia(root)
    if dataset == "cityscapes":
        return list_cityscapes(root, split)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def check_prepared(dataset: str, root: str, items: list[Item]) -> None:
    """Raises DatasetLayoutError naming the first unprepared labels and the prepare_data command."""
    listing: dict[str, set] = {}
    missing = []
    for it in items:
        d = os.path.dirname(it.train_label)
        if d not in listing:
            listing[d] = set(os.listdir(d))
        if os.path.basename(it.train_label) not in listing[d]:
            missing.append(it.train_label)
    if missing:
        shown = ", ".join(missing[:_SHOW])
        raise DatasetLayoutError(
            f"{dataset}: {len(missing)} of {len(items)} labels are not prepared (no train-id file: "
            f"{shown}{', ...' if len(missing) > _SHOW else ''}). Training reads "
            f"<label>{TRAIN_ID_SUFFIX} (uint8 train ids); write them once with: "
            f"{prepare_command(dataset, os.path.abspath(root))}")


# ------------------------------------------------------------------------------------------
# Label decoding
# ------------------------------------------------------------------------------------------

def _synthia_label_pillow(path: str) -> np.ndarray | None:
    """The fast path: Pillow's C PNG decoder, told to unpack each 16-bit sample twice, once as
    its high byte ('RGB;16B', Pillow's default, which alone would turn every id into 0) and
    once as its low byte ('RGB;16L' over big-endian data). Exact 16-bit values at C speed
    whatever the PNG filter (pypng unfilters in Python). None when the file is not the
    expected 16-bit RGB PNG."""
    from PIL import Image

    def unpack(rawmode):
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode != "RGB" or [t.args for t in im.tile] != ["RGB;16B"]:
                return None
            im.tile = [t._replace(args=rawmode) for t in im.tile]
            im.load()
            return np.asarray(im)[..., 0]
    try:
        high = unpack("RGB;16B")
        if high is None:
            return None
        return (high.astype(np.uint16) << 8) | unpack("RGB;16L")
    except Exception:  # anything unexpected: let the pypng path decide and explain
        return None


def read_synthia_label(path: str) -> np.ndarray:
    """SYNTHIA's 16-bit RGB label PNG -> uint16 class ids [H, W] (the first channel).

    Never Pillow's default decoding: it reduces 16-bit RGB to 8 bits (the high byte), which
    turns every SYNTHIA id into 0. The fast path decodes both bytes with Pillow (see
    `_synthia_label_pillow`); anything else goes through pypng, which also gives the errors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    fast = _synthia_label_pillow(path)
    if fast is not None:
        return fast
    import png  # pypng: pure Python, slow (~1 s per Paeth-filtered label) but exact and strict.

    try:
        width, height, pixels, info = png.Reader(filename=path).asDirect()
        planes = info["planes"]
        array = np.vstack([np.asarray(row, dtype=np.uint16) for row in pixels])
    except Exception as e:  # png.FormatError, ChunkError, zlib.error, EOFError, ...
        raise ValueError(f"{path} is corrupt or not a PNG file ({type(e).__name__}: {e}); "
                         "re-download or re-extract it") from e
    if info["bitdepth"] != 16:
        raise ValueError(
            f"{path}: expected a 16-bit SYNTHIA label PNG (class id in the first channel), got "
            f"{info['bitdepth']}-bit. Was it re-saved by a tool that keeps only 8 bits? Re-extract "
            "the original SYNTHIA-RAND-CITYSCAPES GT/LABELS.")
    array = array.reshape(height, width, planes)
    return array[..., 0]


def read_raw_label(dataset: str, path: str) -> np.ndarray:
    """The official label file as raw ids [H, W] (uint8 or uint16)."""
    if dataset == "synthia":
        return read_synthia_label(path)
    return io_lib.read_label(path)


def convert_label(dataset: str, raw: np.ndarray) -> np.ndarray:
    table = L.SYNTHIA_ID_TO_TRAIN_ID if dataset == "synthia" else L.CITYSCAPES_ID_TO_TRAIN_ID
    return L.to_train_ids(raw, table)


def read_train_label(dataset: str, path: str, root: str | None = None) -> np.ndarray:
    """A prepared train-id PNG as uint8 [H, W]; a corrupt one names the path and the fix."""
    try:
        lab = io_lib.read_label(path)
    except FileNotFoundError as e:
        raise DatasetLayoutError(
            f"{path}: prepared train-id label missing. Write it with: "
            f"{prepare_command(dataset, root or '<root>')}") from e
    except ValueError as e:
        raise ValueError(
            f"{e}. It is a prepared file: delete {path} and rerun "
            f"{prepare_command(dataset, root or '<root>')} to rewrite it") from e
    if lab.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 train ids, got {lab.dtype}; delete it and rerun "
                         f"{prepare_command(dataset, root or '<root>')}")
    return lab


# ------------------------------------------------------------------------------------------
# Class statistics (written by prepare_data, read by Rare Class Sampling)
# ------------------------------------------------------------------------------------------

def load_class_stats(dataset: str, root: str, split: str = "train") -> dict:
    """The prepared statistics: {'names': [...], 'counts': int64 [N, 19] pixel counts at original
    resolution, 'samples_with_class': {c: [names with > 0 pixels]}}."""
    path = class_stats_file(root, split)
    if not os.path.isfile(path):
        raise DatasetLayoutError(
            f"{dataset}: no class statistics at {path} (Rare Class Sampling needs them). Write "
            f"them with: {prepare_command(dataset, root)}  (or set --config.data.rcs.enabled=False)")
    try:
        with open(path) as f:
            raw = json.load(f)
        if raw.get("format") != STATS_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {STATS_FORMAT!r}")
        names = sorted(raw["images"])
        counts = np.array([raw["images"][n]["counts"] for n in names], np.int64).reshape(-1, L.NUM_CLASSES)
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetLayoutError(
            f"{path} is not a valid class-statistics file ({type(e).__name__}: {e}); delete it and "
            f"rerun {prepare_command(dataset, root)}") from e
    return {"names": names, "counts": counts,
            "samples_with_class": {int(c): v for c, v in raw.get("samples_with_class", {}).items()}}


# ------------------------------------------------------------------------------------------
# The source
# ------------------------------------------------------------------------------------------

class FileSource:
    """grain random-access source over an official layout (see the module docstring).

    Args:
      dataset: 'gta', 'synthia' or 'cityscapes'.
      root: the dataset root.
      split: 'train' (GTA5 / SYNTHIA have only 'train') or 'val' (Cityscapes).
      size: (long side, short side) for the keep-ratio resize, or None for original size.
      full_res_label: keep the label at its original resolution (evaluation).
    """

    def __init__(self, dataset: str, root: str, split: str = "train",
                 size: tuple[int, int] | None = None, full_res_label: bool = False, keep_ratio: bool = True):
        self.keep_ratio = bool(keep_ratio)
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
        if dataset in ("gta", "synthia") and split != "train":
            raise ValueError(f"{dataset} has only a 'train' split (all images), got {split!r}")
        self.dataset, self.split = dataset, split
        self.root = _check_root(dataset, root)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.full_res_label = bool(full_res_label)
        self.items = list_items(dataset, self.root, split)
        check_prepared(dataset, self.root, self.items)
        self.names = [it.name for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index) -> dict:
        i = operator.index(index)
        if not 0 <= i < len(self.items):
            raise IndexError(f"index {i} out of range for {self!r} ({len(self.items)} examples)")
        it = self.items[i]
        image = io_lib.read_image(it.image)
        label = read_train_label(self.dataset, it.train_label, self.root)
        return finish_example(image, label, it.name, self.size, self.full_res_label, self.keep_ratio)

    def class_stats(self) -> dict:
        """Pixel counts per image in this source's order (for Rare Class Sampling)."""
        stats = load_class_stats(self.dataset, self.root, self.split)
        return align_stats(stats, self.names, class_stats_file(self.root, self.split),
                           prepare_command(self.dataset, self.root))

    def __repr__(self) -> str:
        return (f"FileSource({self.dataset!r}, {self.root!r}, split={self.split!r}, size={self.size}, "
                f"full_res_label={self.full_res_label}, n={len(self.items)})")


def align_stats(stats: dict, names: list[str], where: str, fix: str) -> np.ndarray:
    """int64 [len(names), 19] pixel counts in the order of `names`."""
    index = {n: k for k, n in enumerate(stats["names"])}
    missing = [n for n in names if n not in index]
    if missing:
        raise DatasetLayoutError(
            f"{where} has no statistics for {len(missing)} images (e.g. {missing[:_SHOW]}); "
            f"rerun {fix} to update it")
    return stats["counts"][[index[n] for n in names]]


def finish_example(image: np.ndarray, label: np.ndarray, name: str,
                   size: tuple[int, int] | None, full_res_label: bool, keep_ratio: bool = True) -> dict:
    """Keep-ratio (or, keep_ratio=False, exact) resize (docs/method.md §8) of a decoded pair -> the example dict."""
    if size is not None:
        h, w = transforms.rescale_size(image.shape[:2], size, keep_ratio)
        if (h, w) != image.shape[:2]:
            image = transforms.resize_bilinear(image, (h, w))
        if not full_res_label and label.shape != (h, w):
            # Labels follow the resized image's size exactly (also when a file pair disagrees
            # in size by a few pixels), so crops always cut the same region from both.
            label = transforms.resize_nearest(label, (h, w))
    elif not full_res_label and label.shape != image.shape[:2]:
        label = transforms.resize_nearest(label, image.shape[:2])
    return {"image": image, "label": label, "name": name}
