"""The embedded default: a tiny unified model on the shapes world (every key and its default
is in schema.py; this file is those defaults). The demo trains it for 1000 steps on 2 CPU
cores, then generates single-pass and process-driven and scores both.

The training mix has no edits or critiques: each delays the step at which the model first
draws the planned object, and the demo's budget is 1000 steps. The reproduction
(shapes_repro.py) trains and measures those rows.

Variants: `shapes_tiny:test` shrinks everything for unit tests.
"""

from strokes_jax.configs import schema


def get_config(arg: str | None = None):
    opts = schema.parse_arg(arg, test=False)
    c = schema.defaults()
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
    return c


def get_sweep(arg: str | None = None, hyper=None):
    """`sweep run --config shapes_tiny[:test]`: the peak learning rate, three points."""
    schema.parse_arg(arg, test=False)  # an unknown variant fails here, as in get_config
    return hyper.sweep("optim.lr", [3e-4, 1e-3, 3e-3])
