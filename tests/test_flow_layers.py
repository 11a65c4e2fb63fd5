"""Flow matching helpers (shift, schedule, Euler, CFG) and the model's positional pieces
(RoPE, timestep features, 2-D sin-cos table): pure functions, checked in isolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from strokes_jax.configs import shapes_tiny
from strokes_jax.model import flow
from strokes_jax.model.layers import rope, sincos_2d, timestep_features


# --------------------------------------------------------------------------------------
# 1. Flow helpers.


def test_shift():
    t = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(flow.shift(t, 1.0), t, atol=1e-12)
    for s in (1.5, 3.0, 6.0):
        y = flow.shift(t, s)
        assert np.all(np.diff(y) > 0), f"shift(., {s}) is not increasing"
        assert np.all(y[1:-1] > t[1:-1]), "s > 1 moves time towards noise"
        np.testing.assert_allclose([y[0], y[-1]], [0.0, 1.0], atol=1e-12)
        # The paper's formula t <- s t / (1 + (s - 1) t); s and 1/s are inverse shifts.
        np.testing.assert_allclose(y, s * t / (1 + (s - 1) * t), rtol=1e-12)
        np.testing.assert_allclose(flow.shift(y, 1.0 / s), t, atol=1e-12)
    np.testing.assert_allclose(flow.shift(0.5, 3.0), 0.75)


@pytest.mark.parametrize("s", [1.0, 3.0])
def test_schedule(s):
    ts = flow.schedule(10, s)
    assert ts.shape == (11,)
    assert ts[0] == 1.0 and ts[-1] == 0.0
    assert np.all(np.diff(ts) < 0)


@pytest.mark.parametrize("s,steps", [(1.0, 1), (1.0, 7), (3.0, 20)])
def test_euler_recovers_straight_path(s, steps):
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(2, 5, 4)).astype(np.float32)
    noise = rng.normal(size=x0.shape).astype(np.float32)
    calls = []

    def v(x, t):  # the exact velocity field of the straight path through x0 and noise
        calls.append(t)
        np.testing.assert_allclose(x, flow.interpolate(x0, noise, np.full(x0.shape[:-1], t)),
                                   atol=1e-5)
        return flow.velocity_target(x0, noise)

    out, nfe = flow.euler_sample(v, noise, steps, s)
    assert nfe == steps == len(calls) and calls[0] == 1.0
    np.testing.assert_allclose(out, x0, atol=1e-5)


def test_cfg_combine():
    rng = np.random.default_rng(0)
    vc = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    vu = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    n = lambda v: np.sqrt(np.sum(np.square(np.asarray(v)), axis=(1, 2)))
    for scale in (0.0, 1.0, 2.0, 4.0, 8.0):
        plain = flow.cfg_combine(vc, vu, scale, renorm="none")
        np.testing.assert_allclose(plain, vu + scale * (vc - vu), rtol=1e-6)
        v = flow.cfg_combine(vc, vu, scale)
        assert np.all(n(v) <= n(vc) * (1 + 1e-5)), scale
        grew = n(plain) > n(vc)
        # Where the guided norm did not grow, renorm is a no-op.
        np.testing.assert_allclose(np.asarray(v)[~grew], np.asarray(plain)[~grew], rtol=1e-6)
        # Where it grew, the direction is kept and the norm clamped to the conditional one.
        if grew.any():
            np.testing.assert_allclose(n(v)[grew], n(vc)[grew], rtol=1e-5)
            cos = np.sum(np.asarray(v) * np.asarray(plain), axis=(1, 2)) / (n(v) * n(plain))
            np.testing.assert_allclose(cos[grew], 1.0, rtol=1e-5)
    # A case that certainly shrinks: uncond = 2 * cond, scale 1.5 -> 0.5 * cond.
    v = flow.cfg_combine(vc, 2 * vc, 1.5)
    np.testing.assert_allclose(v, 0.5 * vc, rtol=1e-6)
    # Per example: one example growing does not rescale another.
    vu2 = vu.at[0].set(-10 * vc[0]).at[1].set(2 * vc[1])
    v = np.asarray(flow.cfg_combine(vc, vu2, 1.5))
    np.testing.assert_allclose(v[1], 0.5 * np.asarray(vc[1]), rtol=1e-6)
    np.testing.assert_allclose(n(v[:1]), n(vc[:1]), rtol=1e-5)
    with pytest.raises(ValueError):
        flow.cfg_combine(vc, vu, 2.0, renorm="bogus")


# --------------------------------------------------------------------------------------
# 2. RoPE, timestep features, 2-D sin-cos table.


def test_rope_relative_positions():
    rng = np.random.default_rng(0)
    D = 16
    q = jnp.asarray(rng.normal(size=(1, 1, 2, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 2, D)), jnp.float32)

    def dot(p1, p2):
        a = rope(q, jnp.asarray([[p1]]), 10000.0)
        b = rope(k, jnp.asarray([[p2]]), 10000.0)
        return np.asarray(jnp.sum(a * b, -1))

    for p1, p2 in ((3, 1), (10, 4), (0, 7)):
        ref = dot(p1, p2)
        for off in (1, 5, 37):
            np.testing.assert_allclose(dot(p1 + off, p2 + off), ref, rtol=1e-4, atol=1e-4)
    assert np.abs(dot(3, 1) - dot(4, 1)).max() > 1e-3, "rope must depend on the offset"
    # Position 0 is the identity; rope preserves norms.
    np.testing.assert_allclose(rope(q, jnp.zeros((1, 1), jnp.int32), 1e4), q, atol=1e-7)
    x = rope(q, jnp.asarray([[9]]), 1e4)
    np.testing.assert_allclose(jnp.linalg.norm(x, axis=-1), jnp.linalg.norm(q, axis=-1),
                               rtol=1e-5)
    # Rotate-half layout: e_0 rotates into e_{D/2} by angle p * theta^0 = p.
    e0 = jnp.zeros((1, 1, 1, D)).at[..., 0].set(1.0)
    y = np.asarray(rope(e0, jnp.asarray([[2]]), 1e4))[0, 0, 0]
    expect = np.zeros(D)
    expect[0], expect[D // 2] = np.cos(2.0), np.sin(2.0)
    np.testing.assert_allclose(y, expect, atol=1e-6)


def test_timestep_features_cosine_first():
    f = np.asarray(timestep_features(jnp.zeros((2, 3)), 256))
    assert f.shape == (2, 3, 256)
    np.testing.assert_array_equal(f[..., :128], 1.0)
    np.testing.assert_array_equal(f[..., 128:], 0.0)
    t = jnp.asarray([0.3, 1.0])
    g = np.asarray(timestep_features(t, 8))
    # Frequency 0 is 1: entry 0 is cos(t), entry half is sin(t).
    np.testing.assert_allclose(g[:, 0], np.cos([0.3, 1.0]), rtol=1e-6)
    np.testing.assert_allclose(g[:, 4], np.sin([0.3, 1.0]), rtol=1e-6)


def test_sincos_2d():
    gh, gw, dim = 3, 5, 32
    tab = sincos_2d(gh, gw, dim)
    assert tab.shape == (gh * gw, dim) and tab.dtype == np.float32
    assert len(np.unique(tab.round(6), axis=0)) == gh * gw, "rows must be distinct"
    # Row-major (index r * gw + c); one half of the channels depends only on the row, the
    # other only on the column (which half is which is not pinned: MAE/BAGEL put the column
    # first, this implementation the row).
    t3 = tab.reshape(gh, gw, dim)
    halves = (t3[..., : dim // 2], t3[..., dim // 2:])
    row_only = [np.all(h == h[:, :1]) for h in halves]
    col_only = [np.all(h == h[:1, :]) for h in halves]
    assert sorted([row_only.index(True), col_only.index(True)]) == [0, 1], (row_only, col_only)
    r_half, c_half = halves[row_only.index(True)], halves[col_only.index(True)]
    assert len(np.unique(r_half[:, 0].round(6), axis=0)) == gh
    assert len(np.unique(c_half[0].round(6), axis=0)) == gw
    # Position (0, 0) is sin(0) = 0 / cos(0) = 1 in each half.
    np.testing.assert_allclose(tab[0], np.tile(np.repeat([0.0, 1.0], dim // 4), 2), atol=1e-7)
    with pytest.raises(ValueError):
        sincos_2d(2, 2, 30)


def test_x_prediction_head_is_the_velocity_of_its_x0():
    """model.prediction='x': with the same parameters, the velocity is (x_t - head) / t
    (t floored at x_min_t), where head is what the v-model returns, so losses, samplers and
    CFG see a velocity either way; a zero head (the init) gives x_t / t."""
    import flax.linen as nn
    from strokes_jax.model.unified import ModelConfig, UnifiedModel
    mc = dict(shapes_tiny.get_config("test").model)
    mc.update(vocab_size=11, patch_dim=12, latent_grid=(2, 2), prediction="v",
              canvas_skip=False)
    vm = UnifiedModel(ModelConfig.from_config(mc))
    xm = UnifiedModel(ModelConfig.from_config({**mc, "prediction": "x", "x_min_t": 0.1}))
    rng = np.random.default_rng(0)
    L = 6
    types = jnp.asarray([[0, 0, 1, 1, 1, 1]])
    args = [jnp.asarray([[3, 4, 0, 0, 0, 0]]), types, jnp.asarray([[0, 1, 2, 2, 2, 2]]),
            jnp.ones((1, L), jnp.int32), jnp.asarray([[0, 0, 1, 1, 1, 1]]),
            jnp.asarray([[0, 0, 0, 1, 2, 3]]),
            jnp.asarray(rng.normal(size=(1, L, 12)), jnp.float32),
            jnp.asarray([[0, 0, 0.5, 0.5, 0.5, 0.5]], jnp.float32)]
    p = nn.unbox(vm.init(jax.random.PRNGKey(0), *args)["params"])
    np.testing.assert_allclose(xm.apply({"params": p}, *args)[1][0, 2:],
                               args[6][0, 2:] / 0.5, rtol=1e-6)  # zero-initialised head
    p["llm2vae"]["kernel"] = jnp.asarray(rng.normal(size=p["llm2vae"]["kernel"].shape), jnp.float32)
    head = vm.apply({"params": p}, *args)[1]
    for t in (0.5, 0.02):
        a = list(args)
        a[7] = jnp.where(types == 1, t, 0.0)
        head = vm.apply({"params": p}, *a)[1]
        want = (a[6] - head) / max(t, 0.1)
        np.testing.assert_allclose(xm.apply({"params": p}, *a)[1][0, 2:], want[0, 2:], rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="model.prediction"):
        ModelConfig.from_config({**mc, "prediction": "eps"})
