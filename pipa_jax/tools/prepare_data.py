"""Prepares an official dataset layout for training (docs/method.md §9).

    python -m pipa_jax.tools.prepare_data {gta,synthia,cityscapes} ROOT [--workers N]

Writes `<label stem>_labelTrainIds.png` (uint8 train ids, 255 ignored) beside every label file,
and the class statistics Rare Class Sampling needs, `ROOT/pipa_class_stats_<split>.json`:
per image the pixel count of every train id at original resolution, and per class the images
holding > 0 pixels of it. Cityscapes: both train and val labels are converted (the evaluator
reads the val train ids at full resolution); statistics are written per split.

Safe to interrupt and to rerun: every file is written to a hidden temporary file and renamed into
place, so an interrupted run leaves no half-written output; a rerun skips labels whose train-id
file is newer than the label, takes their statistics from the previous statistics file (or
recounts the small train-id PNG if the run that wrote it was interrupted before saving them), and
does not rewrite an unchanged statistics file. Leftover temporary files of a killed run are
ignored by the loaders and removed by the next run. Do not run two preparations of the same root
at once (a lock file refuses it).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import multiprocessing
import os
import sys

import numpy as np

from pipa_jax import io as io_lib
from pipa_jax import labels as L
from pipa_jax.data import sources

SPLITS = {"gta": ("train",), "synthia": ("train",), "cityscapes": ("train", "val")}
LOCK_NAME = ".pipa_prepare_data.lock"


@dataclasses.dataclass
class Report:
    written: int = 0        # train-id files written by this run
    skipped: int = 0        # already prepared
    recounted: int = 0      # prepared before, statistics recounted from the train-id file
    stats_files: list = dataclasses.field(default_factory=list)
    stats_written: int = 0  # statistics files (re)written
    removed_temp: int = 0   # leftover temporary files of an interrupted run removed


def _counts(train_ids: np.ndarray) -> list[int]:
    return np.bincount(train_ids.ravel(), minlength=256)[:L.NUM_CLASSES].astype(np.int64).tolist()


def _prepare_one(job):
    """(dataset, item, cached mtime_ns or None) -> (name, counts, mtime_ns, status)."""
    dataset, item, cached_mtime = job
    out = item.train_label
    try:
        st_out = os.stat(out)
    except FileNotFoundError:
        st_out = None
    if st_out is not None and st_out.st_mtime_ns >= os.stat(item.label).st_mtime_ns:
        if cached_mtime == st_out.st_mtime_ns:
            return item.name, None, st_out.st_mtime_ns, "skipped"
        try:  # prepared by a run that stopped before saving statistics: recount (cheap, 8-bit PNG)
            lab = io_lib.read_label(out)
            if lab.dtype == np.uint8:
                return item.name, _counts(lab), st_out.st_mtime_ns, "recounted"
        except ValueError:
            pass  # unreadable output: rewrite it below
    raw = sources.read_raw_label(dataset, item.label)
    train_ids = sources.convert_label(dataset, raw)
    io_lib.write_label_png(out, train_ids)
    return item.name, _counts(train_ids), os.stat(out).st_mtime_ns, "written"


def _write_json_atomic(path: str, obj) -> bool:
    """Writes `obj` as JSON unless the file already holds exactly that; True if written."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    try:
        with open(path) as f:
            if f.read() == text:
                return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    io_lib.write_text_atomic(path, text)
    return True


def _previous_stats(path: str) -> dict:
    try:
        with open(path) as f:
            raw = json.load(f)
        if raw.get("format") == sources.STATS_FORMAT:
            return raw["images"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    return {}


def _remove_stale_temps(items) -> int:
    removed = 0
    for d in sorted({os.path.dirname(it.train_label) for it in items}):
        for f in os.listdir(d):
            if f.startswith(".") and f.endswith(".tmp") and sources.TRAIN_ID_SUFFIX in f:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(d, f))
                    removed += 1
    return removed


@contextlib.contextmanager
def _lock(root: str):
    path = os.path.join(root, LOCK_NAME)
    try:
        f = open(path, "a")
    except OSError as e:
        raise sources.DatasetLayoutError(
            f"cannot write to {root} ({e}); prepare_data writes the train-id labels beside the "
            "originals, so the dataset root must be writable (copy it to writable storage)") from e
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another prepare_data run holds {path}; wait for it to finish "
                               "(or delete the file if no such run exists)") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(dataset: str, root: str, workers: int | None = None, progress: bool = True) -> Report:
    """Prepares `root` (see the module docstring); returns what was done."""
    if dataset not in sources.DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sources.DATASETS}")
    root = os.path.abspath(os.path.expanduser(root))
    splits = {split: sources.list_items(dataset, root, split) for split in SPLITS[dataset]}
    workers = max(1, int(workers or os.cpu_count() or 1))
    report = Report()
    with _lock(root):
        all_items = [it for items in splits.values() for it in items]
        report.removed_temp = _remove_stale_temps(all_items)
        for split, items in splits.items():
            stats_path = sources.class_stats_file(root, split)
            previous = _previous_stats(stats_path)
            jobs = [(dataset, it, previous.get(it.name, {}).get("mtime_ns")) for it in items]
            results = _run(jobs, workers, progress, f"{dataset} {split}")
            images = {}
            for name, counts, mtime_ns, status in results:
                if counts is None:
                    counts = previous[name]["counts"]
                images[name] = {"counts": counts, "mtime_ns": mtime_ns}
                setattr(report, status, getattr(report, status) + 1)
            samples_with_class = {str(c): sorted(n for n, v in images.items() if v["counts"][c] > 0)
                                  for c in range(L.NUM_CLASSES)}
            obj = {"format": sources.STATS_FORMAT, "dataset": dataset, "split": split,
                   "num_classes": L.NUM_CLASSES, "class_names": list(L.CLASS_NAMES),
                   "images": images, "samples_with_class": samples_with_class,
                   "class_pixels": np.sum([v["counts"] for v in images.values()], 0).tolist()}
            report.stats_written += _write_json_atomic(stats_path, obj)
            report.stats_files.append(stats_path)
    return report


def _run(jobs, workers: int, progress: bool, desc: str):
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc=desc, unit="label", file=sys.stderr)
    out = []
    try:
        if workers == 1 or len(jobs) < 2:
            for job in jobs:
                out.append(_prepare_one(job))
                if bar:
                    bar.update()
        else:
            # Processes, not threads: decoding (and pypng, the SYNTHIA fallback) holds the GIL.
            with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for r in pool.imap_unordered(_prepare_one, jobs, chunksize=8):
                    out.append(r)
                    if bar:
                        bar.update()
    finally:
        if bar:
            bar.close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipa_jax.tools.prepare_data",
        description="Write <label>_labelTrainIds.png beside every label and the class statistics "
                    "for Rare Class Sampling. Idempotent and resumable.")
    parser.add_argument("dataset", choices=sources.DATASETS)
    parser.add_argument("root", help="dataset root (gta: holds images/ and labels/; synthia: RGB/ "
                                     "and GT/LABELS/; cityscapes: leftImg8bit/ and gtFine/)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: all CPU cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        r = prepare(args.dataset, args.root, args.workers, progress=not args.no_progress)
    except (sources.DatasetLayoutError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    print(f"prepare_data {args.dataset}: {r.written} written, {r.skipped} already prepared, "
          f"{r.recounted} recounted; statistics: {', '.join(r.stats_files)}"
          f"{' (unchanged)' if not r.stats_written else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
