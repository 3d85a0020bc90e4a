"""How the building blocks compute: one frozen ComputeForms value instead of five constructor
arguments threaded through every module. Every form gives the same parameters and results
(tests/test_fast_forms.py); they differ only in speed and memory per backend."""
from __future__ import annotations

import dataclasses

import jax

DWCONV_IMPLS = ("auto", "shift", "shift_autodiff", "native")
CONV_IMPLS = ("auto", "matmul", "native")
ATTENTION_IMPLS = ("auto", "chunked", "dense")
DENSE_IMPLS = ("auto", "flat", "nd")
# What every 'auto' form resolves to on GPU / TPU, as model config fields: benchmarks and tests
# that compile the accelerator's program on CPU set these.
ACCELERATOR_FORMS = {"dwconv_impl": "native", "conv_impl": "native", "attention_impl": "dense", "dense_impl": "nd"}


def resolve_dwconv_impl(impl: str) -> str:
    """Picks the depthwise-convolution form for the current backend.

    XLA:CPU lowers grouped (depthwise) convolutions to a slow generic loop: measured here ~20x
    slower forward and ~6x slower forward+backward than the same filter written as k*k shifted
    multiply-adds, which XLA fuses into one elementwise kernel. GPU and TPU have fast native
    depthwise kernels, so 'auto' keeps the native convolution there.

    'shift' carries a hand-written VJP (see `_shift_depthwise`); 'shift_autodiff' is the same
    forward left to JAX's autodiff, kept only to measure and test the VJP against: its backward
    pads one cotangent copy per tap (b5 encoder gradient 1.5x slower, 1.5x the temp memory).
    """
    if impl not in DWCONV_IMPLS:
        raise ValueError(f"dwconv_impl must be one of {DWCONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "native"
    return impl


def resolve_conv_impl(impl: str) -> str:
    """Picks how 1x1 convolutions, non-overlapping patch convolutions (kernel = stride, no
    padding: the attention's spatial reduction) and the filter gradient of stride-1 k x k
    convolutions are computed.

    On XLA:CPU a convolution's gradient is much slower than the same contraction written as a
    matrix product (measured: 1x1 conv 1024->256 on 2x128x128, gradient 0.93 s as a conv, 0.26 s
    as a dot; the sr=8 reduction's filter gradient runs as a 16x16-window dilated convolution;
    the filter gradient of DAFormer's 3x3 bottleneck, 1024->256 on 2x128x128, takes 4.2 s as a
    conv and about 0.7 s as 9 tap matmuls), so 'auto' takes 'matmul' there and keeps the native
    convolution on GPU/TPU. Strided k x k convolutions (the patch embeddings) stay native.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "matmul" if jax.default_backend() == "cpu" else "native"
    return impl


def resolve_attention_impl(impl: str) -> str:
    """Picks how softmax attention is computed.

    'dense' materialises the [B, heads, N, M] logits and probabilities and leaves the backward
    pass to autodiff, which keeps the probabilities as residuals. On XLA:CPU that form is memory
    bound: at MiT stage 1 (N = 16384 queries, M = 256 reduced keys) it moves several 32 MB arrays
    per pass. 'chunked' (see `attention`) folds the heads into the batch (3-D dots, no
    transposing copies) and walks the queries in chunks (attention_chunk_size) with a
    hand-written VJP that recomputes the probabilities from the saved log-sum-exp, so memory is
    linear in N. 'auto' takes 'chunked' on CPU and 'dense' on GPU/TPU, whose fused attention
    kernels are fast and whose memory holds the logits easily (M is only 256).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "chunked" if jax.default_backend() == "cpu" else "dense"
    return impl


def resolve_dense_impl(impl: str) -> str:
    """Picks how a token-wise linear layer on a map [B, H, W, C] is computed.

    'flat' flattens the leading axes into one and runs a 2-D dot (see dense.matmul_last): XLA:CPU
    then emits the weight gradient without a transposing copy of the cotangent (2x faster on
    MiT-b5's fc1 here). 'nd' contracts the last axis of the map as it is. The two differ under
    spatial partitioning (config.mesh_spatial > 1): a map sharded along both batch and height,
    with several images per data shard, has no tiling of the flattened axis, so XLA's partitioner all-gathers the full height before
    every 'flat' layer, while 'nd' stays local to each band. 'auto' takes 'flat' on CPU and 'nd'
    on GPU/TPU (whose dot emitters need no flattening).
    """
    if impl not in DENSE_IMPLS:
        raise ValueError(f"dense_impl must be one of {DENSE_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "flat" if jax.default_backend() == "cpu" else "nd"
    return impl


def resolve_scan_blocks(scan_blocks) -> bool:
    """True / False, or 'auto': unrolled on CPU, scanned on GPU/TPU.

    On XLA:CPU the scanned stages cost run time: the loop copies every block's residuals into
    stacked buffers and back (measured here, MiT-b5 encoder gradient at 512x512, batch 2: 11.8 s
    scanned vs 8.4 s unrolled), while unrolling costs compile time (15 s vs 34 s). A training run
    compiles once and steps tens of thousands of times, so CPU unrolls. On GPU/TPU 'auto' keeps
    the scan for its compile time (its run-time cost there was not measured on this machine).
    """
    if isinstance(scan_blocks, bool):
        return scan_blocks
    value = str(scan_blocks).lower()  # config files and --config overrides give strings
    if value == "auto":
        return jax.default_backend() != "cpu"
    if value in ("true", "false"):
        return value == "true"
    raise ValueError(f"scan_blocks must be True, False or 'auto', got {scan_blocks!r}")


@dataclasses.dataclass(frozen=True)
class ComputeForms:
    """The compute-form choices of a network (model config fields of the same names):

    dwconv: depthwise conv, 'auto' | 'shift' | 'shift_autodiff' | 'native' (resolve_dwconv_impl).
    conv: 1x1 / patch convs and the kxk filter gradient, 'auto' | 'matmul' | 'native' (resolve_conv_impl).
    attention: encoder attention, 'auto' | 'chunked' | 'dense' (resolve_attention_impl).
    dense: token-wise linear layers, 'auto' | 'flat' | 'nd' (resolve_dense_impl).
    scan_blocks: deep encoder stages as one lax.scan, True | False | 'auto' (resolve_scan_blocks).
    remat: recompute encoder block activations in the backward pass (memory for compute).
    Hashable and immutable, so modules can keep it as a static attribute.
    """
    dwconv: str = "auto"
    conv: str = "auto"
    attention: str = "auto"
    dense: str = "auto"
    scan_blocks: bool | str = "auto"
    remat: bool = False

    def __post_init__(self):
        # Checks the names only: 'auto' is resolved when a layer runs, so that building a value
        # (a default argument, at import) never starts a JAX backend, which must wait until
        # jax.distributed.initialize has run on multi-host jobs.
        for field, allowed in (("dwconv", DWCONV_IMPLS), ("conv", CONV_IMPLS), ("attention", ATTENTION_IMPLS),
                               ("dense", DENSE_IMPLS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}_impl must be one of {allowed}, got {getattr(self, field)!r}")
        if not isinstance(self.scan_blocks, bool) and str(self.scan_blocks).lower() not in ("auto", "true", "false"):
            raise ValueError(f"scan_blocks must be True, False or 'auto', got {self.scan_blocks!r}")

    @classmethod
    def from_config(cls, model_config) -> "ComputeForms":
        """The forms named by a model config (dwconv_impl, conv_impl, attention_impl, dense_impl,
        scan_blocks, remat)."""
        get = model_config.get
        scan = get("scan_blocks", "auto")
        return cls(dwconv=str(get("dwconv_impl", "auto")), conv=str(get("conv_impl", "auto")),
                   attention=str(get("attention_impl", "auto")), dense=str(get("dense_impl", "auto")),
                   scan_blocks=scan if isinstance(scan, bool) else str(scan), remat=bool(get("remat", False)))
