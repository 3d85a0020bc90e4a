"""The jitted train step in process: 1 vs 8 devices give the same step and it compiles once,
the patch term's two gates (lax.cond, mask) agree, a non-finite loss stops the run and names
its term, and bad config values are clear errors. Split from test_train.py (the CLI and
resume tests) so that the two long files run in parallel (README: `pytest -n 2 --dist loadfile`).
"""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pipa_jax import config as config_lib
from pipa_jax import mesh as mesh_lib
from pipa_jax import step as step_lib
from pipa_jax import terms as terms_lib
from pipa_jax import train
from pipa_jax.data import pipeline
from pipa_jax.models import layers
from pipa_jax.optim import learning_rate_schedule
from test_train import load_config, tiny_config


def jitted_step(c, n, spatial=1):
    """(state, jitted step, imnet params, data sharding) on a mesh of n devices (spatial > 1: a
    ('data', 'spatial') mesh of n / spatial x spatial), jitted as the trainer does."""
    c.mesh_shape, c.mesh_spatial = n, spatial
    mesh = train.make_mesh(c)
    repl, data = NamedSharding(mesh, P()), mesh_lib.batch_sharding(mesh)
    graphdef, tx, state, imnet = train.build_model_and_state(c, mesh)
    train_step = step_lib.make_train_step(c, graphdef, tx, imnet[0])
    jitted = jax.jit(train_step, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=0)
    return state, jitted, jax.device_put(imnet[1], repl), data


def global_batch(data, b):
    return {k: jax.make_array_from_process_local_data(data, v) for k, v in b.items()}


def run_steps(c, batches, n, spatial=1, built=None, states=None):
    """(final params on the host, per-step metrics, the step) of len(batches) steps; `built`: a
    (state, step, imnet params, data sharding) of jitted_step's, its step possibly compiled;
    `states`: a list that receives the whole state on the host after every step."""
    state, step, imnet_params, data = built or jitted_step(c, n, spatial)
    metrics = []
    for b in batches:
        state, m = step(state, global_batch(data, b), imnet_params)
        metrics.append(jax.device_get(m))
        if states is not None:
            states.append(jax.device_get(state))
    assert len(state.params["backbone"]["block1"][0]["attn"]["q"]["kernel"][...].sharding.device_set) == n
    return jax.device_get(state.params), metrics, step


@pytest.fixture(scope="module")
def one_device_run(xla_cache_dir):
    """The reference both sharded runs below are compared with: 3 steps on one device of the tiny
    PiPa + MIC config of test_train.py (its 8-device step is the CLI runs' program), whose patch
    term starts at step 1, gated by masking (CPU's term_gate 'auto'); its states after each step
    are the 'mask' side of the gate test."""
    c = tiny_config(xla_cache_dir)
    assert c.pipa.patch.start_step == 1
    assert terms_lib.resolve_gate(c.term_gate) == "mask"
    batches = [next(pipeline.train_iterator(c, i)) for i in range(3)]
    states = []
    return c, batches, run_steps(c, batches, 1, states=states), states


def assert_same_run(c, ref, other, steps, rtol=2e-4):
    (p1, m1, _), (p2, m2, _) = ref, other
    for a, b in zip(m1, m2):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=rtol, atol=1e-6, err_msg=k)
    loss_rel = max(abs(float(b["loss/total"]) - float(a["loss/total"])) / abs(float(a["loss/total"]))
                   for a, b in zip(m1, m2))
    print(f"largest relative difference of the total loss over {steps} steps: {loss_rel:.2e}")
    # Parameters: Adam moves each one by at most ~lr per step whatever the gradient's size, so
    # parameters whose exact gradient is 0 (a conv bias before BatchNorm) take +-lr steps on
    # rounding noise, which differs with the reduction order. Bound every difference by the
    # largest total step (head lr = 10x), and require the typical parameter to agree closely.
    schedule = learning_rate_schedule(c, c.optimizer.learning_rate)
    bound = 2 * 10 * sum(float(schedule(t)) for t in range(steps)) * 1.01
    rel = []
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= bound
        rel.append(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
    assert np.median(rel) < 1e-5, np.median(rel)


def test_one_device_equals_eight_and_no_retrace(one_device_run):
    c, batches, ref, _ = one_device_run
    assert ref[2]._cache_size() == 1, f"the step compiled {ref[2]._cache_size()} times on 1 device"
    eight = run_steps(c, batches, 8)
    assert eight[2]._cache_size() == 1, f"the step compiled {eight[2]._cache_size()} times on 8 devices"
    assert_same_run(c, ref, eight, len(batches))


def test_spatial_partitioning_equals_one_device(one_device_run):
    """config.mesh_spatial = 4: a 2 x 4 ('data', 'spatial') mesh, every image split along its
    height into 4 bands of 16 rows, the full PiPa + MIC step (both contrastive terms, the patch
    bank, ClassMix, FD, the masked term), equals the one-device step. It runs with the forms GPU /
    TPU take (native convolutions, dense attention, 'nd' linear layers: the same results, see
    test_fast_forms.py), and its compiled program rebuilds no full-height map at a flattening
    reshape ('flat' linear layers and matmul 1x1 convolutions merge the sharded batch and height
    axes, which XLA can only partition by all-gathering the height; benchmarks/spatial_hlo.py
    lists what the program does gather)."""
    from pipa_jax.tools import hlo_collectives
    c, batches, ref, _ = one_device_run
    c = c.copy_and_resolve_references()
    c.model.update(layers.ACCELERATOR_FORMS)
    c.mesh_shape, c.mesh_spatial = 8, 4
    config_lib.validate(c, 8)
    state, jitted, imnet_params, data = jitted_step(c, 8, spatial=4)
    b = global_batch(data, batches[0])
    assert b["source_image"].addressable_shards[0].data.shape == (4, 16, 64, 3)    # 2 x 4 images, 16-row bands
    compiled = jitted.lower(state, b, imnet_params).compile()     # compiled once: run and inspected
    hlo = compiled.as_text()
    spatial = run_steps(c, batches, 8, spatial=4, built=(state, compiled, imnet_params, data))
    assert_same_run(c, ref, spatial, len(batches))
    recs = hlo_collectives.collectives(hlo)
    assert any(r.kind == "collective-permute" for r in recs)     # convolution halos between bands
    full = hlo_collectives.full_resolution_gathers(recs, tuple(c.data.crop_size))
    # The detector sees the gathers the algorithm needs: the patch term's random crop of the
    # full image can start in any band.
    assert any(r.op_name.endswith("dynamic_slice") and r.shape[1:3] == (64, 64) for r in full), full
    assert not [r for r in full if r.op_name.endswith("reshape")], full


def test_patch_gate_mask_equals_cond(one_device_run):
    """The patch term switched on at start_step by lax.cond (GPU/TPU) or by masking (CPU's
    default, where a conditional's branch runs far slower): the same losses, bank and updates,
    with the term and the bank idle before the start step. The 'mask' side is the one-device
    reference run's first two steps."""
    c, batches, (_, m_mask, _), s_mask = one_device_run
    c = c.copy_and_resolve_references()
    c.term_gate = "cond"
    s_cond = []
    _, m_cond, _ = run_steps(c, batches[:2], 1, states=s_cond)
    m_mask, s_mask = m_mask[:2], s_mask[:2]
    for gate_metrics, gate_states in ((m_cond, s_cond), (m_mask, s_mask)):
        assert gate_metrics[0]["loss/patch"] == 0 and gate_metrics[0]["patch_counted"] == 0
        assert not gate_states[0].terms["patch"]["valid"].any()          # nothing pushed before the start
        assert gate_states[1].terms["patch"]["valid"].any()
    assert m_mask[1]["patch_counted"] == m_cond[1]["patch_counted"]
    for k in m_cond[1]:
        np.testing.assert_allclose(m_mask[1][k], m_cond[1][k], rtol=1e-4, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(s_cond[1].params), jax.tree.leaves(s_mask[1].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(s_mask[1].terms["patch"]["feats"], s_cond[1].terms["patch"]["feats"], atol=1e-5)
    np.testing.assert_array_equal(s_mask[1].terms["patch"]["labels"], s_cond[1].terms["patch"]["labels"])


def test_nonfinite_loss_stops_and_names_the_term(xla_cache_dir, tmp_path, monkeypatch):
    import jax.numpy as jnp

    from pipa_jax import losses
    real = losses.cross_entropy
    monkeypatch.setattr(losses, "cross_entropy", lambda *a, **k: real(*a, **k) * jnp.nan)
    c = tiny_config(xla_cache_dir, "method=source_only,tiny")
    with pytest.raises(FloatingPointError, match=r"non-finite source_ce.*steps 1 and 2"):
        train.train_and_evaluate(c, str(tmp_path))
    # Nothing non-finite was ever checkpointed.
    ckpts = tmp_path / "checkpoints"
    assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())


def test_bad_config_values_are_clear_errors():
    c = load_config()
    c.batch_size = 4
    with pytest.raises(ValueError, match=r"config.batch_size = 4: expected a multiple of the 8 devices"):
        config_lib.validate(c, 8)
    # Spatial partitioning: 2 + 2 images on 8 devices need 4 bands per image.
    c = load_config()
    c.batch_size = 2
    with pytest.raises(ValueError, match=r"batch_size = 2: .*or --config.mesh_spatial=4 to split"):
        config_lib.validate(c, 8)
    c.mesh_spatial = 4
    config_lib.validate(c, 8)
    c.mesh_spatial = 3
    with pytest.raises(ValueError, match=r"mesh_spatial = 3: expected a positive divisor of the mesh's 8 devices"):
        config_lib.validate(c, 8)
    c.mesh_spatial, c.batch_size, c.data.eval_batch_size = 32, 1, 1
    with pytest.raises(ValueError, match=r"mesh_spatial = 32: .*crop height 64 into bands of whole stride-4 rows"):
        config_lib.validate(c, 32)
    c = load_config()
    c.data.crop_size = (100, 64)
    with pytest.raises(ValueError, match="data.crop_size"):
        config_lib.validate(c, 8)
    c = load_config()
    c.uda.self_training = False
    with pytest.raises(ValueError, match="pipa.patch.enabled = True: expected False when uda.self_training"):
        config_lib.validate(c, 8)
    with pytest.raises(ValueError, match="unknown method 'fancy'"):
        load_config("method=fancy")
    for method in config_lib.METHODS:
        config_lib.validate(load_config(f"method={method},tiny"), 8)
        config_lib.validate(load_config(f"method={method}"), 1)   # the README's default, one CPU device
