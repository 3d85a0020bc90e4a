"""Training data loader throughput at GTA5 -> Cityscapes size, by number of worker processes.

Builds a fake layout in a temporary directory: GTA5 frames at the native 1914x1052 (copies of the
real sample frame, lightly varied so PNG decoding is not trivially cached) with label-id PNGs,
and Cityscapes frames at 2048x1024; prepares both with prepare_data; then times
`pipeline.train_iterator` with the DAFormer recipe (source resize (1280, 720), target (1024, 512),
512x512 crops with the 75 % rule, Rare Class Sampling, batch 2 + 2) for each --workers value
(0 = grain ReadOptions threads in this process, N > 0 = grain mp_prefetch with N processes).
Images/s counts source + target images (4 per batch). The first batches (worker start-up) are
excluded from the rate and reported separately.

    python benchmarks/loader.py [--workers 0,1,2] [--batches 20] [--images 12] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pipa_jax import config as config_lib  # noqa: E402
from pipa_jax.data import pipeline  # noqa: E402
from pipa_jax.tools import prepare_data  # noqa: E402

SHARED = os.environ.get("PIPA_SHARED_DATA", "/work/shared/data")


def _label_ids(h, w, rng):
    lab = np.full((h, w), 7, np.uint8)
    lab[: h // 3] = 23
    lab[h // 3: h // 2] = 11
    for cid in rng.choice([26, 24, 20, 17, 31, 32, 33, 28], size=6):
        y, x = rng.integers(h // 3, h - 60), rng.integers(0, w - 200)
        lab[y:y + rng.integers(20, 200), x:x + rng.integers(20, 200)] = cid
    return lab


def make_layout(base: str, n: int) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    gta = Image.open(os.path.join(SHARED, "gta/images/fda_demo_source.png")).convert("RGB")
    cs = Image.open(os.path.join(SHARED, "demos/fda_target_cityscapes_2048x1024.png")).convert("RGB")
    g_root, c_root = os.path.join(base, "gta"), os.path.join(base, "cityscapes")
    os.makedirs(os.path.join(g_root, "images"))
    os.makedirs(os.path.join(g_root, "labels"))
    for i in range(n):
        arr = np.asarray(gta).astype(np.int16) + rng.integers(-3, 4, (1, 1, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(os.path.join(g_root, "images", f"{i:05d}.png"))
        Image.fromarray(_label_ids(1052, 1914, rng)).save(os.path.join(g_root, "labels", f"{i:05d}.png"))
    for i in range(n):
        name = f"aachen_{i:06d}_000019"
        for sub, fname, im in (("leftImg8bit", f"{name}_leftImg8bit.png", cs),
                               ("gtFine", f"{name}_gtFine_labelIds.png",
                                Image.fromarray(_label_ids(1024, 2048, rng)))):
            d = os.path.join(c_root, sub, "train", "aachen")
            os.makedirs(d, exist_ok=True)
            im.save(os.path.join(d, fname))
    for sub, src in (("leftImg8bit", "aachen_000000_000019_leftImg8bit.png"),
                     ("gtFine", "aachen_000000_000019_gtFine_labelIds.png")):
        d = os.path.join(c_root, sub, "val", "frankfurt")
        os.makedirs(d)
        shutil.copy(os.path.join(c_root, sub, "train", "aachen", src),
                    os.path.join(d, src.replace("aachen", "frankfurt")))
    return g_root, c_root


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="0,1,2", help="comma-separated worker-process counts")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first batches per setting")
    ap.add_argument("--images", type=int, default=12, help="fake images per domain")
    ap.add_argument("--threads", type=int, default=2, help="config.data.prefetch (threads)")
    args = ap.parse_args()
    from absl import flags
    flags.FLAGS.mark_as_parsed()

    base = tempfile.mkdtemp(prefix="pipa_loader_bench_")
    try:
        t = time.perf_counter()
        g_root, c_root = make_layout(base, args.images)
        t_make = time.perf_counter() - t
        t = time.perf_counter()
        prepare_data.prepare("gta", g_root, workers=os.cpu_count(), progress=False)
        t_gta = time.perf_counter() - t
        prepare_data.prepare("cityscapes", c_root, workers=os.cpu_count(), progress=False)
        print(f"layout: {args.images} GTA frames 1914x1052 + {args.images} Cityscapes 2048x1024 "
              f"(made in {t_make:.1f} s; GTA labels prepared in {t_gta:.1f} s)")
        print(f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

        c = config_lib.base_config()
        c.batch_size = 2
        c.data.source, c.data.target = "gta", "cityscapes"
        c.data.source_root, c.data.target_root = g_root, c_root
        c.data.rcs.enabled = True
        c.data.prefetch = args.threads
        rows = []
        for w in [int(x) for x in args.workers.split(",") if x != ""]:
            c.data.workers = w
            t0 = time.perf_counter()
            it = pipeline.train_iterator(c)
            for _ in range(args.warmup):
                next(it)
            t1 = time.perf_counter()
            for _ in range(args.batches):
                b = next(it)
            t2 = time.perf_counter()
            it.close()
            assert b["source_image"].shape == (2, 512, 512, 3)
            ips = 4 * args.batches / (t2 - t1)
            rows.append((w, args.warmup, t1 - t0, ips))
            print(f"workers={w} threads={args.threads}: first {args.warmup} batches {t1 - t0:.1f} s; "
                  f"{ips:.2f} images/s ({args.batches} batches, {(t2 - t1) / args.batches:.2f} s/batch)",
                  flush=True)
        print("\n| workers | threads | start-up + first batches (s) | images/s (source + target) |")
        print("|---|---|---|---|")
        for w, n0, ts, ips in rows:
            print(f"| {w} | {args.threads} | {ts:.1f} ({n0} batches) | {ips:.2f} |")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
