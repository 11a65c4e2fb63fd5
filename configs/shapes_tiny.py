"""The embedded default: a tiny unified model on the shapes world, sized so the whole job
(data, training, generation both ways, scoring, report) takes about 15 minutes on 2 CPU cores
(measured: 907 s for 1000 steps, nothing else running; the install comes on top).

Variants: `--config configs/shapes_tiny.py:test` shrinks everything for unit tests.
"""

import ml_collections

from strokes_jax.train import sharding


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.world = dict(name="shapes", image_size=36, patch=6)

    c.data = ml_collections.ConfigDict(dict(
        data_dir="",  # default: <workdir>/data
        seed=1,
        num_train=3000,
        num_eval=96,
        # Episode kinds in the training mix; single-pass episodes let the same model serve as
        # its own single-pass baseline (prompt -> image). No edits or critiques in the demo:
        # each slows down how soon the model draws the planned object (additive-only learns it
        # around step 500, the critique mix after step 700), and the demo has 1000 steps. The
        # reproduction (configs/shapes_repro.py) trains and measures those rows.
        mix=dict(single_pass=0.2, additive=0.8),
        seq_len=512,
        batch_size=8,
        max_skip_fraction=0.01,
        shuffle_buffer_seed=0,
        # Phase 2: more ArrayRecord episode files mixed in, [{'path': ..., 'weight': ...}].
        extra_sources=(),
        main_weight=1.0,
        # BAGEL's CFG condition dropout (prompt / clean image copy / ViT copy), needed before
        # eval.cfg_*_scale can guide; off here, so the demo trains every episode conditioned.
        cfg_dropout=dict(text=0.0, vae=0.0, vit=0.0),
    ))

    c.model = ml_collections.ConfigDict(dict(
        width=128, depth=4, heads=4, kv_heads=4, head_dim=32, mlp=512,
        rope_theta=10000.0, qk_norm=True, qkv_bias=True, norm_eps=1e-6, dtype="float32",
        scan_layers=False, remat="none", attention="xla",
        time_scale=1.0,  # t fed to the timestep embedder is t * time_scale (BAGEL: 1.0)
        time_adaln=False,  # adaLN on the generation expert (not BAGEL; model/mot.py)
        # The head predicts x_0 (not BAGEL's v; model/unified.py). With pixel patches as
        # latents this is what makes images learn at this size: 300-step A/B, flow MSE 0.067
        # (x) vs 0.121 (v) at shift 3, and clean backgrounds instead of colour noise (README).
        prediction="x",
        # Noisy tokens get the previous image's patch as input and the x-head predicts the
        # change from it (not BAGEL; model/unified.py). Without it the second sketch lost
        # the first sketch's objects at every budget we ran (README).
        canvas_skip=True,
    ))

    # Shift 3 spends training and sampling at high noise, where layout is decided (A/B in
    # README: colour noise -> grey canvases with blobs at 300 steps, v-prediction).
    c.flow = dict(train_shift=3.0, sample_shift=3.0, sample_steps=20)

    c.losses = ml_collections.ConfigDict(dict(
        ce_weight=0.25, mse_weight=1.0,  # BAGEL's CE:MSE
        stage_weights=dict(prompt=0.0, plan=1.0, sketch=1.0, inspect=1.0, refine=1.0),
    ))

    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=40, total_steps=1000, end_lr_factor=0.05,
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
        ema_decay=0.0,  # > 0 keeps an EMA of the weights, used for generation
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=1000, log_every=50, eval_every=400, checkpoint_every=400, keep_checkpoints=2,
        accum_steps=1,  # gradient accumulation: micro-batches per step
        init_from="",  # a workdir whose newest params start this run (phase 2)
        shard_tolerance=0.25,  # fail if a device holds > (1 + tol) x its share of params
        # (gen, und) capacity fractions of each batch's tokens for sparse MoT routing in the
        # training step (model/routing.py; single-device only), () for dense routing. The
        # demo's mix fills at most 0.633 / 0.292 of a batch (200 batches); a batch that does
        # not fit runs dense, so this decides speed (and float rounding), not results.
        sparse_routing=(0.6875, 0.3125),
        # Prompts painted at every periodic evaluation, as TensorBoard filmstrips
        # (evaluate/train_images.py); 0 turns it off.
        tb_images=2,
    ))

    c.mesh = dict(shape=(-1, 1, 1))
    c.rules = sharding.DEFAULT_RULES  # one table; override entries per experiment

    c.eval = ml_collections.ConfigDict(dict(
        seed=1234,
        prompts_per_tag=6,
        images_per_prompt=1,
        max_iterations=5,  # cap on plan/sketch/inspect iterations per episode
        max_text_tokens=48,  # cap per text segment
        batch_size=36,
        filmstrips=12,
        iteration_caps=(),  # e.g. (1, 2, 3): also score the process mode under these caps
        kv_cache=True,  # cached interleaved decoding (tests/test_kv_cache.py: same outputs)
        cfg_text_scale=1.0,  # BAGEL's text CFG when != 1 (BAGEL's default for T2I is 4.0)
        cfg_img_scale=1.0,  # BAGEL's image CFG (uncond context without images) when != 1
        cfg_interval=(0.4, 1.0),
    ))

    # `python -m strokes_jax self-critique`: the trained model's own traces, inspected.
    # text_temperature > 0 samples the traces' text instead of decoding greedily, so the
    # split also holds the plan errors the model could make (0: the model's greedy traces).
    c.self_critique = ml_collections.ConfigDict(dict(seed=77, num_prompts=240,
                                                     text_temperature=0.0))

    # `python -m strokes_jax reproduce`: the ablation ladder, same steps for every row.
    c.reproduce = ml_collections.ConfigDict(dict(
        mixes=dict(
            single_pass=dict(single_pass=1.0),
            additive=dict(additive=1.0),
            edits=dict(additive=0.6, edit=0.4),
            symbolic_critique=dict(additive=0.45, edit=0.3, critique=0.25),
        ),
        phase2_fraction=0.3,  # of the self_critique row's steps, spent on the mixture
        self_critique_weight=0.5,  # of the self-critique split against the phase-1 data
        # Learning curve of the single-pass row: scored at this many evenly spaced checkpoints,
        # plus single-pass runs of these multiples of the row's steps (each from scratch).
        curve_points=4,
        single_pass_multiples=(),
        # The rows to run (default all), e.g. --config.reproduce.rows="('self_critique',)";
        # finished rows in the workdir are resumed, not retrained.
        rows=("single_pass", "additive", "edits", "symbolic_critique", "self_critique"),
    ))

    # `python -m strokes_jax bench`: synthetic batches shaped like shapes episodes.
    c.bench = ml_collections.ConfigDict(dict(
        steps=10, warmup=2, vocab_size=70, patch_dim=108, latent_grid=(6, 6), text_len=24))

    if arg == "test":
        c.data.num_train, c.data.num_eval = 64, 16
        c.data.seq_len, c.data.batch_size = 512, 2
        c.model.update(width=32, depth=2, heads=2, kv_heads=1, head_dim=16, mlp=64)
        c.optim.update(total_steps=20, warmup_steps=2)
        # Width 32: norm scales and biases are a visible share of the parameters.
        c.train.update(steps=8, log_every=2, eval_every=4, checkpoint_every=4, shard_tolerance=0.5)
        c.train.sparse_routing = ()  # tests run on 8-device meshes; sparse is single-device
        c.train.tb_images = 1
        c.flow["sample_steps"] = 3
        c.bench.update(steps=2, warmup=1)
        c.self_critique.update(num_prompts=6)
        c.eval.update(iteration_caps=(1,))
        c.eval.update(prompts_per_tag=1, images_per_prompt=1, max_iterations=2,
                      max_text_tokens=24, batch_size=6, filmstrips=2)
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; expected '' or 'test'")
    return c
