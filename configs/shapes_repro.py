"""The shapes reproduction (issue 5): five rows with the same model and the same number of
training steps (1000), sized for about 2 hours on 2 CPU cores (in the background) or
minutes on one accelerator. The accuracy-vs-iteration-cap sweep runs on the full-method row;
a single-pass run at 2x the steps extends the learning curve.

  python -m strokes_jax reproduce --config configs/shapes_repro.py --workdir runs/repro
Variants: ':quick' is the 15-minute demo's budget per row (400 steps, ~40 minutes in all on
2 CPU cores), a first look at the ladder; ':gpu' sizes the ladder for one lent H100/H200
(a 4x wider model, 4x the batch, 4000 steps per row, single-pass runs at 2x and 4x for the
learning curve; not run yet: no GPU was lent when it was written); ':test' is for unit
tests.
"""

from configs import shapes_tiny


def get_config(arg: str | None = None):
    c = shapes_tiny.get_config("test" if arg == "test" else None)
    if arg == "test":
        return c
    if arg == "gpu":
        c.data.update(num_train=20000, batch_size=32)
        c.model.update(width=256, depth=6, heads=8, kv_heads=4, head_dim=32, mlp=1024,
                       dtype="bfloat16")
        c.train.update(steps=4000, log_every=100, eval_every=2000, checkpoint_every=1000)
        c.optim.update(total_steps=4000, warmup_steps=200, lr=5e-4)
        c.eval.update(prompts_per_tag=20, images_per_prompt=2, iteration_caps=(1, 2, 3),
                      batch_size=120)
        c.self_critique.num_prompts = 2000
        c.reproduce.single_pass_multiples = (2, 4)
        return c
    if arg == "quick":
        c.eval.update(prompts_per_tag=8, images_per_prompt=1, iteration_caps=(1, 2))
        c.self_critique.num_prompts = 240
        return c
    c.data.num_train = 6000
    c.train.update(steps=1000, log_every=50, eval_every=500, checkpoint_every=500)
    c.optim.update(total_steps=1000, warmup_steps=50)
    c.eval.update(prompts_per_tag=10, images_per_prompt=2, iteration_caps=(1, 2, 3))
    c.self_critique.num_prompts = 600
    c.reproduce.single_pass_multiples = (2,)
    return c
