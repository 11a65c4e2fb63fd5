"""The shapes world as 96x96 pictures (worlds/pictures.py, read by the detector at the
canvas size) and the autoencoder trained on them (train/autoencoder.py): its files, its
reload, its reuse, and (slow) the checker pass rate of the tuned AE."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from strokes_jax import configs
from strokes_jax.episodes import mixer
from strokes_jax.model.vae import AEConfig, AutoEncoder
from strokes_jax.train import autoencoder as ae
from strokes_jax.worlds import checker, detect, pictures, prompts, shapes


def _scene_images(n_episodes: int = 150):
    """(image, scene or None) of every image of episodes of all kinds, plus rendered
    scenes of every tag (their scene known)."""
    out = [(img, None) for e in mixer.generate_episodes(3, n_episodes, ae.ALL_KINDS)
           for img in e.images()]
    rng = np.random.default_rng(0)
    for i in range(120):
        scene = prompts.sample_scene(rng, prompts.sample_prompt(rng, shapes.TAGS[i % len(shapes.TAGS)]))
        out.append((shapes.render(scene), scene))
    return out


def test_pictures_read_as_their_canvas():
    items = _scene_images()
    assert len(items) >= 300
    for img, scene in items:
        pic = pictures.to_picture(img)
        assert pic.shape == (96, 96, 3) and pic.dtype == np.uint8
        drawn = checker.drawn_scene(img)
        assert checker.drawn_scene(pic) == drawn
        if scene is not None:
            assert sorted(drawn) == sorted(scene)
        assert pictures.to_canvas(pic).shape == (shapes.CANVAS, shapes.CANVAS, 3)
    canvas = items[0][0]
    assert pictures.to_canvas(canvas) is canvas  # the checker's own images pass untouched


def test_detector_reads_pictures_at_canvas_coordinates():
    obj = shapes.Obj("triangle", "pink", 2, 1)
    img = shapes.render((obj,))
    want = detect.detect(img)
    assert [(d.cls, d.color, d.box) for d in want] == [("triangle", "pink", obj.box)]
    assert detect.detect(pictures.to_picture(img)) == want
    assert detect.detect(pictures.to_picture(img, 64)) == want
    with pytest.raises(ValueError, match="uint8"):
        pictures.to_picture(img.astype(np.float32))


def test_train_config_block_may_be_missing_or_partial():
    assert ae.AETrainConfig.from_config({}) == ae.AETrainConfig()
    assert ae.AETrainConfig.from_config({"ae_train": None}) == ae.AETrainConfig()
    t = ae.AETrainConfig.from_config({"ae_train": {"steps": 7, "lr": 1}})
    assert (t.steps, t.lr, t.batch_size) == (7, 1.0, ae.AETrainConfig().batch_size)
    with pytest.raises(ValueError, match="ae_train.stepz"):
        ae.AETrainConfig.from_config({"ae_train": {"stepz": 7}})
    with pytest.raises(ValueError, match="ae_train.batch_size"):
        ae.AETrainConfig.from_config({"ae_train": {"batch_size": 0}})
    with pytest.raises(ValueError, match="ae_train.steps"):
        ae.AETrainConfig.from_config({"ae_train": {"steps": 2.5}})


def test_ae_block_errors_name_the_key():
    with pytest.raises(ValueError, match="config key vae"):
        ae.ae_config({"vae": None})
    with pytest.raises(ValueError, match="vae.width"):
        ae.ae_config({"vae": {"width": 3}})
    with pytest.raises(ValueError, match="vae.groups"):
        ae.ae_config({"vae": {"ch": 12, "ch_mult": (1, 2), "groups": 8}})
    cfg = ae.ae_config({"vae": {"ch": 8, "ch_mult": [1, 2], "groups": 4}})
    assert cfg.ch_mult == (1, 2) and cfg.downsample == 2


def test_scale_shift_standardise_the_latents():
    means = np.random.default_rng(0).normal(3.0, 0.25, size=(4, 12, 12, 4))
    cfg = ae.fit_scale_shift(AEConfig(), means)
    z = cfg.scale_factor * (means - cfg.shift_factor)
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1) < 1e-9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The unit-test AE of `shapes_tiny:images,test`, trained a few steps; the params it
    saved are captured as they were handed to `save`."""
    config = configs.load("shapes_tiny:images,test")
    config.ae_train.update(steps=3, batch_size=2, num_scenes=8, num_eval=6)
    workdir = str(tmp_path_factory.mktemp("ae"))
    saved = {}
    real_save = ae.save

    def capture(wd, cfg, params):
        saved.update(cfg=cfg, params=params)
        real_save(wd, cfg, params)

    ae.save = capture
    try:
        report = ae.train_ae(config, workdir, progress=False)
    finally:
        ae.save = real_save
    return config, workdir, report, saved


def test_tiny_ae_writes_its_files_and_a_sane_report(tiny):
    config, workdir, report, saved = tiny
    assert {ae.CONFIG_JSON, ae.REPORT_JSON, ae.PARAMS} <= set(os.listdir(workdir))
    assert report == json.load(open(os.path.join(workdir, ae.REPORT_JSON)))
    assert report["steps"] == 3 and report["images_seen"] == 6
    assert report["checker_total"] == 6 and 0 <= report["checker_pass_rate"] <= 1
    assert report["checker_passed"] == round(report["checker_pass_rate"] * 6)
    assert 0 <= report["checker_unseen_total"] <= 6
    assert 0 <= report["canvas_palette_agreement"] <= 1
    assert 0 < report["eval_mse"] <= 4 and report["eval_mse_uint8"] == pytest.approx(
        report["eval_mse"] * 127.5 ** 2)
    assert 1 <= len(report["train_loss_curve"]) <= 3
    assert all(np.isfinite(p["loss"]) for p in report["train_loss_curve"])
    assert report["wall_seconds"] >= report["train_seconds"] > 0
    assert report["device"]["platform"] == jax.devices()[0].platform
    assert report["settings"]["image_size"] == 96


def test_load_ae_restores_what_was_trained(tiny):
    config, workdir, report, saved = tiny
    cfg, params = ae.load_ae(workdir)
    assert cfg == saved["cfg"] and cfg.scale_factor == report["latent_scale_factor"]
    assert (cfg.ch, cfg.z_channels) == (config.vae.ch, config.vae.z_channels)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(saved["params"])
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(saved["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The restored tree is what later users apply: encode gives 12x12x4 latents.
    pics = ae.pictures(5, 2, 96)
    z = AutoEncoder(cfg).apply({"params": params}, ae.to_unit(pics), method=AutoEncoder.encode)
    assert z.shape == (2, 12, 12, cfg.z_channels)


def test_finished_ae_is_reused_and_other_settings_retrain(tiny, monkeypatch):
    config, workdir, report, _ = tiny

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(ae, "_train", no_training)
    assert ae.train_ae(config, workdir, progress=False) == report
    # The command reuses it too (another process: the report's mtime says nothing retrained).
    mtime = os.path.getmtime(os.path.join(workdir, ae.REPORT_JSON))
    r = _train_ae_command("--config", "shapes_tiny:images,test", f"--config.world.ae_path={workdir}",
                          f"--workdir={os.path.dirname(workdir)}", "--config.ae_train.steps=3",
                          "--config.ae_train.batch_size=2", "--config.ae_train.num_scenes=8",
                          "--config.ae_train.num_eval=6")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checker pass rate" in r.stdout
    assert os.path.getmtime(os.path.join(workdir, ae.REPORT_JSON)) == mtime

    changed = configs.load("shapes_tiny:images,test")
    changed.ae_train.update(steps=4, batch_size=2, num_scenes=8, num_eval=6)
    with pytest.raises(AssertionError, match="trained again"):
        ae.train_ae(changed, workdir, progress=False)
    # The old report is gone until a new AE finishes: a crash leaves no finished-looking AE.
    assert not os.path.exists(os.path.join(workdir, ae.REPORT_JSON))


def test_load_ae_names_a_missing_ae(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-ae"):
        ae.load_ae(str(tmp_path))


def _train_ae_command(*args):
    return subprocess.run([sys.executable, "-m", "strokes_jax", "train-ae", *args],
                          capture_output=True, text=True)


def test_cli_errors_name_the_config_key(tmp_path):
    r = _train_ae_command("--config", "shapes_tiny", f"--workdir={tmp_path}")
    assert r.returncode == 2
    assert "config key vae" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# The tuned AE (the `vae` / `ae_train` values reported for shapes_tiny:images).
TUNED_VAE = dict(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=4, groups=8)
TUNED_TRAIN = dict(steps=1000, batch_size=8, lr=3e-3, num_scenes=2000, num_eval=256)


@pytest.mark.slow
def test_tuned_ae_passes_the_checker(tmp_path):
    """About 10 minutes on 2 CPU cores."""
    config = configs.load("shapes_tiny:images")
    config.vae.update(TUNED_VAE)
    config.ae_train.update(TUNED_TRAIN)
    report = ae.train_ae(config, str(tmp_path), progress=False)
    assert report["checker_total"] >= 200
    assert report["checker_pass_rate"] >= 0.99, report["checker_failures"]
    cfg, params = ae.load_ae(str(tmp_path))
    z = AutoEncoder(cfg).apply({"params": params}, ae.to_unit(ae.pictures(9, 64, 96)),
                               method=AutoEncoder.encode)
    assert abs(float(z.mean())) < 0.3 and 0.7 < float(z.std()) < 1.3  # unit-scale latents
    assert dataclasses.replace(cfg, scale_factor=0, shift_factor=0) == dataclasses.replace(
        ae.ae_config(config), scale_factor=0, shift_factor=0)
