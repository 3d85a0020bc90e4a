"""TFDS builders (array_record) for GTA5, SYNTHIA-RAND-CITYSCAPES and Cityscapes.

For cloud storage and TPU hosts: build once from a prepared official layout (the manual dir),

    python -m pipa_jax.tools.prepare_data gta /data/gta
    python -m pipa_jax.data.tfds_builders gta /data/gta --data_dir gs://bucket/tfds

then train with --config.data.format=tfds --config.data.tfds_data_dir=gs://bucket/tfds. The
same grain pipeline reads them through `tfds.data_source` (random access, no TensorFlow needed).

Datasets (registered names: pipa_ prefixed, because TFDS already ships a different `cityscapes`):
  pipa_gta5                      split train (24,966)
  pipa_synthia_rand_cityscapes   split train (9,400)
  pipa_cityscapes                splits train (2,975), val (500)
Features: image (uint8 [H, W, 3] PNG, the original file's bytes), label (uint8 [H, W, 1] train
ids, the prepared _labelTrainIds.png), name (frame id). Records keep the sorted file order
(shuffling disabled), and the builder stores the per-image class pixel counts of every split in
the dataset's metadata (`info.metadata['class_counts']`), so Rare Class Sampling needs no pass over
the data. Images are stored at original resolution; the keep-ratio resize happens when reading,
exactly as for the file layouts.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from pipa_jax.data import sources

_VERSION = "1.0.0"


class _PreparedLayoutBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base: reads a prepared official layout from the manual dir."""

    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "Initial release (pipa_jax)."}
    DATASET = ""
    SPLITS: tuple[str, ...] = ("train",)

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract the official dataset layout, prepare it once with "
        "`python -m pipa_jax.tools.prepare_data {gta,synthia,cityscapes} ROOT`, and pass ROOT as "
        "the manual dir (python -m pipa_jax.data.tfds_builders DATASET ROOT).")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "name": tfds.features.Text(),
            }),
            disable_shuffling=True,  # record i is the i-th file in sorted order (stats align)
            metadata=tfds.core.MetadataDict(),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        counts, names, gens = {}, {}, {}
        for split in self.SPLITS:
            items = sources.list_items(self.DATASET, root, split)
            sources.check_prepared(self.DATASET, root, items)
            stats = sources.load_class_stats(self.DATASET, root, split)
            item_names = [it.name for it in items]
            counts[split] = sources.align_stats(
                stats, item_names, sources.class_stats_file(root, split),
                sources.prepare_command(self.DATASET, root)).tolist()
            names[split] = item_names
            gens[split] = self._generate_examples(items)
        self.info.metadata["class_counts"] = counts
        self.info.metadata["names"] = names
        return gens

    def _generate_examples(self, items):
        for k, it in enumerate(items):
            yield k, {"image": _image_for_tfds(it.image), "label": it.train_label, "name": it.name}


def _image_for_tfds(path: str):
    """The file itself when it is an RGB PNG (no re-encoding), else a decoded RGB array."""
    try:
        with Image.open(path) as im:
            if im.format == "PNG" and im.mode == "RGB":
                return path
    except Exception:  # decode it below for the error that names the file
        pass
    from pipa_jax import io as io_lib
    return io_lib.read_image(path)


class PipaGta5(_PreparedLayoutBuilder):
    """GTA5 (Richter et al. 2016) with Cityscapes train ids."""
    DATASET = "gta"


class PipaSynthiaRandCityscapes(_PreparedLayoutBuilder):
    """SYNTHIA-RAND-CITYSCAPES with Cityscapes train ids (SYNTHIA ids mapped, docs/method.md §9)."""
    DATASET = "synthia"


class PipaCityscapes(_PreparedLayoutBuilder):
    """Cityscapes train and val (fine annotations) with train ids."""
    DATASET = "cityscapes"
    SPLITS = ("train", "val")


BUILDERS = {"gta": PipaGta5, "synthia": PipaSynthiaRandCityscapes, "cityscapes": PipaCityscapes}
TFDS_NAMES = {k: v.name for k, v in BUILDERS.items()}


def build(dataset: str, manual_dir: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Builds (or finds already built) the array_record dataset of `dataset` from `manual_dir`."""
    if dataset not in BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {tuple(BUILDERS)}")
    manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
    builder = BUILDERS[dataset](data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        for split in builder.SPLITS:  # our layout errors instead of TFDS's bare AssertionError
            sources.check_prepared(dataset, manual_dir, sources.list_items(dataset, manual_dir, split))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


class TfdsSource:
    """grain random-access source over a built dataset; same examples as `sources.FileSource`.

    The TFDS data source is opened lazily in each process (it holds open file handles), so this
    object pickles cheaply into grain workers.
    """

    def __init__(self, dataset: str, split: str, data_dir: str | None,
                 size: tuple[int, int] | None = None, full_res_label: bool = False, keep_ratio: bool = True):
        self.keep_ratio = bool(keep_ratio)
        if dataset not in BUILDERS:
            raise ValueError(f"unknown dataset {dataset!r}; expected one of {tuple(BUILDERS)}")
        self.dataset, self.split, self.data_dir = dataset, split, data_dir
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.full_res_label = bool(full_res_label)
        builder = BUILDERS[dataset](data_dir=data_dir)
        where = builder.data_dir
        if not builder.is_prepared():
            raise sources.DatasetLayoutError(
                f"the TFDS dataset {builder.name} is not built in {where} (config.data.tfds_data_dir = "
                f"{data_dir!r}). Build it with: python -m pipa_jax.data.tfds_builders {dataset} ROOT "
                f"--data_dir {data_dir or '<tfds data_dir>'}, or set --config.data.format=files")
        if split not in builder.info.splits:
            raise ValueError(f"{builder.name} has splits {list(builder.info.splits)}, not {split!r}")
        self._len = builder.info.splits[split].num_examples
        self._where = where
        self._ds = None

    def _source(self):
        if self._ds is None:
            self._ds = BUILDERS[self.dataset](data_dir=self.data_dir).as_data_source(split=self.split)
        return self._ds

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None
        return state

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index) -> dict:
        i = int(index)
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for {self!r}")
        ex = self._source()[i]
        name = ex["name"].decode() if isinstance(ex["name"], bytes) else str(ex["name"])
        label = np.asarray(ex["label"])
        if label.ndim == 3:
            label = label[..., 0]
        return sources.finish_example(np.asarray(ex["image"]), label, name, self.size,
                                      self.full_res_label, self.keep_ratio)

    def class_stats(self) -> np.ndarray:
        meta = BUILDERS[self.dataset](data_dir=self.data_dir).info.metadata
        try:
            return np.asarray(meta["class_counts"][self.split], np.int64)
        except (KeyError, TypeError) as e:
            raise sources.DatasetLayoutError(
                f"the TFDS dataset in {self._where} has no class statistics for split {self.split!r} "
                "(built by another tool?); rebuild it with python -m pipa_jax.data.tfds_builders") from e

    def __repr__(self) -> str:
        return (f"TfdsSource({self.dataset!r}, {self.split!r}, data_dir={self.data_dir!r}, "
                f"size={self.size}, full_res_label={self.full_res_label}, n={self._len})")


def main(argv=None) -> int:
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="python -m pipa_jax.data.tfds_builders",
                                     description="Build an array_record TFDS dataset from a prepared root.")
    parser.add_argument("dataset", choices=tuple(BUILDERS))
    parser.add_argument("root", help="the prepared official layout (manual dir)")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir to write to (default: TFDS's)")
    args = parser.parse_args(argv)
    try:
        b = build(args.dataset, args.root, args.data_dir)
    except (sources.DatasetLayoutError, ValueError) as e:
        print(f"tfds_builders: error: {e}", file=sys.stderr)
        return 2
    print(f"built {b.name} in {b.data_dir}: " +
          ", ".join(f"{k}={v.num_examples}" for k, v in b.info.splits.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
