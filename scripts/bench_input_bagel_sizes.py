"""Does the input pipeline keep up at BAGEL's image sizes? `bench-input` on text-to-image rows
of BAGEL's parquet layout: photographs' sizes and aspect ratios (shortest side 512 to 1536
pixels), resized by BAGEL's rules (VAE path 1024 / 512 / 16, ViT path 980 / 378 / 14),
latents precomputed, packed into 33,000-token rows, 8 rows a batch (one per GPU of an
8-GPU host). The autoencoder is FLUX's architecture at the `bagel7b_process:test` width,
randomly initialised: its latents have the real shapes (4,096 tokens of 64 values for a
1024-pixel image), which is what the pipeline reads. No step runs here (a 33K-token row
does not fit this machine); the JSON holds the analytic step time of BAGEL-7B per row on an
H100 at peak, the bound the input must stay under.

  python scripts/bench_input_bagel_sizes.py --workdir runs/bench_input_bagel

The fixtures (parquet, tokenizer.json, AE) are written under --workdir and reused.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image


def _photo(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A JPEG with a photograph's entropy: smooth colour fields, edges and sensor noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 4, 3)
        img[..., c] = 128 + 80 * np.sin(fx * x / w * np.pi + ph) * np.cos(fy * y / h * np.pi)
    for _ in range(12):
        x0, y0 = rng.integers(0, w - 16), rng.integers(0, h - 16)
        img[y0:y0 + rng.integers(16, h // 3), x0:x0 + rng.integers(16, w // 3)] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def fixtures(workdir: str, n: int, seed: int = 0) -> dict:
    import jax
    import pyarrow as pa
    import pyarrow.parquet as pq

    from strokes_jax.configs import bagel7b_process
    from strokes_jax.convert.cli import configs_of
    from strokes_jax.model.vae import AutoEncoder
    from strokes_jax.sequence import qwen
    from strokes_jax.train import autoencoder

    os.makedirs(workdir, exist_ok=True)
    paths = {k: os.path.join(workdir, v) for k, v in
             (("parquet", "t2i.parquet"), ("eval", "t2i_eval.parquet"),
              ("tokenizer", "tokenizer.json"), ("ae", "ae"))}
    rng = np.random.default_rng(seed)
    for key, rows in (("parquet", n), ("eval", 4)):  # the eval split: training asks for one
        if os.path.exists(paths[key]):
            continue
        images, captions = [], []
        for i in range(rows):
            short, ratio = int(rng.integers(512, 1537)), float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0]))
            w, h = (int(short * ratio), short) if rng.random() < 0.5 else (short, int(short * ratio))
            images.append(_photo(rng, w, h))
            captions.append(f"a photograph, {w} by {h} pixels, of coloured fields and shapes, number {i}")
        pq.write_table(pa.table({"image": images, "caption": captions}), paths[key])
    if not os.path.exists(paths["tokenizer"]):
        qwen.shapes_bpe().save(paths["tokenizer"])
    if not os.path.exists(os.path.join(paths["ae"], autoencoder.CONFIG_JSON)):
        _, ae_cfg = configs_of(bagel7b_process.get_config("test"))
        params = AutoEncoder(ae_cfg).init(jax.random.PRNGKey(seed), np.zeros((1, 16, 16, 3), np.float32))
        autoencoder.save(paths["ae"], ae_cfg, params["params"])
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--images", type=int, default=48, help="parquet rows written (reused across batches)")
    p.add_argument("--batches", type=int, default=8, help="batches timed")
    args = p.parse_args(argv)
    paths = fixtures(args.workdir, args.images)
    cmd = [sys.executable, "-m", "strokes_jax", "bench-input", "--config", "bagel7b_process:test",
           f"--workdir={args.workdir}", "--bound_config", "bagel7b_process", "--input_steps=0",
           f"--input_batches={args.batches}",
           "--config.data.source=parquet", f"--config.data.parquet.path={paths['parquet']}",
           f"--config.data.parquet.eval_path={paths['eval']}",
           f"--config.world.tokenizer={paths['tokenizer']}", f"--config.world.ae_path={paths['ae']}",
           "--config.world.image_size=1024", "--config.world.min_image_size=512",
           "--config.world.vit_max_image_size=980", "--config.world.vit_min_image_size=378",
           "--config.data.seq_len=33000", "--config.data.batch_size=8",
           "--config.model.latent_grid=(64, 64)", "--config.model.vision.max_side=70"]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
