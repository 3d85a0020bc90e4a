"""Every method on the synthetic domain pair, several seeds: the embedded default's accuracy table.

  python benchmarks/synthetic_uda.py --seeds 0,1,2 --out benchmarks/results/synthetic_uda
  python benchmarks/synthetic_uda.py --config configs/synthetic_hrda.py --seeds 0,1,2 \
      --runs_dir runs/synthetic_uda_hrda --out benchmarks/results/synthetic_uda_hrda

Each run is the README's main command (`python -m pipa_jax.main --config configs/synthetic.py:method=M
--config.seed=S`) in its own process and workdir, so the table measures exactly what users run.
Source-only runs go first; the other methods of the same seed show the source-only prediction as
the baseline column of their predictions.png. A run whose workdir already holds a finished result
is not repeated (delete the workdir to redo it), so an interrupted benchmark resumes.
Reported: the final student's target-val mIoU (mean and sample std over seeds), per-class IoU
means, and wall time per run (which includes compilation). With a config that defines pairs to
compare (COMPARISONS: HRDA against DAFormer at the same student pixels, HRDA + PiPa against HRDA),
the table adds their per-seed differences (same seed = same data order and initialisation).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pipa_jax import io as io_lib  # noqa: E402  (the atomic writer)
# The methods each config file offers, in table order, and the pairs (a, b) whose difference a - b
# the table reports seed by seed.
SUITES = {
    "configs/synthetic.py": (("source_only", "oracle", "dacs", "daformer", "pixel_only", "patch_only", "pipa",
                              "mic", "pipa_mic"),
                             (("pipa", "daformer"), ("mic", "daformer"), ("mic", "pipa"), ("pipa_mic", "pipa"))),
    "configs/synthetic_hrda.py": (("source_only", "oracle", "daformer", "hrda", "pipa", "mic", "pipa_mic"),
                                  (("hrda", "daformer"), ("pipa", "hrda"), ("mic", "hrda"), ("mic", "pipa"),
                                   ("pipa_mic", "pipa"))),
    # ProDA: every stage in one workdir (`python -m pipa_jax.proda run`); the method names the warm-up.
    "configs/synthetic_proda.py": (("proda", "proda_source_warmup"), (("proda", "proda_source_warmup"),)),
}
METHODS = SUITES["configs/synthetic.py"][0]
PRODA_WARMUP = {"proda": "adversarial", "proda_source_warmup": "source_only"}


def run_one(method: str, seed: int, workdir: str, extra: list[str], baseline: str | None,
            config_args: str = "", config: str = "configs/synthetic.py") -> dict:
    result_file = os.path.join(workdir, "benchmark_run.json")
    if os.path.exists(result_file):
        with open(result_file) as f:
            return json.load(f)
    proda = method in PRODA_WARMUP
    if proda:
        cmd = [sys.executable, "-m", "pipa_jax.proda", "run", "--config",
               f"{config}:warmup={PRODA_WARMUP[method]}{config_args}", "--workdir", workdir,
               f"--config.seed={seed}", *extra]
    else:
        cmd = [sys.executable, "-m", "pipa_jax.main", "--config", f"{config}:method={method}{config_args}",
               "--workdir", workdir, f"--config.seed={seed}", *extra]
    if baseline:
        cmd.append(f"--config.report.baseline_workdir={baseline}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{method} seed {seed} failed (exit {proc.returncode}): {' '.join(cmd)}")
    final_dir = os.path.join(workdir, "stage3") if proda else workdir
    with open(os.path.join(final_dir, "metrics.json")) as f:
        history = json.load(f)
    last = history[max(history, key=int)]
    rec = {"method": method, "seed": seed, "wall_s": wall, "command": " ".join(cmd[1:]),
           "miou": last["student"]["miou"], "per_class_iou": last["student"]["per_class_iou"],
           "teacher_miou": last.get("teacher", {}).get("miou")}
    if proda:      # every stage's final student
        rec["stage_miou"] = {}
        for stage in ("warmup", "stage1", "stage2", "stage3"):
            with open(os.path.join(workdir, stage, "done.json")) as f:
                rec["stage_miou"][stage] = json.load(f).get("miou")
    io_lib.write_json_atomic(result_file, rec, indent=1, sort_keys=False)
    return rec


def summarize(runs: list[dict], methods=METHODS) -> dict:
    out = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        mi = [100 * r["miou"] for r in rs]
        names = list(rs[0]["per_class_iou"])
        per_class = {}
        for n in names:
            vals = [r["per_class_iou"][n] for r in rs if r["per_class_iou"][n] is not None]
            per_class[n] = 100 * statistics.mean(vals) if vals else None
        teach = [100 * r["teacher_miou"] for r in rs if r.get("teacher_miou") is not None]
        out[m] = {"miou_mean": statistics.mean(mi), "miou_std": statistics.stdev(mi) if len(mi) > 1 else 0.0,
                  "teacher_miou_mean": statistics.mean(teach) if teach else None,
                  "mious": mi, "wall_s_median": statistics.median(r["wall_s"] for r in rs),
                  "per_class_iou_mean": per_class, "seeds": [r["seed"] for r in rs]}
        if all("stage_miou" in r for r in rs):
            out[m]["stage_miou_mean"] = {st: 100 * statistics.mean(r["stage_miou"][st] for r in rs)
                                         for st in rs[0]["stage_miou"]}
    return out


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"# Synthetic domain pair: target-val mIoU (%) of the final student, {meta['date']}", "",
             f"Command: `{meta['command']}`", f"Machine: {meta['machine']}", "",
             "Wall time is the whole command (start-up, compilation, training, evaluations, report); "
             "runs after the first share XLA's persistent compilation cache. "
             f"Runs at a time: {meta.get('jobs', 1)} (with 2, each run's wall time is longer than alone).", "",
             "| method | mIoU mean | std | runs | per seed | teacher mIoU mean | median wall time (s) |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for m, s in summary.items():
        teacher = "-" if s.get("teacher_miou_mean") is None else f"{s['teacher_miou_mean']:.1f}"
        lines.append(f"| {m} | {s['miou_mean']:.1f} | {s['miou_std']:.1f} | {len(s['mious'])} | "
                     f"{', '.join(f'{v:.1f}' for v in s['mious'])} | {teacher} | {s['wall_s_median']:.0f} |")
    staged = {m: s["stage_miou_mean"] for m, s in summary.items() if "stage_miou_mean" in s}
    if staged:
        stages = list(next(iter(staged.values())))
        lines += ["", "Every stage's final student (mIoU mean over seeds):", "",
                  "| method | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
        lines += [f"| {m} | " + " | ".join(f"{v[st]:.1f}" for st in stages) + " |" for m, v in staged.items()]
    for a, b in meta.get("comparisons", ()):
        if a in summary and b in summary:
            sa, sb = summary[a], summary[b]
            diffs = [x - y for s, x in zip(sa["seeds"], sa["mious"]) for t, y in zip(sb["seeds"], sb["mious"]) if s == t]
            if diffs:
                std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                lines += ["", f"{a} - {b}, seed by seed: {', '.join(f'{d:+.1f}' for d in diffs)} "
                          f"(mean {statistics.mean(diffs):+.1f}, std {std:.1f}; {sum(d > 0 for d in diffs)} of "
                          f"{len(diffs)} seeds positive)"]
    if "source_only" in summary:
        base = summary["source_only"]["miou_mean"]
        lines += ["", "Differences to source-only (mIoU points): " + ", ".join(
            f"{m} {s['miou_mean'] - base:+.1f}" for m, s in summary.items() if m != "source_only")]
        checks = [("oracle", 25.0), ("daformer", 10.0), ("pipa", 10.0)] if meta.get("default_targets") else []
        verdicts = [f"{m} - source_only = {summary[m]['miou_mean'] - base:+.1f} (target >= {t:.0f}: "
                    f"{'met' if summary[m]['miou_mean'] - base >= t else 'NOT met'})"
                    for m, t in checks if m in summary]
        if verdicts:
            lines += ["", "Targets of the embedded default (means over seeds): " + "; ".join(verdicts) + "."]
    names = list(next(iter(summary.values()))["per_class_iou_mean"])
    lines += ["", "Per-class IoU (%), mean over seeds ('-': class absent from the target val split)", "",
              "| class | " + " | ".join(summary) + " |", "|---|" + "---:|" * len(summary)]
    for n in names:
        cells = [summary[m]["per_class_iou_mean"][n] for m in summary]
        lines.append(f"| {n} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/synthetic.py", choices=sorted(SUITES))
    ap.add_argument("--methods", default="", help="comma-separated (default: every method of --config)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs_dir", default=os.path.join(ROOT, "runs", "synthetic_uda"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "synthetic_uda"))
    ap.add_argument("--extra", default="", help="extra --config.x=y overrides, space separated")
    ap.add_argument("--config_args", default="", help="appended to the config argument, e.g. ',tiny'")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each is its own process)")
    ap.add_argument("--finished_only", action="store_true",
                    help="run nothing: tabulate the runs in --runs_dir that have finished")
    args = ap.parse_args()
    suite, comparisons = SUITES[args.config]
    methods = [m for m in args.methods.split(",") if m] or list(suite)
    unknown = set(methods) - set(suite)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)} for {args.config}; expected some of {', '.join(suite)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = args.extra.split()

    def one(m, seed):
        workdir = os.path.join(args.runs_dir, f"{m}_seed{seed}")
        if args.finished_only and not os.path.exists(os.path.join(workdir, "benchmark_run.json")):
            return None
        base = os.path.join(args.runs_dir, f"source_only_seed{seed}")
        baseline = base if m != "source_only" and os.path.exists(os.path.join(base, "metrics.json")) else None
        rec = run_one(m, seed, workdir, extra, baseline, args.config_args, args.config)
        print(f"{m:12s} seed {seed}: mIoU {100 * rec['miou']:.1f}  ({rec['wall_s']:.0f} s)", flush=True)
        return rec

    # Source-only runs first: the other methods of the same seed show their prediction as the
    # baseline column. With --jobs N, N runs share the machine at a time (each run's wall time
    # then grows, so compare wall times only between benchmarks run with the same --jobs).
    first = [("source_only", s) for s in seeds] if "source_only" in methods else []
    rest = [(m, s) for s in seeds for m in methods if m != "source_only"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        first = list(pool.map(lambda ms: one(*ms), first))
        rest = list(pool.map(lambda ms: one(*ms), rest))
    by_key = {(r["method"], r["seed"]): r for r in first + rest if r is not None}
    runs = [by_key[(m, s)] for s in seeds for m in sorted(methods, key=lambda m: m != "source_only")
            if (m, s) in by_key]
    meta = {"date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(os.path.relpath(a, ROOT) if a.startswith(ROOT) else a
                                            for a in sys.argv),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
            "jobs": args.jobs, "comparisons": comparisons,
            "default_targets": args.config == "configs/synthetic.py" and not args.config_args}
    summary = summarize(runs, suite)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    io_lib.write_json_atomic(args.out + ".json", {"meta": meta, "summary": summary, "runs": runs}, indent=1,
                             sort_keys=False)
    io_lib.write_text_atomic(args.out + ".md", markdown(summary, meta))
    print(markdown(summary, meta))


if __name__ == "__main__":
    main()
