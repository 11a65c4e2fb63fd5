"""The shapes reproduction of the paper's ablation ladder: five rows with the same model and
the same number of training steps, scored on Shapes-GenEval; the accuracy-vs-iteration-cap
sweep runs on the full-method row.

  python -m strokes_jax reproduce --config shapes_repro:long --workdir runs/repro

Variants (combine with commas):
  long   the reference: 2000 steps per row and no longer single-pass run (about 2 hours
         on 2 CPU cores). At 1000 steps the rows with critiques have not yet learned to draw
         the planned object.
  quick  1000 steps per row with a smaller evaluation and no 2x single-pass run
  test   unit-test sizes
  repair the measurement of repair (with `long`): the hard category in training up to 4
         objects and in the evaluation up to 6 (30 prompts), mistakes of every kind injected
         at the second iteration of every benchmark prompt, and a self-critique split from
         sampled text, two rollouts per prompt, at most half positives. On 2 idle
         CPU cores the full-method row's phase 1 (1400 steps) took
         39 min and its self-critique sampling over half an hour more, so the ladder needs
         several hours there; run it on an accelerator or one row at a time.
With no variant: 1000 steps per row and a 2000-step (2x) single-pass run.
`--config.reproduce.rows="('single_pass','self_critique')"` runs the claim's two rows only.
"""

from strokes_jax.configs import schema, shapes_tiny

MIXES = dict(
    single_pass=dict(single_pass=1.0),
    additive=dict(additive=1.0),
    edits=dict(additive=0.6, edit=0.4),
    symbolic_critique=dict(additive=0.45, edit=0.3, critique=0.25),
)


def get_config(arg: str | None = None):
    opts = schema.parse_arg(arg, long=False, quick=False, test=False, repair=False)
    c = shapes_tiny.get_config("test" if opts.test else None)
    c.reproduce.mixes = MIXES
    if opts.test:
        return c
    if opts.quick:
        c.eval.update(prompts_per_tag=8, images_per_prompt=1, iteration_caps=(1, 2))
        c.self_critique.num_prompts = 240
        return c
    c.data.num_train = 6000
    c.train.update(steps=1000, log_every=50, eval_every=500, checkpoint_every=500)
    c.optim.update(total_steps=None, warmup_steps=50)
    c.eval.update(prompts_per_tag=10, images_per_prompt=2, iteration_caps=(1, 2, 3))
    c.self_critique.num_prompts = 600
    c.reproduce.single_pass_multiples = (2,)
    # Sparse MoT routing capacities (gen, und) per row: the largest shares of each mix's
    # batches, with a margin. The self-critique split's verdicts add text, so that row gets
    # more understanding capacity; a batch that does not fit runs dense.
    process = (0.625, 0.3125)
    c.reproduce.sparse_routing = dict(single_pass=(0.875, 0.1875), additive=process,
                                      edits=process, symbolic_critique=process,
                                      self_critique=(0.625, 0.375))
    if opts.long:
        c.train.steps = 2000
        c.reproduce.single_pass_multiples = ()  # keeps the reference at about 2 hours
    if opts.repair:
        _repair(c)
    return c


def _repair(c) -> None:
    from strokes_jax.episodes import critique
    c.data.hard_max_objects = 4
    # A 6-object episode is ~720 tokens, and its critique adds a refine.
    c.eval.update(hard_prompts=30, max_len=1024, max_iterations=7,
                  inject_kinds=critique.KINDS, inject_at=1)
    c.self_critique.update(text_temperature=1.0, rollouts=2, max_positive_fraction=0.5)
