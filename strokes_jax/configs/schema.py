"""Every config key, its default and what it means, in one place.

`defaults()` is the embedded default (the tiny shapes-world model the demo trains); the
config files start from it and change what they need. It comes back locked: setting a key
that is not here fails at once, naming the key. `check(config)` walks any config against
these keys, so a config built some other way (or edited after loading) fails the same way
before anything compiles. A few values are open maps whose keys are checked where they are
used (OPEN below): the training mix, the ladder's mixes and capacities, the sharding rules,
and the ViT and autoencoder blocks (checked by their dataclasses).
"""

from __future__ import annotations

import ast
import difflib

import ml_collections

OPEN = ("data.mix", "rules", "model.vision", "vae", "reproduce.mixes", "reproduce.sparse_routing")

# Logical axis -> mesh axes (data, fsdp, tensor), the default `rules` of every config: the
# model names its parameter and activation axes, the config decides where they go.
# Parameters are sharded FSDP-style over `fsdp` on their embedding axis and tensor-parallel
# over `tensor` on heads / mlp / vocab; the batch is split over data x fsdp.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("vit_embed", None),
    ("heads", "tensor"),
    ("head_dim", None),
    ("qkv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("patch", None),
    ("freq", None),
    ("adaln", None),
    ("norm", None),
    ("layers", None),
)


class ConfigKeyError(ValueError):
    pass


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and anything else not seeded below

    c.world = dict(
        name="shapes",  # "shapes": the embedded procedural world (the only one that trains yet)
        image_size=36,  # pixels per side of every image
        patch=6,  # pixels per latent patch side (shapes: identity "VAE", 6x6x3 = 108 values)
        vit_max_image_size=0,  # BAGEL: longest side fed to the ViT (0: no ViT copies)
    )

    c.data = dict(
        data_dir="",  # where the episodes are written; "" = <workdir>/data
        seed=1,  # episode generation seed (train and eval splits derive their own)
        num_train=3000,  # training episodes generated
        num_eval=96,  # held-out episodes for the eval loss
        # Episode kinds and their weights: single_pass, additive, edit, critique. Single-pass
        # episodes let one model also serve as its own single-pass baseline.
        mix=dict(single_pass=0.2, additive=0.8),
        seq_len=512,  # tokens per packed row
        batch_size=8,  # global rows per step (split over data x fsdp devices)
        max_skip_fraction=0.01,  # stop when more than this share of records is bad
        shuffle_buffer_seed=0,  # record order seed
        # More ArrayRecord episode files mixed in, [{'path': ..., 'weight': ...}] (phase 2).
        extra_sources=(),
        main_weight=1.0,  # weight of the main split against extra_sources
        # BAGEL's condition dropout (prompt / clean image copy / ViT copy) that CFG needs.
        cfg_dropout=dict(text=0.0, vae=0.0, vit=0.0),
        vit_copies=False,  # also pack every image as ViT patches (needs model.vision)
        # 'records': each process reads its own shard; 'rows': every process runs the whole
        # pipeline and keeps its rows (identical global batches for any process count).
        process_split="records",
    )

    c.model = dict(
        width=128, depth=4, heads=4, kv_heads=4, head_dim=32, mlp=512,  # decoder size
        rope_theta=10000.0,
        qk_norm=True,  # RMSNorm on queries and keys (BAGEL)
        qkv_bias=True,  # Qwen2's q/k/v biases
        norm_eps=1e-6,
        dtype="float32",  # compute dtype; parameters stay float32
        scan_layers=False,  # one compiled layer for all (big models)
        remat="none",  # none | full | dots_no_batch: what the backward pass recomputes
        attention="xla",  # xla | cudnn
        time_scale=1.0,  # t fed to the timestep embedder is t * time_scale (BAGEL: 1.0)
        time_adaln=False,  # DiT-style adaLN on the generation expert (not BAGEL)
        # 'x': the head predicts x_0 and returns the velocity from it; 'v': BAGEL's velocity
        # head. Pixel-patch latents at width 128 learn with 'x' (docs/design.md).
        prediction="x",
        x_min_t=0.05,  # 'x' prediction: t floor when turning x_0 into a velocity
        # Noisy tokens also get the previous image's patch and the head predicts the change
        # from it (not BAGEL; needs prediction='x'; docs/design.md).
        canvas_skip=True,
        # Set by configs with real tokenizers and latents; the shapes world derives them.
        vocab_size=0, patch_dim=0, latent_grid=(0, 0),
        vision=None,  # the SigLIP ViT block (VisionConfig keys) for ViT copies
    )

    c.vae = None  # the FLUX autoencoder block (AEConfig keys); shapes: identity patchify

    c.flow = dict(
        train_shift=3.0,  # timestep shift in training (more steps at high noise)
        sample_shift=3.0,  # the same for sampling
        sample_steps=20,  # Euler steps per image
    )

    c.losses = dict(
        ce_weight=0.25, mse_weight=1.0,  # BAGEL's CE : MSE
        # Per-stage loss weights; the prompt is context only.
        stage_weights=dict(prompt=0.0, plan=1.0, sketch=1.0, inspect=1.0, refine=1.0),
    )

    c.optim = dict(
        lr=1e-3,  # peak learning rate
        warmup_steps=40,  # linear warm-up
        total_steps=None,  # cosine decay length; None: train.steps
        end_lr_factor=0.05,  # final LR as a fraction of the peak
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,  # AdamW
        clip_norm=1.0,  # global gradient-norm clip
        ema_decay=0.0,  # > 0 keeps an EMA of the weights, used for generation
    )

    c.train = dict(
        steps=1000,  # training steps
        log_every=50,  # print and write scalars
        eval_every=400,  # eval loss (and eval hooks, e.g. TensorBoard filmstrips); 0: never
        checkpoint_every=400,  # Orbax save interval
        keep_checkpoints=2,  # newest checkpoints kept
        accum_steps=1,  # gradient accumulation: micro-batches per step
        init_from="",  # a workdir whose newest params start this run (phase 2)
        shard_tolerance=0.25,  # fail if a device holds > (1 + tol) x its share of params
        # (gen, und) capacity fractions of each batch's tokens for sparse MoT routing
        # (single-device only); () routes densely. A batch that does not fit runs dense, so
        # this decides speed, not results.
        sparse_routing=(0.6875, 0.3125),
        tb_images=2,  # prompts painted as TensorBoard filmstrips at every eval; 0: off
    )

    c.mesh = dict(shape=(-1, 1, 1))  # (data, fsdp, tensor); -1 takes the remaining devices
    c.rules = SHARDING_RULES  # logical axis -> mesh axis; override entries per run

    c.eval = dict(
        seed=1234,  # benchmark prompts and sampling noise
        prompts_per_tag=6,  # Shapes-GenEval prompts per category (six categories)
        images_per_prompt=1,
        max_iterations=5,  # cap on plan/sketch/inspect iterations per episode
        max_text_tokens=48,  # cap per text segment
        batch_size=36,  # episodes generated together
        filmstrips=12,  # filmstrips in the report
        iteration_caps=(),  # e.g. (1, 2, 3): also score the process mode under these caps
        kv_cache=True,  # cached interleaved decoding (same outputs as uncached)
        cfg_text_scale=1.0,  # text CFG scale (BAGEL T2I: 4.0); 1: off
        cfg_img_scale=1.0,  # image CFG scale (the context without images); 1: off
        cfg_interval=(0.4, 1.0),  # t range where CFG applies
        cfg_renorm="global",  # global | none: rescale the guided velocity to the conditional norm
    )

    # `self-critique`: the trained model's own traces, inspected by the exact checker.
    c.self_critique = dict(
        seed=77,  # training prompts sampled
        num_prompts=240,
        text_temperature=0.0,  # > 0 samples the traces' text instead of greedy decoding
    )

    # `reproduce`: the ablation ladder (configs/shapes_repro.py sets the rows' mixes).
    c.reproduce = dict(
        mixes={},  # row -> training mix
        phase2_fraction=0.3,  # of the self_critique row's steps, spent on the mixture
        self_critique_weight=0.5,  # of the self-critique split against the phase-1 data
        curve_points=4,  # single-pass row scored at this many evenly spaced checkpoints
        single_pass_multiples=(),  # extra single-pass runs at these multiples of the steps
        # The rows to run; finished rows in the workdir are resumed, not retrained.
        rows=("single_pass", "additive", "edits", "symbolic_critique", "self_critique"),
        sparse_routing={},  # row -> (gen, und) capacities, replacing train.sparse_routing
    )

    # `bench`: synthetic batches shaped like shapes episodes.
    c.bench = dict(steps=10, warmup=2, vocab_size=70, patch_dim=108, latent_grid=(6, 6),
                   text_len=24)
    c.lock()
    return c


def parse_arg(arg: str | None, **spec):
    """A config file's variant string -> a ConfigDict of its options, as in big_vision:
    `parse_arg("test,steps=20", test=False, steps=0)` -> test=True, steps=20. A bare word
    sets a boolean option; values are Python literals (strings may go unquoted). Unknown
    options fail, naming the option and the ones the file takes."""
    out = ml_collections.ConfigDict(spec)
    for part in filter(None, (arg or "").split(",")):
        key, eq, value = part.partition("=")
        key = key.strip()
        if key not in spec:
            raise ConfigKeyError(f"config variant {key!r}: unknown (this config takes: "
                                 f"{', '.join(sorted(spec)) or 'no variants'})")
        if not eq:
            if not isinstance(spec[key], bool):
                raise ConfigKeyError(f"config variant {key!r} needs a value ({key}=...)")
            out[key] = True
            continue
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        out[key] = type(spec[key])(parsed) if spec[key] is not None else parsed
    return out


def _unknown(config, ref, prefix: str):
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in ref:
            hint = difflib.get_close_matches(key, list(ref.keys()), n=1)
            yield path + (f" (did you mean {prefix}{hint[0]}?)" if hint else "")
            continue
        if path in OPEN:
            continue
        sub, sub_ref = config[key], ref[key]
        if isinstance(sub_ref, ml_collections.ConfigDict):
            if not isinstance(sub, (ml_collections.ConfigDict, dict)):
                continue  # a type error, not an unknown key; the consumer names it
            if isinstance(sub, dict):
                sub = ml_collections.ConfigDict(sub)
            yield from _unknown(sub, sub_ref, path + ".")


def _whole(lo):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo,
            f"a whole number >= {lo}")


def _number(lo, hi=None, open_lo=False):
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        return (v > lo if open_lo else v >= lo) and (hi is None or v <= hi)
    return ok, f"a number {'>' if open_lo else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")


# Values that would otherwise fail late (inside Grain, Orbax or the jitted step) or silently
# do the wrong thing (no checkpoints kept, zero steps trained).
VALUE_RULES = {
    "train.steps": _whole(0), "train.log_every": _whole(1), "train.eval_every": _whole(0),
    "train.checkpoint_every": _whole(1), "train.keep_checkpoints": _whole(1),
    "train.accum_steps": _whole(1), "train.tb_images": _whole(0),
    "data.batch_size": _whole(1), "data.seq_len": _whole(1), "data.num_train": _whole(1),
    "data.num_eval": _whole(1), "data.max_skip_fraction": _number(0, 1),
    "optim.lr": _number(0, open_lo=True), "optim.warmup_steps": _whole(0),
    "flow.sample_steps": _whole(1), "eval.batch_size": _whole(1),
    "eval.images_per_prompt": _whole(1), "eval.prompts_per_tag": _whole(0),
    "eval.max_iterations": _whole(1), "eval.max_text_tokens": _whole(1),
    "self_critique.num_prompts": _whole(1),
}


def _get(config, path: str):
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def check(config):
    """Raise ConfigKeyError naming every key the schema does not know, or the first value out
    of its range; returns `config`."""
    bad = list(_unknown(config, defaults(), ""))
    if bad:
        raise ConfigKeyError(f"unknown config key{'s' if len(bad) > 1 else ''}: {'; '.join(bad)}")
    for path, (ok, want) in VALUE_RULES.items():
        value = _get(config, path)
        if not ok(value):
            raise ConfigKeyError(f"config key {path}: {value!r} is not {want}")
    total = config.optim.total_steps
    if total is not None and not _whole(1)[0](total):
        raise ConfigKeyError(f"config key optim.total_steps: {total!r} is not None or a whole "
                             f"number >= 1")
    return config
