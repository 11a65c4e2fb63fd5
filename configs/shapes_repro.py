"""The shapes reproduction (issue 5): five rows with the same model and the same number of
training steps. The accuracy-vs-iteration-cap sweep runs on the full-method row.

  python -m strokes_jax reproduce --config configs/shapes_repro.py:long --workdir runs/repro

Variants:
- ':long' is the reference: 2000 steps per row (results/repro/reference_2000_steps, one
  command at 5f9a9e5: every process row 0.97 to 1.00, single-pass 0.067). At 1000 steps the
  rows with critiques have not yet learned to draw the planned object: their flow loss
  drops between steps 700 and 1050, the additive-only row's between 400 and 550. With sparse
  MoT routing a process row trains in about 24 minutes on 2 CPU cores with nothing else
  running (additive: 1445 s), so the five rows take about 2 h 10 min (an estimate; the run
  took 2 h 40 min with an hour on shared cores). No longer single-pass run, to keep that
  budget: `--config.reproduce.single_pass_multiples="(2,)"` adds a 4000-step one (about an
  hour more). `--config.reproduce.rows="('single_pass','self_critique')"` runs the claim's
  two rows only.
- no variant: 1000 steps per row and a 2000-step (2x) single-pass run. The five rows took
  9.5 minutes of device time on one H100 (results/repro_h100); at this budget the ladder
  runs backwards (README).
- ':quick' is 1000 steps per row with a smaller evaluation and no 2x single-pass run.
- ':test' is for unit tests.
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
    c.reproduce.single_pass_multiples = (2,)
    # Sparse MoT routing (model/routing.py), (gen, und) capacity fractions per row: the
    # largest shares seen in 100 batches of each mix (single-pass 0.844 / 0.148, additive
    # and edits 0.562 / 0.293, critique mix 0.606 / 0.299) with a margin. A batch that does
    # not fit runs dense routing, so the capacities decide speed (and float rounding). The
    # self-critique split's verdicts add text: phase 2 fills up to 0.606 / 0.368, so that row
    # gets more understanding capacity (at 5f9a9e5 it had 0.3125 and 330 of its 600 phase-2
    # steps ran dense). 0.87 s -> 0.66 s per additive step on 2 CPU cores
    # (results/bench/step_breakdown_cpu.py).
    process = (0.625, 0.3125)
    c.reproduce.sparse_routing = dict(single_pass=(0.875, 0.1875), additive=process,
                                      edits=process, symbolic_critique=process,
                                      self_critique=(0.625, 0.375))
    if arg == "long":
        c.train.steps = c.optim.total_steps = 2000
        c.reproduce.single_pass_multiples = ()  # keeps the reference at about 2 hours
    elif arg is not None:
        raise ValueError(f"configs/shapes_repro.py: unknown variant {arg!r} "
                         f"(long, quick, test or none)")
    return c
