"""The BAGEL world in every command: a synthetic checkpoint with BAGEL's key names at the
`bagel7b_process:test` sizes (and a Qwen2-style tokenizer.json) converts; `train` starts from
it on 8 forced CPU devices with an fsdp mesh, reading the shapes world's pictures through the
Qwen2 tokenizer, FLUX latents from the converted AE and ViT copies; `evaluate` and `generate`
paint through the AE decoder."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_dtypes  # noqa: F401  (bfloat16 numpy arrays for the source files)
import numpy as np
import pytest
from PIL import Image
from safetensors import numpy as safetensors_numpy

from strokes_jax.configs import bagel7b_process
from strokes_jax.convert import bagel, keymap
from strokes_jax.convert.cli import configs_of
from strokes_jax.model.unified import UnifiedModel
from strokes_jax.model.vae import AutoEncoder
from strokes_jax.sequence import qwen
from strokes_jax.train import state as st

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = f"{bagel7b_process.__file__}:test"


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("bagel")
    cfg, ae_cfg = configs_of(bagel7b_process.get_config("test"))
    params = jax.tree_util.tree_map(np.asarray, nn.unbox(UnifiedModel(cfg).init(
        jax.random.PRNGKey(3), **st.dummy_inputs(1, 8, cfg.patch_dim, cfg.vision))["params"]))
    vae = jax.tree_util.tree_map(np.asarray, AutoEncoder(ae_cfg).init(
        jax.random.PRNGKey(4), np.zeros((1, 8, 8, 3), np.float32))["params"])
    ema = keymap.export(params, bagel.model_rules(cfg)[0], bagel.decoder_stacking(cfg))
    for t in bagel.fixed_tables(cfg):
        ema[t.src] = t.value
    src = d / "src"
    src.mkdir()
    safetensors_numpy.save_file(ema, str(src / "ema.safetensors"))
    safetensors_numpy.save_file(keymap.export(vae, bagel.vae_rules(ae_cfg)), str(src / "ae.safetensors"))
    qwen.shapes_bpe().save(str(src / "tokenizer.json"))  # Qwen2's specials, byte-level BPE
    out = str(d / "converted")
    bagel.convert_bagel(str(src / "ema.safetensors"), str(src / "ae.safetensors"), out, cfg, ae_cfg,
                        tokenizer=str(src / "tokenizer.json"), dtype=np.float32)
    return out


def _run(args, env=None):
    r = subprocess.run([sys.executable, "-m", "strokes_jax", *args], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r.stdout


def test_bagel_world_trains_evaluates_and_generates(converted, tmp_path):
    w = tmp_path / "w"
    common = ["--config", CONFIG, f"--workdir={w}", f"--config.train.init_converted={converted}"]
    out = _run(["train", *common, "--config.mesh.shape=(1,-1,1)", "--config.data.batch_size=8",
                "--config.train.steps=2", "--config.train.eval_every=2",
                "--config.train.tb_images=0"], env=_env(8))
    assert "trained 0 -> 2 steps" in out
    info = json.load(open(w / "run_info.json"))
    assert info["mesh_shape"] == [1, 8, 1] and info["device"]["device_count"] == 8
    # Every image was read at 64 px (the test size): 4 x 4 latent tokens, 4 x 4 ViT patches.
    lat = list((w / "data" / "latents").rglob("train.array_record"))
    assert len(lat) == 1
    gen = tmp_path / "gen"
    out = _run(["generate", *common, "--prompt", "a photo of a red square", "--mode", "both",
                f"--out={gen}"])
    rows = [json.loads(x) for x in open(gen / "samples.jsonl")]
    assert {r["mode"] for r in rows} == {"process", "single_pass"}
    pngs = sorted(gen.rglob("*.png"))
    assert pngs, out
    sizes = {Image.open(p).size for p in pngs if "filmstrip" not in p.name}
    assert (64, 64) in sizes, sizes
    out = _run(["evaluate", *common])
    assert "overall" in out
