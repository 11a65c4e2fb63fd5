"""The embedded default: a tiny unified model on the shapes world (every key and its default
is in schema.py; this file is those defaults). The demo trains it for 1000 steps on 2 CPU
cores, then generates single-pass and process-driven and scores both.

The training mix has no edits or critiques: each delays the step at which the model first
draws the planned object, and the demo's budget is 1000 steps. The reproduction
(shapes_repro.py) trains and measures those rows.

Variants: `shapes_tiny:test` shrinks everything for unit tests. `shapes_tiny:images` runs the
same demo through the paper's data path: the episodes exported as 96x96 PNG pictures with a
JSONL manifest, a small FLUX-architecture autoencoder trained on them (8x down, 12x12x4
latents, 2x2 grouping: 36 tokens of 16 values per image, as many tokens as the pixel demo),
latents precomputed once, and the text through a Qwen2-style byte-level BPE.
`shapes_tiny:images,test` is its unit-test size.
"""

from strokes_jax.configs import schema


def get_config(arg: str | None = None):
    opts = schema.parse_arg(arg, test=False, images=False)
    c = schema.defaults()
    if opts.images:
        c.world.update(image_size=96, patch=16, latents="ae", tokenizer="bpe")
        c.data.update(source="pictures", precompute_latents=True)
        # 261K parameters; `train-ae` fits scale and shift to its latents. 1000 steps of 8
        # pictures reach 99.6% checker agreement on held-out pictures in 9 minutes on 2 cores.
        c.vae = dict(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=4, in_channels=3,
                     out_ch=3, groups=8, scale_factor=1.0, shift_factor=0.0, dtype="float32")
    if opts.test:
        c.data.update(num_train=64, num_eval=16, seq_len=512, batch_size=2)
        c.model.update(width=32, depth=2, heads=2, kv_heads=1, head_dim=16, mlp=64)
        c.optim.update(total_steps=20, warmup_steps=2)
        # Width 32: norm scales and biases are a visible share of the parameters.
        c.train.update(steps=8, log_every=2, eval_every=4, checkpoint_every=4, shard_tolerance=0.5,
                       sparse_routing=(), tb_images=1)  # tests run on 8-device meshes
        c.flow.sample_steps = 3
        c.bench.update(steps=2, warmup=1)
        c.self_critique.num_prompts = 6
        c.eval.update(prompts_per_tag=1, images_per_prompt=1, max_iterations=2,
                      max_text_tokens=24, batch_size=6, filmstrips=2, iteration_caps=(1,))
        if opts.images:
            c.vae.update(ch=8, ch_mult=(1, 1, 1, 1), groups=4)
            c.ae_train.update(steps=4, batch_size=4, num_scenes=16, num_eval=8)
    return c


def get_sweep(arg: str | None = None, hyper=None):
    """`sweep run --config shapes_tiny[:test]`: the peak learning rate, three points."""
    schema.parse_arg(arg, test=False)  # an unknown variant fails here, as in get_config
    return hyper.sweep("optim.lr", [3e-4, 1e-3, 3e-3])
