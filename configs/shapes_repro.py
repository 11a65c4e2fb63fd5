"""The shapes reproduction (issue 5): five rows with the same model and the same number of
training steps (1000), sized for about 1.5-2 hours on 2 CPU cores (in the background) or
minutes on one accelerator. The accuracy-vs-iteration-cap sweep runs on the full-method row.

  python -m strokes_jax reproduce --config configs/shapes_repro.py --workdir runs/repro
Variants: ':quick' is the 15-minute demo's budget per row (400 steps, ~40 minutes in all on
2 CPU cores), a first look at the ladder; ':test' is for unit tests.
"""

from configs import shapes_tiny


def get_config(arg: str | None = None):
    c = shapes_tiny.get_config("test" if arg == "test" else None)
    if arg == "test":
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
    return c
