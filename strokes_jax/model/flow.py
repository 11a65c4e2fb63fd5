"""Rectified flow (BAGEL convention): x_t = (1 - t) x_0 + t * noise, v = noise - x_0, t = 1 is
pure noise. Training t ~ sigmoid(N(0, 1)) then shifted; sampling walks the same shifted
schedule from 1 to 0 with Euler steps."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def shift(t, s: float):
    """Timestep shift t <- s t / (1 + (s - 1) t); s > 1 spends more steps at high noise."""
    return s * t / (1.0 + (s - 1.0) * t)


def sample_t(rng: jax.Array, shape, s: float) -> jax.Array:
    return shift(jax.nn.sigmoid(jax.random.normal(rng, shape)), s)


def interpolate(x0, noise, t):
    t = t[..., None]
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0, noise):
    return noise - x0


def schedule(num_steps: int, s: float) -> np.ndarray:
    """num_steps + 1 decreasing times from 1 to 0 on the shifted grid."""
    return np.asarray(shift(np.linspace(1.0, 0.0, num_steps + 1), s), np.float32)


def cfg_combine(v_cond, v_uncond, scale: float, renorm: str = "global", v_img_uncond=None,
                img_scale: float = 1.0):
    """Classifier-free guidance as BAGEL combines it: text guidance against the text-free
    context (`v_uncond`; None = no text CFG), then image guidance of that result against the
    image-free context (`v_img_uncond`), then 'global' renorm: scale the guided velocity down
    to the conditional one's norm if it grew (per example, over all its tokens)."""
    v = v_cond if v_uncond is None else v_uncond + scale * (v_cond - v_uncond)
    if v_img_uncond is not None:
        v = v_img_uncond + img_scale * (v - v_img_uncond)
    if renorm == "global":
        axes = tuple(range(1, v.ndim))
        n_c = jnp.sqrt(jnp.sum(v_cond ** 2, axis=axes, keepdims=True))
        n_v = jnp.sqrt(jnp.sum(v ** 2, axis=axes, keepdims=True))
        v = v * jnp.minimum(1.0, n_c / jnp.maximum(n_v, 1e-12))
    elif renorm != "none":
        raise ValueError(f"unknown cfg renorm {renorm!r}; expected 'global' or 'none'")
    return v


def euler_sample(velocity_fn: Callable, noise: np.ndarray, num_steps: int, s: float):
    """Integrate dx/dt = v from t = 1 to 0. velocity_fn(x, t) -> v. Returns (x_0, nfe)."""
    ts = schedule(num_steps, s)
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x - velocity_fn(x, float(t)) * (t - t_next)
    return x, num_steps
