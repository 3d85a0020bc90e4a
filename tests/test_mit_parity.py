"""MiT parity: HuggingFace transformers' PyTorch SegformerModel (random weights, renamed to the
official SegFormer keys) vs pipa_jax's MixVisionTransformer loaded through load_torch_weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import SegformerConfig, SegformerModel

from pipa_jax.convert import load_torch_weights
from pipa_jax.models.layers import ComputeForms
from pipa_jax.models.mit import MIT_VARIANTS, MiTVariant, MixVisionTransformer

# b0 exactly, and the b5 shape (dims, heads, sr ratios) with fewer blocks to keep CI fast.
CASES = {
    "b0": MIT_VARIANTS["b0"],
    "b5_shallow": MiTVariant((64, 128, 320, 512), (1, 2, 3, 1)),
}


def hf_model(v: MiTVariant, seed: int = 0, device=None) -> SegformerModel:
    cfg = SegformerConfig(hidden_sizes=list(v.embed_dims), depths=list(v.depths),
                          num_attention_heads=list(v.num_heads), sr_ratios=list(v.sr_ratios),
                          mlp_ratios=[v.mlp_ratio] * 4, drop_path_rate=0.0, hidden_act="gelu")
    torch.manual_seed(seed)
    if device is not None:
        with torch.device(device):
            return SegformerModel(cfg)
    model = SegformerModel(cfg).eval()
    # HF uses eps 1e-5 everywhere; the official MiT uses 1e-6 in blocks and after each stage.
    for stage in model.stages:
        stage.layer_norm.eps = 1e-6
        for blk in stage.blocks:
            blk.layernorm_before.eps = 1e-6
            blk.layernorm_after.eps = 1e-6
    # Random everything (also norm scales/biases), so no parameter can be silently skipped.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def hf_to_official(sd: dict) -> dict:
    """transformers 5.x Segformer keys -> official SegFormer mit_b*.pth keys (k/v fused to kv)."""
    out = {}
    for k, t in sd.items():
        parts = k.split(".")
        s = int(parts[1]) + 1
        rest = ".".join(parts[2:])
        if rest.startswith("patch_embeddings."):
            r = rest.replace("patch_embeddings.", "").replace("layer_norm", "norm")
            out[f"patch_embed{s}.{r}"] = t
        elif rest.startswith("layer_norm."):
            out[f"norm{s}.{rest.split('.')[-1]}"] = t
        elif rest.startswith("blocks."):
            i, sub = parts[3], ".".join(parts[4:])
            sub = (sub.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
                   .replace("attention.q_proj", "attn.q").replace("attention.o_proj", "attn.proj")
                   .replace("attention.sequence_reduction.sequence_reduction", "attn.sr")
                   .replace("attention.sequence_reduction.layer_norm", "attn.norm"))
            if sub.startswith("attention.k_proj"):
                leaf = sub.split(".")[-1]
                v = sd[k.replace("k_proj", "v_proj")]
                out[f"block{s}.{i}.attn.kv.{leaf}"] = torch.cat([t, v], 0)
            elif sub.startswith("attention.v_proj"):
                continue
            else:
                out[f"block{s}.{i}.{sub}"] = t
        else:
            raise AssertionError(f"unmapped HF key {k}")
    return out


def jax_mit(v, **kw):
    kw.setdefault("drop_path_rate", 0.0)
    return MixVisionTransformer(v, rngs=nnx.Rngs(1), **kw)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("size", [(64, 96), (75, 101)])  # the second is not divisible by 32
def test_stage_outputs_match_pytorch(case, size):
    v = CASES[case]
    torch_model = hf_model(v)
    ours = jax_mit(v)
    report = load_torch_weights(ours, hf_to_official(torch_model.state_dict()))
    assert report.ok and len(report.loaded) == len(hf_to_official(torch_model.state_dict()))

    x = np.random.default_rng(0).normal(size=(2, 3) + size).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x), output_hidden_states=True).hidden_states
    outs = ours(jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert len(outs) == 4
    for r, o in zip(ref, outs):
        r = r.numpy().transpose(0, 2, 3, 1)
        assert r.shape == o.shape
        np.testing.assert_allclose(np.asarray(o), r, atol=1e-4, rtol=0)


def test_scan_shift_native_forms_agree():
    """The scanned/unrolled stages and the shift/native depthwise conv compute the same thing."""
    v = CASES["b5_shallow"]
    sd = hf_to_official(hf_model(v).state_dict())
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 70, 64, 3)).astype(np.float32))
    outs = []
    for scan, impl in [(True, "shift"), (False, "shift"), (True, "native")]:
        m = jax_mit(v, forms=ComputeForms(dwconv=impl, scan_blocks=scan))
        load_torch_weights(m, sd)
        outs.append(m(x))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(MIT_VARIANTS))
def test_parameter_counts_equal(name):
    v = MIT_VARIANTS[name]
    ref = sum(p.numel() for p in hf_model(v, device="meta").parameters())
    abstract = nnx.eval_shape(lambda: MixVisionTransformer(name, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == ref


def test_stochastic_depth_train_mode():
    m = jax_mit(CASES["b0"], drop_path_rate=0.5)
    x = jnp.ones((4, 64, 64, 3))
    with pytest.raises(ValueError, match="rng"):
        m(x, train=True)
    a = m(x, train=True, rng=jax.random.key(0))[-1]
    b = m(x, train=True, rng=jax.random.key(1))[-1]
    c = m(x, train=False)[-1]
    assert not np.allclose(a, b)          # randomness reaches the blocks
    np.testing.assert_array_equal(m(x)[-1], c)  # eval is deterministic


def test_bfloat16_compute_close_to_float32():
    v = CASES["b0"]
    sd = hf_to_official(hf_model(v).state_dict())
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 64, 64, 3)).astype(np.float32))
    f32, bf16 = jax_mit(v), jax_mit(v, dtype=jnp.bfloat16)
    load_torch_weights(f32, sd)
    load_torch_weights(bf16, sd)
    for a, b in zip(f32(x), bf16(x)):
        assert b.dtype == jnp.bfloat16
        a, b = np.asarray(a), np.asarray(b, dtype=np.float32)
        rel = np.linalg.norm(a - b) / np.linalg.norm(a)
        assert rel < 0.05, rel


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="mit_b0.*mit_b5"):
        MixVisionTransformer("b7", rngs=nnx.Rngs(0))
