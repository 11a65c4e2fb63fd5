"""`train-ae`: a small FLUX-architecture autoencoder (model/vae.py) trained on the shapes
world's pictures, so the unified model can draw through latents as BAGEL does.

Data: every image of shapes episodes of all kinds (`episodes.mixer`: partial canvases,
edits, critiques' wrong drawings, so every colour, shape and cell), resized to
world.image_size by `worlds.pictures.to_picture` and scaled to [-1, 1] (x / 127.5 - 1, as
BAGEL's VAE transform). The held-out pictures come from another seed.

Loss: reconstruction MSE through encoder -> decoder. With `kl_weight` = 0 the decoder reads
the posterior mean, the latent that `AutoEncoder.encode` gives every later user, so the few
steps a CPU can afford are all spent on the reconstruction those users see; with
`kl_weight` > 0 it reads a posterior sample and the KL term is added, FLUX's training
objective (the weight in FLUX/SD's convention: KL summed over a latent and reconstruction
summed over its pixels; here both divided by the pixel count, so the loss reads as MSE).
Either way the latents are standardised afterwards: scale_factor = 1 / std and
shift_factor = mean of the posterior means over the training pictures (as FLUX and SD3 fit
theirs), because the flow model downstream assumes unit-scale latents.

The workdir gets `params/` (Orbax), `ae_config.json` (the AEConfig with the fitted
scale/shift) and, last, `ae_report.json`; a workdir whose report was made with the same
settings is reused as it is.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from strokes_jax import files
from strokes_jax.configs.schema import ConfigKeyError
from strokes_jax.model.vae import AEConfig, AutoEncoder

CONFIG_JSON = "ae_config.json"
REPORT_JSON = "ae_report.json"
PARAMS = "params"
ALL_KINDS = {"single_pass": 1.0, "additive": 1.0, "edit": 1.0, "critique": 1.0}
FITTED = ("scale_factor", "shift_factor")  # set by training, not by the config


@dataclasses.dataclass(frozen=True)
class AETrainConfig:
    steps: int = 1000  # optimizer steps (tuned: >= 99% checker pass in ~9 min on 2 CPU cores)
    batch_size: int = 8  # pictures per step (8 beat 16 per picture seen)
    lr: float = 3e-3  # peak learning rate (4e-3 trained worse) (linear warm-up, then cosine decay)
    seed: int = 0  # parameter init, batch order, posterior noise; pictures from seed + 1
    num_scenes: int = 2000  # training pictures
    num_eval: int = 256  # held-out pictures (episodes of another seed)
    kl_weight: float = 0.0  # 0: deterministic on the posterior mean; > 0: sample + KL
    warmup_steps: int = 20
    end_lr_factor: float = 0.05  # final learning rate as a fraction of `lr`
    weight_decay: float = 0.0  # AdamW
    clip_norm: float = 1.0  # global gradient-norm clip; 0: none
    stats_images: int = 1024  # training pictures the latent scale/shift are fitted on
    eval_batch: int = 64  # pictures per encode/decode call outside training
    curve_points: int = 10  # points of the train-loss curve in the report

    @classmethod
    def from_config(cls, config) -> "AETrainConfig":
        """config.ae_train (absent, None or a partial dict: the rest are defaults)."""
        block = _section(config, "ae_train") or {}
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(block) - set(names))
        if unknown:
            raise ConfigKeyError(f"config key ae_train.{unknown[0]}: unknown (known: {', '.join(names)})")
        out = cls(**{k: _cast(f"ae_train.{k}", v, type(getattr(cls, k))) for k, v in block.items()})
        out.check()
        return out

    def check(self) -> None:
        whole_min = dict(steps=0, batch_size=1, num_scenes=1, num_eval=1, warmup_steps=0,
                         stats_images=1, eval_batch=1, curve_points=1)
        for k, lo in whole_min.items():
            if getattr(self, k) < lo:
                raise ConfigKeyError(f"config key ae_train.{k}: {getattr(self, k)!r} is not a whole number >= {lo}")
        if not self.lr > 0:
            raise ConfigKeyError(f"config key ae_train.lr: {self.lr!r} is not a number > 0")
        for k in ("kl_weight", "weight_decay", "clip_norm", "end_lr_factor"):
            if getattr(self, k) < 0:
                raise ConfigKeyError(f"config key ae_train.{k}: {getattr(self, k)!r} is not a number >= 0")


def _section(config, key: str):
    try:
        block = config[key]
    except (KeyError, AttributeError):
        return None
    return None if block is None else dict(block)


def _cast(key: str, value, typ):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigKeyError(f"config key {key}: {value!r} is not a number")
    if typ is int and value != int(value):
        raise ConfigKeyError(f"config key {key}: {value!r} is not a whole number")
    return typ(value)


def ae_config(config) -> AEConfig:
    """config.vae (AEConfig keys) as an AEConfig; errors name the key."""
    block = _section(config, "vae")
    if not block:
        raise ConfigKeyError("config key vae: train-ae needs the autoencoder block (AEConfig keys)")
    names = {f.name for f in dataclasses.fields(AEConfig)}
    unknown = sorted(set(block) - names)
    if unknown:
        raise ConfigKeyError(f"config key vae.{unknown[0]}: unknown (known: {', '.join(sorted(names))})")
    if "ch_mult" in block:
        block["ch_mult"] = tuple(int(m) for m in block["ch_mult"])
    cfg = AEConfig(**block)
    widths = {cfg.ch * m for m in cfg.ch_mult}
    if any(w % cfg.groups for w in widths):
        raise ConfigKeyError(f"config key vae.groups: {cfg.groups} does not divide every width "
                         f"{sorted(widths)} (vae.ch x vae.ch_mult)")
    return cfg


def image_size(config, cfg: AEConfig) -> int:
    size = int(config.world["image_size"])
    # Latents are grouped 2x2 into tokens downstream (BAGEL's latent_patch_size).
    if size % (2 * cfg.downsample):
        raise ConfigKeyError(f"config key world.image_size: {size} is not a multiple of "
                         f"{2 * cfg.downsample} (AE downsample {cfg.downsample} x 2x2 tokens)")
    return size


# -- data -------------------------------------------------------------------------------


def pictures(seed: int, num: int, size: int) -> np.ndarray:
    """uint8 [num, size, size, 3]: every image of the seed's episodes (all kinds), in stream
    order, until `num` are gathered."""
    from strokes_jax.episodes import mixer
    from strokes_jax.worlds import pictures as pics

    out = []
    for e in mixer.generate_episodes(seed, 10 ** 9, ALL_KINDS):
        out += [pics.to_picture(img, size) for img in e.images()]
        if len(out) >= num:
            return np.stack(out[:num])
    raise AssertionError("unreachable: the episode stream is unbounded")


def to_unit(imgs):
    """uint8 -> float32 in [-1, 1] (BAGEL's VAE transform)."""
    return imgs.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x) -> np.ndarray:
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Indices of each step's batch: epochs of fresh permutations, so every picture is seen
    once per epoch."""
    rng = np.random.default_rng(seed)
    order = np.empty(0, np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:batch_size]
        order = order[batch_size:]


# -- training ---------------------------------------------------------------------------


def _optimizer(t: AETrainConfig):
    import optax
    sched = optax.warmup_cosine_decay_schedule(
        0.0, t.lr, t.warmup_steps, max(t.steps, t.warmup_steps + 1), t.lr * t.end_lr_factor)
    opt = optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=t.weight_decay)
    return optax.chain(optax.clip_by_global_norm(t.clip_norm), opt) if t.clip_norm else opt


def loss_fn(model: AutoEncoder, params, x, key, kl_weight: float):
    """(loss, (mse, kl)). x in [-1, 1]. The raw decoder/encoder (no scale/shift): that
    affine map is fitted after training and cancels in encode -> decode."""
    moments = model.apply({"params": params}, x, method=lambda m, v: m.encoder(v))
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    if kl_weight > 0:
        logvar = jnp.clip(logvar, -30.0, 20.0)  # FLUX's DiagonalGaussian clamp
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        kl = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)).mean()
    else:
        z, kl = mean, jnp.zeros(())
    recon = model.apply({"params": params}, z, method=lambda m, v: m.decoder(v))
    mse = jnp.mean((recon.astype(jnp.float32) - x) ** 2)
    return mse + kl_weight * kl / x[0].size, (mse, kl)


def make_step(model: AutoEncoder, opt, kl_weight: float):
    import optax

    @jax.jit
    def step(params, opt_state, imgs, key):
        grad_fn = jax.value_and_grad(lambda p: loss_fn(model, p, to_unit(imgs), key, kl_weight),
                                     has_aux=True)
        (loss, (mse, kl)), grads = grad_fn(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, dict(loss=loss, mse=mse, kl=kl)

    return step


def _raw_means(model: AutoEncoder, params, imgs: np.ndarray, batch: int) -> np.ndarray:
    fn = jax.jit(lambda p, x: model.apply({"params": p}, to_unit(x),
                                          method=lambda m, v: m.encoder(v))[..., :model.cfg.z_channels])
    return np.concatenate([np.asarray(fn(params, imgs[i:i + batch]), np.float32)
                           for i in range(0, len(imgs), batch)])


def fit_scale_shift(cfg: AEConfig, means: np.ndarray) -> AEConfig:
    """scale = 1 / std, shift = mean of the raw posterior means (over every value), so that
    `encode` gives zero-mean, unit-variance latents on the training pictures."""
    m = np.asarray(means, np.float64)
    std = float(m.std())
    if not np.isfinite(std) or std <= 0:
        raise FloatingPointError(f"posterior means have std {std}: the AE did not train")
    return dataclasses.replace(cfg, scale_factor=1.0 / std, shift_factor=float(m.mean()))


def reconstruct(cfg: AEConfig, params, imgs: np.ndarray, batch: int) -> np.ndarray:
    """uint8 pictures -> uint8 reconstructions through `encode` -> `decode` (the fitted
    scale/shift, as every later user reads the AE)."""
    model = AutoEncoder(cfg)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, to_unit(x)))
    return np.concatenate([to_uint8(fn(params, imgs[i:i + batch]))
                           for i in range(0, len(imgs), batch)])


def same_scene(a, b) -> bool:
    """The checker reads the same objects (order aside: it sorts by detection score, which
    a faithful reconstruction may shift between equally placed objects)."""
    if a is None or b is None:
        return a is b
    return sorted(a) == sorted(b)


def checker_agreement(originals: np.ndarray, recons: np.ndarray, unseen: np.ndarray) -> dict:
    """The exact checker on each reconstruction against its original, at the canvas.
    `unseen` marks the held-out pictures that are not also training pictures: the world
    repeats small scenes (one object, the first step of an episode), so a held-out seed
    alone does not make every picture new."""
    from strokes_jax.worlds import checker, detect
    from strokes_jax.worlds import pictures as pics

    ok, pixels, fails = [], 0.0, []
    for i, (o, r) in enumerate(zip(originals, recons)):
        co, cr = pics.to_canvas(o), pics.to_canvas(r)
        so, sr = checker.drawn_scene(co), checker.drawn_scene(cr)
        ok.append(same_scene(so, sr))
        pixels += float((detect.quantize(co) == detect.quantize(cr)).mean())
        if not ok[-1] and len(fails) < 8:
            fails.append(dict(index=i, original=_scene_text(so), reconstruction=_scene_text(sr)))
    ok, unseen, n = np.array(ok, bool), np.asarray(unseen, bool), len(originals)
    return dict(checker_pass_rate=float(ok.mean()), checker_passed=int(ok.sum()), checker_total=n,
                checker_pass_rate_unseen=float(ok[unseen].mean()) if unseen.any() else None,
                checker_unseen_total=int(unseen.sum()),
                canvas_palette_agreement=pixels / n, checker_failures=fails)


def unseen_mask(eval_imgs: np.ndarray, train_imgs: np.ndarray) -> np.ndarray:
    seen = {x.tobytes() for x in train_imgs}
    return np.array([x.tobytes() not in seen for x in eval_imgs], bool)


def _scene_text(scene):
    if scene is None:
        return None
    return [f"{o.color} {o.shape} r{o.row} c{o.col}" for o in sorted(scene)]


def _curve(losses: Sequence[float], points: int) -> list[dict]:
    """Mean loss over `points` equal windows of the run, each named by its last step."""
    if not losses:
        return []
    edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).astype(int)
    return [dict(step=int(hi), loss=float(np.mean(losses[lo:hi])))
            for lo, hi in zip(edges[:-1], edges[1:])]


def _settings(cfg: AEConfig, t: AETrainConfig, size: int) -> dict:
    """What decides the trained AE: a finished workdir with these settings is reused."""
    vae = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in FITTED}
    vae["ch_mult"] = list(vae["ch_mult"])
    return dict(vae=vae, ae_train=dataclasses.asdict(t), image_size=size)


def train_ae(config, workdir: str, progress: bool = True) -> dict:
    """Trains (or reuses) the AE of config.vae / config.ae_train in `workdir`; the report."""
    cfg, t = ae_config(config), AETrainConfig.from_config(config)
    size = image_size(config, cfg)
    settings = _settings(cfg, t, size)
    report_path = os.path.join(workdir, REPORT_JSON)
    old = files.read_json(report_path)
    if old is not None and old.get("settings") == settings and _complete(workdir):
        return old
    if old is not None:
        print(f"{workdir}: the autoencoder there was trained with other settings; retraining",
              flush=True)
        os.remove(report_path)  # the report marks a finished AE: gone until this one is
    t0 = time.time()
    train_imgs = pictures(t.seed + 1, t.num_scenes, size)
    eval_imgs = pictures(t.seed + 2, t.num_eval, size)
    data_s = time.time() - t0

    params, losses, train_s = _train(cfg, t, train_imgs, progress)
    model = AutoEncoder(cfg)
    cfg = fit_scale_shift(cfg, _raw_means(model, params, train_imgs[:t.stats_images], t.eval_batch))
    recons = reconstruct(cfg, params, eval_imgs, t.eval_batch)
    err = (recons.astype(np.float64) - eval_imgs.astype(np.float64)) ** 2
    from strokes_jax import provenance
    report = dict(
        settings=settings, steps=t.steps, images_seen=t.steps * t.batch_size,
        data_seconds=data_s, train_seconds=train_s,
        device=provenance.device_info(), commit=provenance.git_commit(),
        num_params=int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))),
        train_loss_curve=_curve(losses, t.curve_points),
        final_train_loss=float(np.mean(losses[-max(1, len(losses) // t.curve_points):])) if losses else None,
        eval_mse=float(err.mean() / 127.5 ** 2),  # in [-1, 1] units, as the loss
        eval_mse_uint8=float(err.mean()),
        latent_scale_factor=cfg.scale_factor, latent_shift_factor=cfg.shift_factor,
        **checker_agreement(eval_imgs, recons, unseen_mask(eval_imgs, train_imgs)))
    save(workdir, cfg, params)
    report["wall_seconds"] = time.time() - t0  # data, training, statistics, evaluation, saving
    files.write_json(report_path, report)
    return report


def _train(cfg: AEConfig, t: AETrainConfig, imgs: np.ndarray, progress: bool):
    from tqdm import tqdm

    model = AutoEncoder(cfg)
    key = jax.random.PRNGKey(t.seed)
    init_key, key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1,) + imgs.shape[1:], jnp.float32))["params"]
    opt = _optimizer(t)
    opt_state = opt.init(params)
    step = make_step(model, opt, t.kl_weight)
    order = batches(len(imgs), t.batch_size, t.seed)
    losses, t0 = [], time.time()
    with tqdm(total=t.steps, desc="train-ae", unit="step", disable=not progress) as bar:
        for _ in range(t.steps):
            key, sub = jax.random.split(key)
            params, opt_state, m = step(params, opt_state, jnp.asarray(imgs[next(order)]), sub)
            losses.append(float(m["loss"]))
            if not np.isfinite(losses[-1]):
                raise FloatingPointError(f"train-ae: loss {losses[-1]} at step {len(losses)} "
                                         f"(lower ae_train.lr)")
            bar.set_postfix(mse=f"{float(m['mse']):.5f}", refresh=False)
            bar.update()
    return jax.device_get(params), losses, time.time() - t0


# -- files ------------------------------------------------------------------------------


def save(workdir: str, cfg: AEConfig, params) -> None:
    """params/ (Orbax, replacing an older one) and ae_config.json."""
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(workdir), PARAMS)
    if os.path.exists(path):
        shutil.rmtree(path)
    files.makedirs(workdir)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, jax.tree_util.tree_map(np.asarray, params))
    ckpt.wait_until_finished()
    d = dataclasses.asdict(cfg)
    d["ch_mult"] = list(d["ch_mult"])
    files.write_json(os.path.join(workdir, CONFIG_JSON), d)


def _complete(workdir: str) -> bool:
    return (os.path.isfile(os.path.join(workdir, CONFIG_JSON))
            and os.path.isdir(os.path.join(workdir, PARAMS)))


def load_ae(path: str) -> tuple[AEConfig, dict]:
    """A train-ae folder -> (AEConfig with the fitted scale/shift, params as numpy arrays),
    for AutoEncoder(cfg).apply({'params': params}, x, method=AutoEncoder.encode)."""
    import orbax.checkpoint as ocp

    if not _complete(path):
        raise FileNotFoundError(f"{path}: no trained autoencoder ({CONFIG_JSON} and {PARAMS}/; "
                                f"run `python -m strokes_jax train-ae --workdir {path}`)")
    d = files.read_json(os.path.join(path, CONFIG_JSON))
    d["ch_mult"] = tuple(d["ch_mult"])
    params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), PARAMS))
    return AEConfig(**d), params


# -- reporting --------------------------------------------------------------------------


def summary(report: Mapping) -> str:
    return (f"checker pass rate {report['checker_pass_rate']:.4f} "
            f"({report['checker_passed']}/{report['checker_total']} held-out pictures; "
            f"{_rate(report['checker_pass_rate_unseen'])} on the {report['checker_unseen_total']} "
            f"not among the training pictures), "
            f"eval MSE {report['eval_mse']:.5f} ([-1, 1]) = {report['eval_mse_uint8']:.1f} (uint8^2), "
            f"{report['steps']} steps, {report['wall_seconds']:.0f} s")


def _rate(r) -> str:
    return "n/a" if r is None else f"{r:.4f}"
