"""Model speed on this CPU: pipa_jax (JAX / Flax NNX) vs HuggingFace transformers' PyTorch MiT.

Measures, for MiT-b0 and MiT-b5 at batch 2, 512x512 (float32):

* forward (eval mode) and one training step (forward + backward + AdamW, train mode: batch-stat
  BatchNorm, dropout, drop path) of
    - our Segmentor with the DAFormer head            vs HF SegformerModel + a PyTorch DAFormer head
                                                       (the independent reference of
                                                       tests/test_head_parity.py)                [like-for-like]
    - our Segmentor with the SegFormer all-MLP head    vs HF SegformerForSemanticSegmentation  [like-for-like]
    - our MixVisionTransformer encoder alone           vs HF SegformerModel                      [like-for-like]
  Segmentation rows use the mean cross-entropy of the stride-4 logits vs random labels; encoder
  rows use sum_i mean(stage_i output).
* JAX compile time (jax.jit(...).lower(...) and .compile(), timed separately) of each function.
* the design choices of the encoder: dwconv_impl 'shift' vs 'native' and scan_blocks True vs False,
  compile time (b0 and b5) and step / forward time (b0; b5 with --ablation-steps b0,b5).

Frameworks are interleaved round by round (JAX row, PyTorch row, ...) so that load drift on a
shared machine hits both alike; every timing is reported as median, min and all runs.
PyTorch runs eagerly with torch.set_num_threads(nproc); JAX runs with its defaults.

    python benchmarks/model_speed.py [--variants b0,b5] [--repeats N] [--out benchmarks/results/model_speed]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
import transformers
from flax import nnx
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerModel

import flax
from pipa_jax.models import ComputeForms, MixVisionTransformer, build_segmentor, default_model_config
from pipa_jax.models.mit import MIT_VARIANTS

# The PyTorch DAFormer head: the test suite's reference, written from docs/method.md §2.2 (mmseg has
# no installable DAFormer head); tests/test_head_parity.py proves it equal to ours to 1e-4.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from test_head_parity import TDAFormerHead  # noqa: E402

NUM_CLASSES = 19
LR, WD = 6e-5, 0.01
DEFAULT_REPEATS = {"b0": 5, "b5": 3}
DEFAULT_WARMUP = {"b0": 0, "b5": 0}  # extra rounds after the first (post-compile) call, which is the warm-up


# ----------------------------------------------------------------------------- helpers

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def summary(runs: list[float]) -> dict | None:
    if not runs:
        return None
    return {"median": statistics.median(runs), "min": min(runs), "runs": [round(r, 5) for r in runs]}


def log(*a):
    print(*a, flush=True)


def machine_info() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import jaxlib
    return {
        "nproc": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(),
        "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(), "jax_devices": len(jax.devices()),
        "flax": flax.__version__, "optax": optax.__version__, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }


# ----------------------------------------------------------------------------- JAX side

def seg_config(variant: str, head: str = "daformer", dwconv: str = "shift", scan="auto"):
    c = default_model_config()
    c.backbone = f"mit_{variant}"
    c.decode_head = head
    c.num_classes = NUM_CLASSES
    c.pixel_head = False
    c.patch_head = False
    c.dwconv_impl = dwconv
    c.scan_blocks = str(scan)  # a string field: 'auto', 'True' or 'False'
    return c


def build_jax_model(variant, kind, dwconv="shift", scan="auto", abstract=False):
    """kind: 'daformer' | 'segformer' (Segmentor with that head) | 'encoder' (MiT alone)."""
    def make():
        if kind == "encoder":
            return MixVisionTransformer(variant, drop_path_rate=0.1, rngs=nnx.Rngs(params=0),
                                        forms=ComputeForms(dwconv=dwconv, scan_blocks=scan))
        return build_segmentor(seg_config(variant, kind, dwconv, scan))
    return nnx.eval_shape(make) if abstract else make()


def jax_loss(kind, out, y):
    if kind == "encoder":
        return sum(jnp.mean(o) for o in out)
    return optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), y).mean()


def make_jax_fns(graphdef, kind, tx):
    """Fresh function objects on each call, so nothing is served from JAX's tracing caches."""

    def forward(params, rest, x):
        return nnx.merge(graphdef, params, rest)(x, train=False)

    def train_step(params, rest, opt_state, x, y, key):
        def loss_fn(p):
            # copy=True: the BatchStat variables are created (and mutated) at this trace level
            model = nnx.merge(graphdef, p, rest, copy=True)
            out = model(x, train=True, rng=key)
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            return jax_loss(kind, out, y), new_rest

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss

    return forward, train_step


def jax_compile(fn, args, donate=()):
    """(compiled, lower_s, compile_s) with jax.jit(fn).lower(*args).compile()."""
    jitted = jax.jit(fn, donate_argnums=donate)
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1


def abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def xla_memory(compiled) -> dict:
    """XLA's buffer assignment of a compiled function, GiB (temp = activations and scratch)."""
    ma = compiled.memory_analysis()
    g = 2.0 ** 30
    temp, arg, out = ma.temp_size_in_bytes / g, ma.argument_size_in_bytes / g, ma.output_size_in_bytes / g
    alias = getattr(ma, "alias_size_in_bytes", 0) / g
    return {"temp_gib": temp, "argument_gib": arg, "output_gib": out, "alias_gib": alias,
            "total_gib": temp + arg + out - alias}


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2.0 ** 20
    return float("inf")


class JaxCase:
    framework = "jax"

    def __init__(self, name, variant, kind, x, y, dwconv="shift", scan="auto"):
        self.name, self.kind = name, kind
        model = build_jax_model(variant, kind, dwconv, scan)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        del model
        self.tx = optax.adamw(LR, weight_decay=WD)
        opt_state = self.tx.init(params)
        self.n_params = int(sum(p.size for p in jax.tree.leaves(params)))
        forward, train_step = make_jax_fns(graphdef, kind, self.tx)
        self.x, self.y, self.key = x, y, jax.random.key(0)
        self.fwd, fl, fc = jax_compile(forward, (params, rest, x))
        self.step, sl, sc = jax_compile(train_step, (params, rest, opt_state, x, y, self.key), donate=(0, 1, 2))
        self.compile = {"forward": {"lower_s": fl, "compile_s": fc, "total_s": fl + fc},
                        "train_step": {"lower_s": sl, "compile_s": sc, "total_s": sl + sc}}
        self.memory = {"forward": xla_memory(self.fwd), "train_step": xla_memory(self.step)}
        self.state = (params, rest, opt_state)
        # A train step whose XLA buffers do not fit in the memory available now is not run (an
        # out-of-memory kill would lose the whole benchmark); its compile time and need are reported.
        need, avail = self.memory["train_step"]["total_gib"], mem_available_gib()
        self.can_step = need < 0.9 * avail
        self.skip_reason = None if self.can_step else (
            f"train step not run: XLA needs {need:.1f} GiB (temp {self.memory['train_step']['temp_gib']:.1f}), "
            f"{avail:.1f} GiB available")
        if self.skip_reason:
            log(f"    {name}: {self.skip_reason}")
        # first executions (allocation, thunk setup): recorded, not part of the medians
        t0 = time.perf_counter()
        jax.block_until_ready(self.fwd(params, rest, x))
        t1 = time.perf_counter()
        if self.can_step:
            self._run_step()
        t2 = time.perf_counter()
        self.first_run = {"forward_s": t1 - t0, "train_step_s": (t2 - t1) if self.can_step else None}

    def _run_step(self):
        params, rest, opt_state, loss = self.step(*self.state, self.x, self.y, self.key)
        jax.block_until_ready(loss)
        self.state = (params, rest, opt_state)
        return float(loss)

    def time_forward(self):
        params, rest, _ = self.state
        t0 = time.perf_counter()
        jax.block_until_ready(self.fwd(params, rest, self.x))
        return time.perf_counter() - t0

    def time_step(self):
        t0 = time.perf_counter()
        self._run_step()
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- PyTorch side

def hf_config(variant):
    v = MIT_VARIANTS[variant]
    return SegformerConfig(hidden_sizes=list(v.embed_dims), depths=list(v.depths),
                           num_attention_heads=list(v.num_heads), sr_ratios=list(v.sr_ratios),
                           mlp_ratios=[v.mlp_ratio] * 4, drop_path_rate=0.1, hidden_act="gelu",
                           decoder_hidden_size=256, classifier_dropout_prob=0.1, num_labels=NUM_CLASSES)


class TorchDAFormerSegmentor(torch.nn.Module):
    """HF SegformerModel (the MiT encoder) + the PyTorch DAFormer head, as the official network."""

    def __init__(self, cfg):
        super().__init__()
        self.encoder = SegformerModel(cfg)
        self.head = TDAFormerHead(cfg.hidden_sizes, NUM_CLASSES, 256, (1, 6, 12, 18))

    def forward(self, x):
        return self.head(list(self.encoder(x, output_hidden_states=True).hidden_states))


class TorchCase:
    framework = "pytorch"
    can_step = True
    skip_reason = None

    def __init__(self, name, variant, kind, x, y):
        """kind: 'daformer' (SegformerModel + DAFormer head) | 'segformer'
        (SegformerForSemanticSegmentation) | 'encoder' (SegformerModel)."""
        self.name, self.kind = name, kind
        torch.manual_seed(0)
        cfg = hf_config(variant)
        self.model = {"daformer": TorchDAFormerSegmentor, "segformer": SegformerForSemanticSegmentation,
                      "encoder": SegformerModel}[kind](cfg)
        hf = self.model.encoder if kind == "daformer" else self.model
        self.attn_impl = hf.config._attn_implementation
        self.n_params = int(sum(p.numel() for p in self.model.parameters()))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WD)
        self.x, self.y = x, y
        t0 = time.perf_counter()
        self.time_forward()
        t1 = time.perf_counter()
        self.time_step()
        t2 = time.perf_counter()
        self.first_run = {"forward_s": t1 - t0, "train_step_s": t2 - t1}

    def _out(self):
        if self.kind == "encoder":
            return self.model(self.x, output_hidden_states=True).hidden_states
        if self.kind == "daformer":
            return self.model(self.x)
        return self.model(self.x).logits

    def time_forward(self):
        self.model.eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            self._out()
        return time.perf_counter() - t0

    def time_step(self):
        self.model.train()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        out = self._out()
        if self.kind == "encoder":
            loss = sum(h.mean() for h in out)
        else:
            loss = F.cross_entropy(out, self.y)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- benchmark

def inputs(batch, size, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.standard_normal((batch, size, size, 3)).astype(np.float32)
    y = rs.randint(0, NUM_CLASSES, (batch, size // 4, size // 4)).astype(np.int32)
    jx, jy = jnp.asarray(x), jnp.asarray(y)
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    ty = torch.from_numpy(y.astype(np.int64))
    return (jx, jy), (tx, ty)


def run_rounds(cases, repeats, what=("forward", "train_step")):
    """Interleaved: each round times every case's forward, then every case's train step."""
    runs = {c.name: {w: [] for w in what} for c in cases}
    for r in range(repeats):
        for w in what:
            for c in cases:
                if w == "train_step" and not c.can_step:
                    continue
                t = c.time_forward() if w == "forward" else c.time_step()
                runs[c.name][w].append(t)
        log(f"    round {r + 1}/{repeats}: " + ", ".join(
            f"{c.name} " + " ".join(f"{w} {runs[c.name][w][-1]:.3f}s" for w in what if runs[c.name][w])
            for c in cases))
    return runs


PAIRS = (("jax_daformer", "torch_daformer"), ("jax_segformer", "torch_segformer"),
         ("jax_encoder", "torch_encoder"))
ROWS = ("jax_daformer", "torch_daformer", "jax_segformer", "torch_segformer", "jax_encoder", "torch_encoder")


def bench_main(variant, batch, size, repeats, warmup, rows=ROWS):
    (jx, jy), (tx, ty) = inputs(batch, size)
    log(f"[{variant}] building + compiling JAX models {[r for r in rows if r.startswith('jax')]} ...")
    cases = [JaxCase(name, variant, name.split("_", 1)[1], jx, jy) for name in ROWS
             if name in rows and name.startswith("jax")]
    log(f"[{variant}] building PyTorch models ...")
    cases += [TorchCase(name, variant, name.split("_", 1)[1], tx, ty) for name in ROWS
              if name in rows and name.startswith("torch")]
    order = list(ROWS)
    cases = sorted(cases, key=lambda c: order.index(c.name))
    for c in cases:
        if c.framework == "jax":
            log(f"    {c.name} compile: " + json.dumps(c.compile))
    # extra warm-up rounds (not recorded) after the first runs
    for _ in range(warmup):
        for c in cases:
            c.time_forward()
            if c.can_step:
                c.time_step()
    log(f"[{variant}] timing {repeats} interleaved rounds (load {loadavg()}) ...")
    runs = run_rounds(cases, repeats)
    out = {}
    for c in cases:
        out[c.name] = {"framework": c.framework, "n_params": c.n_params, "first_run": c.first_run,
                       "forward": summary(runs[c.name]["forward"]),
                       "train_step": summary(runs[c.name]["train_step"])}
        if c.framework == "jax":
            out[c.name]["compile"] = c.compile
            out[c.name]["xla_memory"] = c.memory
            out[c.name]["skipped"] = c.skip_reason
        else:
            out[c.name]["attn_implementation"] = c.attn_impl
    # per-round ratios (same round = same load), then their median
    ratios = {}
    for j, t in PAIRS:
        if j not in runs or t not in runs:
            continue
        for w in ("forward", "train_step"):
            per = [a / b for a, b in zip(runs[j][w], runs[t][w])]
            if not per:
                ratios[f"{j}/{t}:{w}"] = None
                continue
            ratios[f"{j}/{t}:{w}"] = {"median_of_round_ratios": statistics.median(per),
                                      "ratio_of_medians": statistics.median(runs[j][w]) / statistics.median(runs[t][w]),
                                      "per_round": [round(p, 4) for p in per]}
    del cases
    gc.collect()
    return out, ratios


def bench_ablation_compile(variant, batch, size, combos):
    """Compile time only (abstract model, no parameters allocated)."""
    res = {}
    for dw, scan in combos:
        model = build_jax_model(variant, "daformer", dw, scan, abstract=True)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = optax.adamw(LR, weight_decay=WD)
        opt_state = jax.eval_shape(tx.init, params)
        x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
        y = jax.ShapeDtypeStruct((batch, size // 4, size // 4), jnp.int32)
        key = jax.eval_shape(lambda: jax.random.key(0))
        forward, train_step = make_jax_fns(graphdef, "daformer", tx)
        cf, fl, fc = jax_compile(forward, (params, rest, x))
        cs, sl, sc = jax_compile(train_step, (params, rest, opt_state, x, y, key), donate=(0, 1, 2))
        name = f"dwconv={dw},scan_blocks={scan}"
        res[name] = {"forward": {"lower_s": fl, "compile_s": fc, "total_s": fl + fc},
                     "train_step": {"lower_s": sl, "compile_s": sc, "total_s": sl + sc},
                     "xla_memory": {"forward": xla_memory(cf), "train_step": xla_memory(cs)}}
        del cf, cs
        log(f"    [{variant}] {name}: forward lower {fl:.1f}s compile {fc:.1f}s; "
            f"train_step lower {sl:.1f}s compile {sc:.1f}s")
        gc.collect()
    return res


def bench_ablation_steps(variant, batch, size, combos, repeats, warmup):
    """Step / forward time (and compile time) of the MiT encoder alone for each design choice,
    interleaved. The encoder alone, because the DAFormer head's own depthwise convolutions in
    'native' form would dominate the step (see the parts benchmark)."""
    (jx, jy), _ = inputs(batch, size)
    cases = []
    for dw, scan in combos:
        cases.append(JaxCase(f"dwconv={dw},scan_blocks={scan}", variant, "encoder", jx, jy, dw, scan))
        log(f"    compiled {cases[-1].name}: " + json.dumps(cases[-1].compile))
    for _ in range(warmup):
        for c in cases:
            c.time_forward()
            if c.can_step:
                c.time_step()
    runs = run_rounds(cases, repeats)
    out = {c.name: {"compile": c.compile, "xla_memory": c.memory, "first_run": c.first_run,
                    "forward": summary(runs[c.name]["forward"]),
                    "train_step": summary(runs[c.name]["train_step"])} for c in cases}
    base = cases[0].name
    for c in cases[1:]:
        for w in ("forward", "train_step"):
            per = [a / b for a, b in zip(runs[c.name][w], runs[base][w])]
            out[c.name][f"{w}_ratio_vs_{base}"] = {"median_of_round_ratios": statistics.median(per),
                                                   "per_round": [round(p, 4) for p in per]}
    del cases
    gc.collect()
    return out


def bench_parts(batch, size, repeats):
    """Single layers at the shapes they run at, JAX vs PyTorch, forward and gradient (w.r.t.
    input and weight of 0.5 * sum(y^2)); for diagnosis. The DAFormer head works on
    [B, H/4, W/4, 4 * 256] for every MiT variant; the encoder's stage-1 MixFFN depthwise conv on
    [B, H/4, W/4, 4 * C1] (C1 = 64 for b1..b5)."""
    from pipa_jax.models import layers
    h = size // 4
    rs = np.random.RandomState(1)
    specs = [
        # name, channels in, out, kernel, dilation, groups, jax form
        ("head 1x1 conv 1024->256 (ASPP branch / pointwise / SegFormer fuse), nnx.Conv form", 1024, 256, 1, 1, 1, "conv"),
        ("head 1x1 conv 1024->256 written as a dot (x @ W)", 1024, 256, 1, 1, 1, "dot"),
        ("head 3x3 conv 1024->256 (ASPP bottleneck)", 1024, 256, 3, 1, 1, "conv"),
        ("head depthwise 3x3 dilation 12 on 1024 ch, shift form", 1024, 1024, 3, 12, 1024, "shift"),
        ("head depthwise 3x3 dilation 12 on 1024 ch, native form", 1024, 1024, 3, 12, 1024, "native"),
        ("encoder stage-1 depthwise 3x3 on 256 ch (b5), shift form", 256, 256, 3, 1, 256, "shift"),
        ("encoder stage-1 depthwise 3x3 on 256 ch (b5), native form", 256, 256, 3, 1, 256, "native"),
    ]
    out = {}
    for name, cin, cout, k, dil, groups, form in specs:
        x = rs.standard_normal((batch, h, h, cin)).astype(np.float32)
        w = (0.05 * rs.standard_normal((k, k, cin // groups, cout))).astype(np.float32)
        pad = dil * (k // 2)

        def f(x, w, form=form, dil=dil, groups=groups, pad=pad):
            if form == "dot":
                return x @ w[0, 0]
            if form in ("shift", "native"):
                return layers.depthwise_conv2d(x, w, dilation=dil, impl=form)
            return jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)), rhs_dilation=(dil, dil),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                feature_group_count=groups)

        g = jax.grad(lambda x, w, f=f: 0.5 * jnp.sum(jnp.square(f(x, w))), argnums=(0, 1))
        jxa, jwa = jnp.asarray(x), jnp.asarray(w)
        jf, _, _ = jax_compile(f, (jxa, jwa))
        jg, _, _ = jax_compile(g, (jxa, jwa))
        tm = torch.nn.Conv2d(cin, cout, k, padding=pad, dilation=dil, groups=groups, bias=False)
        with torch.no_grad():
            tm.weight.copy_(torch.from_numpy(w.transpose(3, 2, 0, 1).copy()))
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        txg = tx.clone().requires_grad_(True)

        def t_f():
            t0 = time.perf_counter()
            with torch.inference_mode():
                tm(tx)
            return time.perf_counter() - t0

        def t_g():
            t0 = time.perf_counter()
            tm.zero_grad(set_to_none=True)
            txg.grad = None
            (0.5 * tm(txg).square().sum()).backward()
            return time.perf_counter() - t0

        def j_run(fn):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(jxa, jwa))
            return time.perf_counter() - t0

        j_run(jf), j_run(jg), t_f(), t_g()  # warm-up
        runs = {"jax_forward": [], "torch_forward": [], "jax_grad": [], "torch_grad": []}
        for _ in range(repeats):
            runs["jax_forward"].append(j_run(jf))
            runs["torch_forward"].append(t_f())
            runs["jax_grad"].append(j_run(jg))
            runs["torch_grad"].append(t_g())
        r = {k_: summary(v) for k_, v in runs.items()}
        r["shape"] = [batch, h, h, cin]
        for w_ in ("forward", "grad"):
            per = [a / b for a, b in zip(runs[f"jax_{w_}"], runs[f"torch_{w_}"])]
            r[f"{w_}_ratio"] = statistics.median(per)
        out[name] = r
        log(f"    {name}: jax fwd {r['jax_forward']['median']:.3f} grad {r['jax_grad']['median']:.3f} | "
            f"torch fwd {r['torch_forward']['median']:.3f} grad {r['torch_grad']['median']:.3f}")
        gc.collect()
    return out


# ----------------------------------------------------------------------------- report

def fmt(s):
    return f"{s:.3f}" if s < 10 else f"{s:.2f}"


def _med(d):
    return f"{fmt(d['median'])} ({fmt(d['min'])})" if d else "n/a"


def _ratio(r):
    if not r:
        return "n/a"
    if r.get("median_of_round_ratios") is None:
        return f"{r['ratio_of_medians']:.2f}*"
    return f"{r['median_of_round_ratios']:.2f}"


def _row_compile(comp, key):
    return f"{fmt(comp[key]['lower_s'])} + {fmt(comp[key]['compile_s'])}" if comp else "n/a (eager)"


def write_markdown(path, res):
    m = res["machine"]
    runs = res.get("runs") or [{"command": res["command"], "date": res["date"], "wall_time_s": res["wall_time_s"],
                                "loadavg_start": res["loadavg_start"], "loadavg_end": res.get("loadavg_end"),
                                "variants": list(res["variants"]), "parts": bool(res.get("parts"))}]
    L = ["# Model speed: pipa_jax vs PyTorch (HF transformers) on CPU", ""]
    for q in runs:
        L += [f"- command: `{q['command']}` -> {', '.join(q['variants']) or '-'}{' + single layers' if q['parts'] else ''}; "
              f"date {q['date']}, wall time {q['wall_time_s']:.0f} s, load average start / end "
              f"{q['loadavg_start']} / {q['loadavg_end']}"]
    if len(runs) > 1:
        L += ["- combined with `python benchmarks/model_speed.py --combine <the runs' .json files>`"]
    L += [
         f"- machine: {m['nproc']} cores, {m['cpu_model']}; {m['platform']}",
         f"- versions: jax {m['jax']} (backend {m['jax_backend']}), flax {m['flax']}, optax {m['optax']}, "
         f"torch {m['torch']} ({m['torch_threads']} threads, eager), transformers {m['transformers']}",
         "- shared machine: other jobs ran at the same time (see the load averages); frameworks interleaved round by round",
         f"- input: batch {res['batch']}, {res['size']}x{res['size']}, float32. Train step = forward + backward + "
         "AdamW (lr 6e-5, wd 0.01) in train mode (batch-stat BN, dropout 0.1, drop path 0.1), one jitted "
         "function with donated state; forward = eval mode. Segmentation loss: mean cross-entropy of the "
         "stride-4 logits vs random labels (both frameworks); encoder loss: sum of the 4 stage means.",
         "- each variant and the single-layer part run in a fresh process (see the peak RSS per section)", "",
         "Times in seconds: median (min) over the timed rounds, after compilation and the first call(s). "
         "Ratio = JAX / PyTorch, the median of per-round ratios (both measured in the same round), and in "
         "brackets the ratio of the minima (the least disturbed runs); < 1 means JAX is faster. Compile = jax.jit(f).lower(...) + .compile(), seconds. "
         "XLA temp memory = compiled.memory_analysis().temp_size_in_bytes (activations and scratch "
         "of one call, beside parameters and optimizer state).", ""]
    desc = {"jax_daformer": "pipa_jax Segmentor, DAFormer head",
            "torch_daformer": "HF SegformerModel + PyTorch DAFormer head (tests' reference)",
            "torch_segformer": "HF SegformerForSemanticSegmentation",
            "jax_segformer": "pipa_jax Segmentor, SegFormer head",
            "jax_encoder": "pipa_jax MixVisionTransformer",
            "torch_encoder": "HF SegformerModel"}
    ll = {"jax_daformer/torch_daformer": "yes: same network (MiT + DAFormer head), the PiPa network",
          "jax_segformer/torch_segformer": "yes: same network (MiT + all-MLP head)",
          "jax_encoder/torch_encoder": "yes: same encoder"}
    for variant, r in res["variants"].items():
        if not r.get("main"):
            L += [f"## MiT-{variant}: failed ({r.get('failed') or r.get('sections')})", ""]
            continue
        L += [f"## MiT-{variant} ({r['repeats']} timed rounds, {r['warmup']} extra warm-up rounds; "
              f"peak RSS of this process {r.get('peak_rss_mb', 0) / 1024:.1f} GiB)", "",
              *(["Processes: " + "; ".join(f"`{k.split(':', 2)[-1]}`" + (f" FAILED ({v['failed']})" if 'failed' in v else "")
                                             for k, v in r["sections"].items())
                 + " (* = ratio of medians of rows measured in different processes).", ""]
                if len(r.get("sections", {})) > 1 else []),
              "| row | model | params | forward | train step | compile forward | compile train step "
              "| XLA temp memory, train step |",
              "|---|---|---|---|---|---|---|---|"]
        for name, d in r["main"].items():
            mem = d.get("xla_memory")
            L.append(f"| {name} | {desc[name]} | {d['n_params'] / 1e6:.2f} M | {_med(d['forward'])} | "
                     f"{_med(d['train_step']) if d['train_step'] else 'not run (memory, see below)'} | "
                     f"{_row_compile(d.get('compile'), 'forward')} | {_row_compile(d.get('compile'), 'train_step')} | "
                     f"{(format(mem['train_step']['temp_gib'], '.2f') + ' GiB') if mem else 'n/a'} |")
        for name, d in r["main"].items():
            if d.get("skipped"):
                L += ["", f"**{name}: {d['skipped']}.**"]
        L += ["", "| JAX / PyTorch | like-for-like? | forward ratio (of minima) | train-step ratio (of minima) |",
              "|---|---|---|---|"]
        for pair, txt in ll.items():
            j, t = pair.split("/")
            if j not in r["main"] or t not in r["main"]:
                continue
            cells = []
            for w in ("forward", "train_step"):
                a, b = r["main"][j][w], r["main"][t][w]
                mins = f" ({a['min'] / b['min']:.2f})" if a and b else ""
                cells.append(_ratio(r["ratios"].get(f"{pair}:{w}")) + mins)
            L.append(f"| {pair} | {txt} | {cells[0]} | {cells[1]} |")
        L.append("")
        if r.get("ablation_steps"):
            L += [f"### MiT-{variant} design choices, encoder alone ({r['repeats']} interleaved rounds)", "",
                  "| configuration | forward | train step | forward ratio vs first row | step ratio vs first row "
                  "| compile forward | compile train step | XLA temp memory, train step |",
                  "|---|---|---|---|---|---|---|---|"]
            for name, d in r["ablation_steps"].items():
                fr = next((v for k, v in d.items() if k.startswith("forward_ratio")), None)
                sr = next((v for k, v in d.items() if k.startswith("train_step_ratio")), None)
                L.append(f"| {name} | {fmt(d['forward']['median'])} ({fmt(d['forward']['min'])}) | "
                         f"{fmt(d['train_step']['median'])} ({fmt(d['train_step']['min'])}) | "
                         f"{fr['median_of_round_ratios']:.2f} | {sr['median_of_round_ratios']:.2f} | "
                         if fr else
                         f"| {name} | {fmt(d['forward']['median'])} ({fmt(d['forward']['min'])}) | "
                         f"{fmt(d['train_step']['median'])} ({fmt(d['train_step']['min'])}) | 1 | 1 | ")
                L[-1] += (f"{_row_compile(d['compile'], 'forward')} | {_row_compile(d['compile'], 'train_step')} | "
                          f"{d['xla_memory']['train_step']['temp_gib']:.2f} GiB |")
            L.append("")
        if r.get("ablation_compile"):
            L += [f"### MiT-{variant} design choices: compile time of the DAFormer Segmentor "
                  "(abstract parameters; one measurement each)", "",
                  "| configuration | compile forward | compile train step | train step total "
                  "| XLA temp memory, train step |", "|---|---|---|---|---|"]
            for name, d in r["ablation_compile"].items():
                L.append(f"| {name} | {_row_compile(d, 'forward')} | {_row_compile(d, 'train_step')} | "
                         f"{fmt(d['train_step']['total_s'])} | {d['xla_memory']['train_step']['temp_gib']:.2f} GiB |")
            L.append("")
    if res.get("parts"):
        L += [f"## Single layers ({res['parts_repeats']} interleaved runs; gradient = d/d(input, weight))", "",
              "| layer | input | JAX forward | PyTorch forward | ratio | JAX gradient | PyTorch fwd+bwd | ratio |",
              "|---|---|---|---|---|---|---|---|"]
        for name, d in res["parts"].items():
            L.append(f"| {name} | {'x'.join(map(str, d['shape']))} | {fmt(d['jax_forward']['median'])} | "
                     f"{fmt(d['torch_forward']['median'])} | {d['forward_ratio']:.2f} | {fmt(d['jax_grad']['median'])} | "
                     f"{fmt(d['torch_grad']['median'])} | {d['grad_ratio']:.2f} |")
        L.append("")
    L += ["All runs of every measurement are in the .json file beside this one.", ""]
    with open(path, "w") as f:
        f.write("\n".join(L))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="b0,b5")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed rounds per variant (default {DEFAULT_REPEATS})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"extra warm-up rounds after the first calls (default {DEFAULT_WARMUP})")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--ablation-compile", default="b5",
                   help="variants whose DAFormer-Segmentor compile time is measured for dwconv_impl x "
                        "scan_blocks ('' for none)")
    p.add_argument("--ablation-steps", default="b0",
                   help="variants whose encoder step/forward/compile time is measured for dwconv_impl x "
                        "scan_blocks ('' for none)")
    p.add_argument("--parts", type=int, default=3, help="runs of the single-layer benchmark (0 to skip)")
    p.add_argument("--out", default="benchmarks/results/model_speed")
    p.add_argument("--render", metavar="JSON", help="only rewrite <out>.md from a results .json")
    p.add_argument("--isolate-rows", default="b5",
                   help="variants whose comparisons each run in a separate process (memory)")
    p.add_argument("--rows", default="", help="with --isolate-rows: only the processes holding these rows")
    p.add_argument("--split-frameworks", default="",
                   help="variants whose every row runs in a process of its own (ratios: of medians across "
                        "processes). Measured: PyTorch steps interleaved in the same process slow the next "
                        "JAX MiT-b5 step from ~9 s to 12-15 s (PyTorch's own time is unchanged)")
    p.add_argument("--worker", help=argparse.SUPPRESS)      # internal: one section in this process
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="merge result files (later files' variants and parts win) into <out>.json/.md")
    args = p.parse_args(argv)
    if args.combine:
        parts = []
        for path in args.combine:
            with open(path) as f:
                parts.append(json.load(f))
        res = dict(parts[0])
        res["variants"], source, parts_source = {}, {}, None
        for i, q in enumerate(parts):
            for v, r in q.get("variants", {}).items():
                if v not in res["variants"]:
                    res["variants"][v] = json.loads(json.dumps(r))
                    res["variants"][v].setdefault("sections", {})
                else:  # row by row: later runs replace the rows they measured
                    d = res["variants"][v]
                    # ratios that involve a replaced row are recomputed (or marked cross-process)
                    d["ratios"] = {k: x for k, x in d["ratios"].items()
                                   if not any(row in k.split(":")[0].split("/") for row in r["main"])}
                    d["main"].update(r["main"])
                    d["ratios"].update({k: x for k, x in r["ratios"].items() if x is not None or k not in d["ratios"]})
                    d["sections"].update(r.get("sections", {}))
                    d.update({k: x for k, x in r.items() if k not in ("main", "ratios", "sections")})
                    fill_cross_ratios(d)
                source.setdefault(v, set()).add(i)
            if q.get("parts"):
                res["parts"], res["parts_repeats"], parts_source = q["parts"], q["parts_repeats"], i
        res["runs"] = [{k: q.get(k) for k in ("command", "date", "wall_time_s", "loadavg_start", "loadavg_end")}
                       | {"variants": [v for v, i_ in source.items() if i in i_], "parts": parts_source == i,
                          "file": path}
                       for i, (q, path) in enumerate(zip(parts, args.combine))]
        res["wall_time_s"] = sum(q.get("wall_time_s", 0) for q in parts)
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
        write_markdown(args.out + ".md", res)
        return
    if args.render:
        with open(args.render) as f:
            write_markdown(args.out + ".md", json.load(f))
        return

    torch.set_num_threads(os.cpu_count() or 1)
    if args.worker:
        return run_worker(args)

    # Each variant (and the single-layer part) runs in a fresh process: memory freed by one
    # section is often kept by the allocator, and MiT-b5 train steps need >12 GiB on their own.
    t_start = time.perf_counter()
    res = {"command": shlex.join(["python", os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:])),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": machine_info(), "loadavg_start": loadavg(), "batch": args.batch, "size": args.size,
           "variants": {}}
    log(json.dumps(res["machine"]))
    sections = []
    for v in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if v in args.split_frameworks.split(","):
            rows = [r for r in ROWS if not args.rows or r in args.rows.split(",")]
            sections += [f"variant:{v}:{r}" for r in rows]
        elif v in args.isolate_rows.split(","):
            # one process per comparison: a b5 train step needs >12 GiB of XLA buffers
            iso = [f"variant:{v}:jax_segformer+torch_segformer", f"variant:{v}:jax_encoder+torch_encoder",
                   f"variant:{v}:jax_daformer+torch_daformer"]
            sections += [x for x in iso if not args.rows or set(x.split(":")[2].split("+")) & set(args.rows.split(","))]
        else:
            sections.append(f"variant:{v}")
    if args.parts:
        sections.append("parts")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    peaks = []
    for section in sections:
        tmp = f"{args.out}.{section.replace(':', '_')}.tmp.json"
        cmd = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]), "--worker", section,
               "--worker-out", tmp]
        log(f"== {section} (fresh process) ==")
        rc = subprocess.run(cmd).returncode
        if rc != 0 or not os.path.exists(tmp):
            log(f"section {section} failed (exit code {rc}); recorded as such")
            out = {"failed": f"exit code {rc}"}
        else:
            with open(tmp) as f:
                out = json.load(f)
            os.remove(tmp)
        peaks.append(out.get("peak_rss_mb", 0))
        if section == "parts":
            res["parts_repeats"], res["parts"] = args.parts, out.get("parts")
        else:
            merge_section(res["variants"], section, out)
    res["loadavg_end"] = loadavg()
    res["peak_rss_mb"] = max(peaks) if peaks else peak_rss_mb()
    res["wall_time_s"] = time.perf_counter() - t_start
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    write_markdown(args.out + ".md", res)
    log(f"wrote {args.out}.json and {args.out}.md ({res['wall_time_s']:.0f} s)")


def merge_section(variants, section, out):
    """Results of one process into res['variants'][variant]; rows of a comparison measured in
    different processes get only a ratio of medians (marked * in the tables)."""
    _, variant, *rows = section.split(":")
    r = variants.setdefault(variant, {"main": {}, "ratios": {}, "sections": {}})
    if "main" not in out:
        r["sections"][section] = out
        return
    r["sections"][section] = {"peak_rss_mb": out.get("peak_rss_mb")}
    r["peak_rss_mb"] = max(r.get("peak_rss_mb", 0), out.get("peak_rss_mb", 0))
    r["main"].update(out.pop("main"))
    r["ratios"].update(out.pop("ratios"))
    r.update({k: v for k, v in out.items() if k != "peak_rss_mb"})
    fill_cross_ratios(r)


def fill_cross_ratios(r):
    r["main"] = {k: r["main"][k] for k in ROWS if k in r["main"]}
    for j, t in PAIRS:
        for w in ("forward", "train_step"):
            key = f"{j}/{t}:{w}"
            stale = key in r["ratios"] and (r["ratios"][key] is None
                                            or r["ratios"][key].get("median_of_round_ratios") is None)
            if (key not in r["ratios"] or stale) and j in r["main"] and t in r["main"] and r["main"][j][w] and r["main"][t][w]:
                r["ratios"][key] = {"median_of_round_ratios": None, "note": "rows measured in different processes",
                                    "ratio_of_medians": r["main"][j][w]["median"] / r["main"][t][w]["median"]}


def run_worker(args):
    jax.block_until_ready(jax.jit(lambda a: a + 1)(jnp.zeros(3)))  # backend start-up outside timings
    kind, _, rest = args.worker.partition(":")
    variant, _, rows = rest.partition(":")
    rows = tuple(rows.split("+")) if rows else ROWS
    if kind == "parts":
        log("single layers ...")
        r = {"parts": bench_parts(args.batch, args.size, args.parts)}
    else:
        combos = [("shift", True), ("shift", False), ("native", True), ("native", False)]
        repeats = args.repeats or DEFAULT_REPEATS.get(variant, 3)
        warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP.get(variant, 0)
        r = {"repeats": repeats, "warmup": warmup}
        main_res, ratios = bench_main(variant, args.batch, args.size, repeats, warmup, rows)
        r["main"], r["ratios"] = main_res, ratios
        log(json.dumps({k: v and round(v["median_of_round_ratios"], 3) for k, v in ratios.items()}))
        last = "jax_daformer" in rows  # the design-choice parts run with the DAFormer row
        if last and variant in args.ablation_steps.split(","):
            log(f"[{variant}] design choices, encoder alone: compile + run time ...")
            r["ablation_steps"] = bench_ablation_steps(variant, args.batch, args.size, combos, repeats, warmup)
        if last and variant in args.ablation_compile.split(","):
            log(f"[{variant}] design choices: compile time of the DAFormer Segmentor ...")
            r["ablation_compile"] = bench_ablation_compile(variant, args.batch, args.size, combos)
    r["peak_rss_mb"] = peak_rss_mb()
    with open(args.worker_out, "w") as f:
        json.dump(r, f)


if __name__ == "__main__":
    main()
