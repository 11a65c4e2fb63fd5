"""Cached vs uncached generation speed on a batch of 3-iteration episodes.

    python -m strokes_jax bench-generate [--config test] [--batch 4] [--out x.json]

An untrained model would not paint three iterations on its own, so the real model is
`Steered`: every call runs the real forward pass (the cost being measured), then its logits
and velocities are replaced by an oracle's that follow a reference episode per row (next
token of the reference stream; exact rectified-flow velocity to the reference image). Both
backends therefore make the same decisions and the same number of calls as on a trained
model that produced those episodes.
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from strokes_jax.sequence import tokenizer as tk
from strokes_jax.episodes import mixer
from strokes_jax import provenance
from strokes_jax.inference.generator import Generator, SamplingOptions
from strokes_jax.inference.kv_cache import KVCacheBackend
from strokes_jax.inference.uncached import UncachedBackend
from strokes_jax.model.unified import ModelConfig, UnifiedModel
from strokes_jax.sequence import layout


class Steered:
    """Stand-in for UnifiedModel (full and decode mode): runs `model` (None: no model, pure
    oracle) and overrides its outputs with reference episode refs[row % len(refs)]."""

    def __init__(self, model, etok: tk.EpisodeTokenizer, refs, cfg=None):
        self.model = model
        self.cfg = cfg if cfg is not None else model.cfg
        streams, images = [], []
        for ref in refs:
            a = etok(ref)
            streams.append(np.append(a["tokens"][a["types"] != layout.NOISY], etok.tok.pad_id))
            images.append(np.stack([tk.patchify(np.asarray(im), etok.patch).astype(np.float32)
                                    / 127.5 - 1.0 for im in ref.images()]))
        n, m = max(map(len, streams)), max(map(len, images))
        self.stream = jnp.asarray(np.stack([np.pad(s, (0, n - len(s)), constant_values=s[-1])
                                            for s in streams]))
        # vs_before[r, k]: <|vision_start|> count in stream[r, :k], the image being drawn.
        vs = np.asarray(self.stream) == etok.tok.vision_start
        self.vs_before = jnp.asarray(np.concatenate([np.zeros((len(refs), 1), int),
                                                     np.cumsum(vs, 1)], 1))
        self.images = jnp.asarray(np.stack([np.concatenate([i, np.repeat(i[-1:], m - len(i), 0)])
                                            for i in images]))
        self.vocab = etok.tok.vocab_size

    def apply(self, variables, tokens, types, positions, segment_ids, blocks, patch_pos,
              latents, timesteps, cache=None, **vit):
        out = None
        if self.model is not None:  # vit: vit_patches / vit_pos (ViT copies), canvas
            args = (tokens, types, positions, segment_ids, blocks, patch_pos, latents, timesteps)
            out = (self.model.apply(variables, *args, **vit) if cache is None
                   else self.model.apply(variables, *args, cache=cache, **vit))
        rows = jnp.arange(tokens.shape[0]) % self.stream.shape[0]
        clean = (segment_ids > 0) & (types != layout.NOISY)
        base = 0 if cache is None else cache["lengths"][:, None]
        k = base + jnp.cumsum(clean, axis=1) - 1  # clean-stream index of the last clean token
        k1 = jnp.clip(k + 1, 0, self.stream.shape[1] - 1)
        logits = 1e3 * jax.nn.one_hot(self.stream[rows[:, None], k1], self.vocab)
        img = jnp.clip(self.vs_before[rows[:, None], k1], 0, self.images.shape[1] - 1)
        x0 = self.images[rows[:, None], img, patch_pos]
        vel = (latents - x0) / jnp.maximum(timesteps, 1e-6)[..., None]
        if out is not None:  # keep the model's work alive under XLA's dead-code elimination
            logits, vel = logits + 0.0 * out[0], vel + 0.0 * out[1]
        if cache is None:
            return logits, vel
        new_kv = out[2] if out is not None else tuple(
            jnp.zeros((self.cfg.decoder.depth,) + tokens.shape + (self.cfg.decoder.kv_heads,
                                                                 self.cfg.decoder.head_dim))
            for _ in range(2))
        return logits, vel, new_kv


def reference_episodes(iterations: int, n: int, seed: int = 5, kind: str = "additive"):
    """n episodes with exactly `iterations` plan/sketch steps."""
    out = [e for e in mixer.generate_episodes(seed, 400, {kind: 1.0})
           if len(e.steps) == iterations]
    if len(out) < n:
        raise ValueError(f"only {len(out)} {kind} episodes with {iterations} steps")
    return out[:n]


def run(config_name: str = "", batch: int = 4, iterations: int = 3, flow_steps: int | None = None,
        repeats: int = 2, seed: int = 0) -> dict:
    from strokes_jax.configs import shapes_tiny

    config = shapes_tiny.get_config(config_name or None)
    w = config.world
    etok = tk.EpisodeTokenizer(tk.Tokenizer.shapes(), (w["image_size"], w["image_size"], 3), w["patch"])
    grid = w["image_size"] // w["patch"]
    mc = ModelConfig.from_config({**config.model.to_dict(), "vocab_size": etok.tok.vocab_size,
                                  "patch_dim": etok.codec.token_dim, "latent_grid": (grid, grid)})
    model = UnifiedModel(mc)
    z = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), z, z, z, z + 1, z, z,
                                 jnp.zeros((1, 8, etok.codec.token_dim)), jnp.zeros((1, 8)))["params"])
    refs = reference_episodes(iterations, batch)
    steered = Steered(model, etok, refs)
    steps = flow_steps or config.flow["sample_steps"]
    options = SamplingOptions(flow_steps=steps, shift=config.flow["sample_shift"],
                              max_iterations=iterations, max_text_tokens=64)
    prompts = [r.prompt for r in refs]
    result = {"commit": provenance.git_commit(), "device": provenance.device_info(),
              "config": config_name or "default",
              "model": config.model.to_dict(), "batch": batch, "iterations": iterations,
              "flow_steps": steps, "max_len": config.data.seq_len}
    outs = {}
    for name, backend in (("uncached", UncachedBackend), ("cached", KVCacheBackend)):
        gen = Generator(backend(steered, etok, max_len=config.data.seq_len), params,
                        options=options, seed=seed)
        t0 = time.time()
        gen(prompts, "process")  # compiles every shape the loop uses
        compile_s = time.time() - t0
        times = []
        for _ in range(repeats):
            t0 = time.time()
            outs[name] = gen(prompts, "process")
            times.append(time.time() - t0)
        result[name] = {"first_call_s": compile_s, "seconds": min(times), "all_seconds": times,
                        "nfe": [o.nfe for o in outs[name]],
                        "images": [len(o.images) for o in outs[name]],
                        "well_formed": [o.episode is not None for o in outs[name]]}
    result["same_text"] = all(a.text == b.text for a, b in zip(outs["uncached"], outs["cached"]))
    result["max_pixel_diff"] = int(max(
        (np.abs(x.astype(int) - y.astype(int)).max() for a, b in zip(outs["uncached"], outs["cached"])
         for x, y in zip(a.images, b.images)), default=0))
    result["speedup"] = result["uncached"]["seconds"] / result["cached"]["seconds"]
    return result


def main(argv=None, prog: str = "python -m strokes_jax bench-generate") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="", help="shapes_tiny variant ('' or 'test')")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--flow_steps", type=int, default=None, help="default: config flow.sample_steps")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="", help="write the JSON here too")
    a = ap.parse_args(argv)
    res = run(a.config, a.batch, a.iterations, a.flow_steps, a.repeats)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0
