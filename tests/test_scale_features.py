"""Memory and speed switches keep the numbers: scanned layers, remat, attention backends,
gradient accumulation, EMA, bf16 compute; config/mesh mistakes fail before compiling; the
FLOPs count and the benchmark command."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from strokes_jax.configs import shapes_tiny
from strokes_jax.data import pipeline
from strokes_jax.model import mot, routing
from strokes_jax.model.unified import ModelConfig, UnifiedModel
from strokes_jax.train import flops as fl
from strokes_jax.train import loop, sharding as shd, state as st, step as sp
from strokes_jax.sequence import layout


def _cfg(**model):
    c = shapes_tiny.get_config("test")
    c.model.update(**model)
    return c


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    c = _cfg()
    c.data.batch_size = 4
    src, _ = loop.prepare_data(c, str(tmp_path_factory.mktemp("d")))
    etok = loop.episode_tokenizer(c)
    it = pipeline.make_train_iter(src, etok, seq_len=c.data.seq_len, global_batch_size=4, seed=0)
    b = next(it)
    return {k: jnp.asarray(b[k]) for k in layout.ROW_FIELDS}


def _model(c):
    return UnifiedModel(loop.model_config(c, loop.episode_tokenizer(c)))


def _inputs(batch, seed=0):
    xt, t, _ = sp.noised_inputs(batch, jax.random.PRNGKey(seed), 1.0)
    return (batch["tokens"], batch["types"], batch["positions"], batch["segment_ids"],
            batch["blocks"], batch["patch_pos"], xt, t)


@pytest.fixture(scope="module")
def base(batch):
    c = _cfg()
    m = _model(c)
    params = jax.jit(m.init)(jax.random.PRNGKey(0), *_inputs(batch))["params"]
    import flax.linen as nn
    params = nn.unbox(params)
    # Non-zero velocity head so velocities depend on the trunk.
    params["llm2vae"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1),
                                                    params["llm2vae"]["kernel"].shape) * 0.1
    return c, m, params, jax.jit(m.apply)({"params": params}, *_inputs(batch))


@pytest.mark.slow
def test_scanned_layers_match_the_loop(batch, base):
    c, _, params, (logits, vel) = base
    scanned = _model(_cfg(scan_layers=True))
    p2 = dict(params, decoder=mot.stack_layers(params["decoder"], c.model.depth))
    lo2, ve2 = jax.jit(scanned.apply)({"params": p2}, *_inputs(batch))
    np.testing.assert_allclose(lo2, logits, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ve2, vel, atol=2e-5, rtol=1e-5)
    back = mot.unstack_layers(p2["decoder"])
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params["decoder"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_the_gradients(batch, base, remat):
    c, m, params, _ = base
    lc = sp.LossConfig.from_config(c)

    def grads(model):
        f = lambda p: sp.loss_fn(p, batch, jax.random.PRNGKey(2), model=model, lc=lc)[0]
        return jax.jit(jax.grad(f))(params)

    g0, g1 = grads(m), grads(_model(_cfg(remat=remat)))
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_dot_product_attention_backend_matches(batch, base):
    _, _, params, (logits, vel) = base
    lo2, ve2 = jax.jit(_model(_cfg(attention="dot_product")).apply)({"params": params}, *_inputs(batch))
    np.testing.assert_allclose(lo2, logits, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ve2, vel, atol=2e-5, rtol=1e-5)


def test_bf16_compute_keeps_fp32_params(batch, base):
    _, _, params, (logits, _) = base
    lo, _ = jax.jit(_model(_cfg(dtype="bfloat16")).apply)({"params": params}, *_inputs(batch))
    assert lo.dtype == jnp.float32 and np.isfinite(np.asarray(lo)).all()
    # bf16 rounding only: close to the fp32 logits, not equal.
    err = float(jnp.max(jnp.abs(lo - logits)))
    assert 0 < err < 0.25, err


def _fresh(c, accum=1, ema=0.0):
    s = loop.setup(c)
    lc = sp.LossConfig.from_config(c)
    train, _ = sp.jit_steps(s.model, s.tx, lc, s.mesh, s.shardings, accum_steps=accum,
                            ema_decay=ema)
    return s, train


@pytest.mark.slow
def test_gradient_accumulation_matches_the_large_batch(batch):
    c = _cfg()
    c.data.batch_size = 4
    s1, t1 = _fresh(c)
    c.train.accum_steps = 2
    s2, t2 = _fresh(c, accum=2)
    st1, m1 = t1(s1.state, batch)
    st2, m2 = t2(s2.state, batch)
    for k in ("loss", "ce", "mse", "grad_norm", "sketch/mse", "plan/ce"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree_util.tree_leaves(st1.params), jax.tree_util.tree_leaves(st2.params)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_ema_tracks_the_params(batch):
    c = _cfg()
    c.data.batch_size = 4
    c.optim.ema_decay = 0.5
    s, train = _fresh(c, ema=0.5)
    p0 = jax.tree_util.tree_map(np.asarray, s.state.params)
    new, _ = train(s.state, batch)
    for e, a, b in zip(*(jax.tree_util.tree_leaves(x) for x in (new.ema_params, p0, new.params))):
        np.testing.assert_allclose(e, 0.5 * a + 0.5 * np.asarray(b), atol=1e-7)
    assert new.eval_params() is new.ema_params


def test_mesh_and_config_mistakes_fail_before_compiling():
    with pytest.raises(ValueError, match="mesh.shape"):
        shd.mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="mesh.shape"):
        shd.mesh_shape((2, 2), 4)
    mesh = shd.make_mesh((1, 1, 1))
    with pytest.raises(ValueError, match="data.batch_size"):
        shd.check_batch(6, mesh, accum_steps=4, process_count=1)
    with pytest.raises(ValueError, match="model.remat"):
        _model(_cfg(remat="sometimes")).cfg  # noqa: B018
    with pytest.raises(ValueError, match="unknown config keys model"):
        ModelConfig.from_config({"vocab_size": 8, "patch_dim": 4, "latent_grid": (2, 2), "widht": 3})
    with pytest.raises(ValueError, match="rules"):
        shd.rules_tuple((("embed", "fdsp"),))


def test_indivisible_parameter_names_the_rule():
    """A 1-device mesh cannot show an indivisible split, so check the rule against a fake
    mesh shape of 3 on fsdp: 'embed' (width 32) is not divisible and the error says where."""
    c = _cfg()
    m = _model(c)
    tx = st.make_optimizer(c.optim, c.train.steps)

    class FakeMesh:
        shape = {"data": 1, "fsdp": 3, "tensor": 1}

    abstract = jax.eval_shape(lambda r: m.init(r, **st.dummy_inputs(1, 8, 108))["params"],
                              jax.random.PRNGKey(0))
    del tx
    with pytest.raises(ValueError, match=r"'embed' dimension 32.*config key `rules`"):
        shd.check_divisible(abstract, FakeMesh(), c.rules)


def test_replicated_params_fail_the_sharding_check():
    import jax.sharding as js
    mesh = shd.make_mesh((1, 1, 1))
    x = jax.device_put(jnp.zeros((64, 64)), js.NamedSharding(mesh, js.PartitionSpec()))

    class Mesh4:  # pretend fsdp = 4: a replicated array is 4x its share
        shape = {"data": 1, "fsdp": 4, "tensor": 1}

    assert shd.sharded_fraction({"w": x}, mesh) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not sharded enough"):
        shd.check_sufficiently_sharded({"w": x}, Mesh4(), tolerance=0.25)


def test_flops_and_peak_table():
    c = _cfg()
    mc = loop.model_config(c, loop.episode_tokenizer(c))
    f = fl.train_step_flops(mc, batch=2, seq_len=512)
    d = mc.decoder
    per_token_block = 2 * d.depth * (d.width * (d.heads + 2 * d.kv_heads) * d.head_dim
                                     + d.heads * d.head_dim * d.width + 3 * d.width * d.mlp)
    assert f.executed - f.model == pytest.approx(3 * per_token_block * 2 * 512)
    assert f.model > 3 * per_token_block * 2 * 512
    assert fl.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert fl.peak_tflops("TPU v5 lite") == 197.0
    assert fl.peak_tflops("TPU v5p") == 459.0
    assert fl.peak_tflops("cpu") is None


@pytest.mark.slow
def test_bench_writes_json(tmp_path):
    from strokes_jax.train import bench
    c = _cfg()
    out = bench.run(c, "shapes_tiny.py:test", str(tmp_path))
    rec = json.load(open(out["path"]))
    for k in ("device", "config", "commit", "step_time_s", "tokens_per_s", "model_tflops_per_device",
              "mfu", "compile_s", "host_peak_rss_bytes", "params"):
        assert k in rec, k
    assert rec["step_time_s"] > 0 and rec["tokens_per_s"] > 0 and np.isfinite(rec["final_loss"])
    assert rec["mfu"] is None  # CPU: no peak in the table, so no invented MFU
    conv = {k: v["tflop_per_step"] for k, v in rec["mfu_conventions"].items()}
    assert conv["ours"] == pytest.approx(rec["model_tflop_per_step"])
    assert conv["needed"] < conv["maxtext"] < conv["ours"]
    assert all(v["mfu"] is None for v in rec["mfu_conventions"].values())
    assert rec["xla_tflop_per_step_per_device"] > 0 and rec["xla_over_model"] > 0


def _valid(batch):
    return np.asarray(batch["segment_ids"]) > 0


def _fill(batch):
    """(gen, und) fractions of the batch's tokens."""
    types, valid = np.asarray(batch["types"]), _valid(batch)
    gen = (types == 1) | (types == 2)
    n = types.size
    return (gen & valid).sum() / n, (~gen & valid).sum() / n


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_sparse_routing_matches_dense(batch, base, scan):
    c, m, params, (logits, vel) = base
    gen, und = _fill(batch)
    assert gen > 0.1 and und > 0.1  # both experts have work, so a swap would show
    fractions = (min(1.0, gen + 0.05), min(1.0, und + 0.05))
    assert routing.counts_fit(np.isin(np.asarray(batch["types"]), (1, 2)), _valid(batch), fractions)
    dense = _model(_cfg(scan_layers=scan))
    p = dict(params, decoder=mot.stack_layers(params["decoder"], c.model.depth)) if scan else params
    model = routing.sparse(dense, fractions)
    lo, ve = jax.jit(model.apply)({"params": p}, *_inputs(batch))
    valid = _valid(batch)  # padding may come out different: it is in neither expert's window
    np.testing.assert_allclose(np.asarray(lo)[valid], np.asarray(logits)[valid], atol=5e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ve)[valid], np.asarray(vel)[valid], atol=5e-5, rtol=1e-5)
    lc = sp.LossConfig.from_config(c)

    def grads(mdl):
        f = lambda q: sp.loss_fn(q, batch, jax.random.PRNGKey(2), model=mdl, lc=lc)[0]
        return jax.jit(jax.grad(f))(p)

    for a, b in zip(jax.tree_util.tree_leaves(grads(dense)), jax.tree_util.tree_leaves(grads(model))):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_sparse_routing_falls_back_to_dense_when_counts_do_not_fit(batch, base):
    c, m, params, _ = base
    gen, und = _fill(batch)
    lc = sp.LossConfig.from_config(c)
    loss = lambda mdl: jax.jit(lambda q: sp.loss_fn(q, batch, jax.random.PRNGKey(2), model=mdl,
                                                    lc=lc)[0])(params)
    small = (gen / 2, und / 2)
    assert not routing.counts_fit(np.isin(np.asarray(batch["types"]), (1, 2)), _valid(batch), small)
    np.testing.assert_allclose(loss(routing.sparse(m, small)), loss(m), rtol=1e-6)
    # Without the training step's fallback, a batch that does not fit gives other numbers.
    lo, _ = jax.jit(routing.sparse(m, small).apply)({"params": params}, *_inputs(batch))
    assert not np.allclose(np.asarray(lo)[_valid(batch)], np.asarray(base[3][0])[_valid(batch)],
                           atol=1e-3)
    with pytest.raises(ValueError, match="train.sparse_routing"):
        routing.sparse(m, (0.5, 1.5))
