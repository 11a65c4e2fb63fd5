"""A ~1.2B-parameter MoT (0.6B active per token) for accelerator throughput benchmarks:
bf16 compute with fp32 params, scanned layers with remat, 4K-token packed rows of
interleaved text and 256-token images (BAGEL's 2x2-grouped FLUX latents at 256 px).

  python -m strokes_jax bench --config mot_1b --workdir runs/bench
Variants: `mot_1b:fsdp` shards parameters over all devices instead of pure data parallelism.
"""

from strokes_jax.configs import schema, shapes_tiny


def get_config(arg: str | None = None):
    opts = schema.parse_arg(arg, fsdp=False)
    c = shapes_tiny.get_config()
    c.model.update(width=2048, depth=12, heads=16, kv_heads=4, head_dim=128, mlp=5632,
                   rope_theta=1e6, dtype="bfloat16", scan_layers=True, remat="dots_no_batch",
                   attention="xla")
    c.data.update(seq_len=4096, batch_size=8)
    c.optim.update(lr=3e-4, warmup_steps=100, total_steps=10_000)
    c.bench.update(steps=10, warmup=3, vocab_size=32_768, patch_dim=64, latent_grid=(16, 16),
                   text_len=64)
    # Dense routing, said here: the shapes config's capacities do not fit this synthetic
    # batch, so inheriting them compiled both branches and always ran the dense one.
    c.train.update(shard_tolerance=0.1, sparse_routing=())
    if opts.fsdp:
        c.mesh.shape = (1, -1, 1)
    return c
