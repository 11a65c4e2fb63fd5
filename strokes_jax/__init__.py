"""strokes_jax: process-driven image generation (plan -> sketch -> inspect -> refine) in JAX."""

__version__ = "0.1.0"
