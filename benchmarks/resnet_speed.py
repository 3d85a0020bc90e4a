"""The ResNet rows of benchmarks/model_speed.py: DeepLabV2 (dilated Caffe ResNet-50 / 101 + the DACS
classifier) in pipa_jax against the PyTorch reference of tests/test_resnet.py (proven equal to
1e-4 there), on this CPU.

Per depth: forward (eval mode) and one training step (train-mode BatchNorm, cross-entropy of the
stride-8 logits upsampled with align_corners=True, backward, SGD momentum 0.9 + weight decay;
both sides plain SGD over every parameter), batch 2 at --size, float32; JAX compile time and
XLA's memory estimate. Rows are interleaved round by round (JAX, PyTorch, ...) so that load drift
hits both alike; medians, minima, every run, and the median of the per-round ratios.

    python benchmarks/resnet_speed.py [--depths 50,101] [--size 256] [--repeats 5] \
        [--out benchmarks/results/resnet_speed]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir))
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))
sys.path.insert(0, HERE)
from model_speed import jax_compile, loadavg, log, machine_info, run_rounds, summary, xla_memory  # noqa: E402
from test_resnet import RefDeepLabV2, ours  # noqa: E402

from pipa_jax import io as io_lib  # noqa: E402
from pipa_jax.models import layers, resnet  # noqa: E402

NUM_CLASSES, LR, WD, MOMENTUM = 19, 2.5e-4, 5e-4, 0.9


def inputs(batch, size, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.standard_normal((batch, size, size, 3)).astype(np.float32)
    y = rs.randint(0, NUM_CLASSES, (batch, size, size)).astype(np.int32)
    return (jnp.asarray(x), jnp.asarray(y)), (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                                              torch.from_numpy(y.astype(np.int64)))


class JaxCase:
    framework = "jax"
    can_step = True
    skip_reason = None

    def __init__(self, name, depth, x, y):
        self.name = name
        model = ours(depth)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.n_params = int(sum(p.size for p in jax.tree.leaves(params)))
        tx = optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))
        opt_state = tx.init(params)

        def forward(params, rest, x):
            return nnx.merge(graphdef, params, rest)(x, train=False)

        def train_step(params, rest, opt_state, x, y):
            def loss_fn(p):
                m = nnx.merge(graphdef, p, rest, copy=True)
                logits = layers.resize_bilinear(m(x, train=True).astype(jnp.float32), y.shape[1:3], align_corners=True)
                _, _, new_rest = nnx.split(m, nnx.Param, ...)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_rest
            (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_rest, opt_state, loss

        self.x, self.y = x, y
        self.fwd, fl, fc = jax_compile(forward, (params, rest, x))
        self.step, sl, sc = jax_compile(train_step, (params, rest, opt_state, x, y), donate=(0, 1, 2))
        self.compile = {"forward": {"lower_s": fl, "compile_s": fc, "total_s": fl + fc},
                        "train_step": {"lower_s": sl, "compile_s": sc, "total_s": sl + sc}}
        self.memory = {"forward": xla_memory(self.fwd), "train_step": xla_memory(self.step)}
        self.state = (params, rest, opt_state)
        t0 = time.perf_counter()
        self.time_forward()
        t1 = time.perf_counter()
        self.time_step()
        self.first_run = {"forward_s": t1 - t0, "train_step_s": time.perf_counter() - t1}

    def time_forward(self):
        params, rest, _ = self.state
        t0 = time.perf_counter()
        jax.block_until_ready(self.fwd(params, rest, self.x))
        return time.perf_counter() - t0

    def time_step(self):
        t0 = time.perf_counter()
        params, rest, opt_state, loss = self.step(*self.state, self.x, self.y)
        jax.block_until_ready(loss)
        self.state = (params, rest, opt_state)
        return time.perf_counter() - t0


class TorchCase:
    framework = "pytorch"
    can_step = True
    skip_reason = None

    def __init__(self, name, depth, x, y):
        self.name = name
        torch.manual_seed(0)
        self.model = RefDeepLabV2(resnet.RESNET_DEPTHS[depth])
        self.n_params = int(sum(p.numel() for p in self.model.parameters()))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        self.x, self.y = x, y
        t0 = time.perf_counter()
        self.time_forward()
        t1 = time.perf_counter()
        self.time_step()
        self.first_run = {"forward_s": t1 - t0, "train_step_s": time.perf_counter() - t1}

    def time_forward(self):
        self.model.eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model(self.x)
        return time.perf_counter() - t0

    def time_step(self):
        self.model.train()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        logits = F.interpolate(self.model(self.x), size=self.y.shape[1:], mode="bilinear", align_corners=True)
        F.cross_entropy(logits, self.y).backward()
        self.opt.step()
        return time.perf_counter() - t0


def bench(depth, batch, size, repeats, warmup):
    (jx, jy), (tx, ty) = inputs(batch, size)
    log(f"[resnet{depth}] compiling ...")
    cases = [JaxCase(f"jax_resnet{depth}", depth, jx, jy), TorchCase(f"torch_resnet{depth}", depth, tx, ty)]
    for _ in range(warmup):
        for c in cases:
            c.time_forward()
            c.time_step()
    runs = run_rounds(cases, repeats)
    j, t = (c.name for c in cases)
    out = {"rows": {}, "ratios": {}}
    for c in cases:
        out["rows"][c.name] = {"framework": c.framework, "n_params": c.n_params, "first_run": c.first_run,
                               "forward": summary(runs[c.name]["forward"]),
                               "train_step": summary(runs[c.name]["train_step"])}
        if c.framework == "jax":
            out["rows"][c.name].update(compile=c.compile, xla_memory=c.memory)
    for w in ("forward", "train_step"):
        per = [a / b for a, b in zip(runs[j][w], runs[t][w])]
        out["ratios"][w] = {"median_of_round_ratios": statistics.median(per), "per_round": [round(p, 4) for p in per]}
    return out


def markdown(res) -> str:
    lines = [f"# DeepLabV2-ResNet speed: pipa_jax vs the PyTorch reference, {res['date']}", "",
             f"Command: `{res['command']}`", f"Machine: {json.dumps(res['machine'])}",
             f"Batch {res['batch']}, {res['size']}x{res['size']}, float32; load {res['loadavg_start']} -> {res['loadavg_end']}", "",
             "| network | framework | params | forward median (s) | train step median (s) | compile fwd / step (s) | XLA step memory (GiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for depth, r in res["depths"].items():
        for name, row in r["rows"].items():
            comp = (f"{row['compile']['forward']['total_s']:.1f} / {row['compile']['train_step']['total_s']:.1f}"
                    if "compile" in row else "-")
            mem = f"{row['xla_memory']['train_step']['total_gib']:.2f}" if "xla_memory" in row else "-"
            lines.append(f"| resnet{depth} | {row['framework']} | {row['n_params'] / 1e6:.1f} M | "
                         f"{row['forward']['median']:.3f} | {row['train_step']['median']:.3f} | {comp} | {mem} |")
    lines += ["", "JAX / PyTorch time, median of the per-round ratios (< 1: JAX faster):", ""]
    for depth, r in res["depths"].items():
        lines.append(f"- resnet{depth}: forward {r['ratios']['forward']['median_of_round_ratios']:.2f}, "
                     f"train step {r['ratios']['train_step']['median_of_round_ratios']:.2f} "
                     f"(per round: {r['ratios']['train_step']['per_round']})")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="50,101")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "resnet_speed"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    res = {"command": shlex.join(["python", "benchmarks/resnet_speed.py"] + sys.argv[1:]),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine_info(),
           "loadavg_start": loadavg(), "batch": args.batch, "size": args.size, "depths": {}}
    for d in (int(s) for s in args.depths.split(",")):
        res["depths"][str(d)] = bench(d, args.batch, args.size, args.repeats, args.warmup)
    res["loadavg_end"] = loadavg()
    io_lib.write_json_atomic(args.out + ".json", res, indent=1, sort_keys=False)
    io_lib.write_text_atomic(args.out + ".md", markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
