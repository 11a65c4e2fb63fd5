"""`convert qwen2 / flux-ae / siglip` on synthetic checkpoints under Hugging Face / diffusers
names (no torch): a text-only decoder whose width the 2-D table cannot take converts and
runs, a --config that disagrees with config.json is refused in one line naming the key, QK-norm
asked of a Qwen2 checkpoint starts at one, a sharded index is checked against its shards, and
the streaming writer's per-layer chunks restore to what the in-memory conversion gives."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from strokes_jax.configs import bagel7b_process
from strokes_jax.convert import bagel, hf, keymap, writer
from strokes_jax.convert.cli import main as convert_main
from strokes_jax.convert.hf_config import ae_config_from_diffusers
from strokes_jax.convert.keymap import ConversionError
from strokes_jax.convert.output import load_converted
from strokes_jax.model import counts
from strokes_jax.model.mot import DecoderConfig
from strokes_jax.model.unified import ModelConfig, UnifiedModel
from strokes_jax.model.vae import AEConfig

safetensors_numpy = pytest.importorskip("safetensors.numpy")

VOCAB = 97


def _qwen2_json(d: DecoderConfig, **extra) -> dict:
    return dict(dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=d.width, num_hidden_layers=d.depth,
                     num_attention_heads=d.heads, num_key_value_heads=d.kv_heads, head_dim=d.head_dim,
                     intermediate_size=d.mlp, rope_theta=d.rope_theta, rms_norm_eps=d.norm_eps, hidden_act="silu",
                     tie_word_embeddings=False), **extra)


def _text_args(n: int = 7):
    z = jnp.zeros((1, n), jnp.int32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (1, n)))
    return dict(tokens=tokens, types=z, positions=jnp.arange(n)[None], segment_ids=jnp.ones_like(z),
                blocks=z, patch_pos=z, latents=None, timesteps=None)


def _write_hf(folder, tensors: dict, config: dict, shards: int = 1):
    """save_pretrained's layout: model.safetensors, or `shards` files + model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    keys = sorted(tensors)
    if shards == 1:
        safetensors_numpy.save_file(tensors, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        safetensors_numpy.save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module", params=[30, 36])
def text_only(request, tmp_path_factory):
    """A random text-only decoder of width 30 or 36 exported under HF Qwen2 names, sharded."""
    w = request.param
    dec = DecoderConfig(width=w, depth=2, heads=3, kv_heads=1, head_dim=w // 3, mlp=40, qk_norm=False,
                        rope_theta=1e6)
    cfg = ModelConfig(vocab_size=VOCAB, patch_dim=4, latent_grid=(2, 2), decoder=dec)
    params = jax.tree_util.tree_map(np.asarray, counts.nn.unbox(
        UnifiedModel(cfg).init(jax.random.PRNGKey(w), **_text_args())["params"]))
    rules, _, _ = hf.qwen2_map(VOCAB, dec, has_qk_norm=False, tied=False)
    folder = _write_hf(tmp_path_factory.mktemp(f"qwen2_{w}") / "hf", keymap.export(params, rules),
                       _qwen2_json(dec), shards=3)
    return cfg, params, folder


def test_text_only_width_not_divisible_by_4_converts_and_runs(text_only, tmp_path):
    cfg, params, folder = text_only
    out = tmp_path / "out"
    assert convert_main(["qwen2", "--checkpoint", str(folder), "--out", str(out)]) == 0
    got = load_converted(str(out))["model"]
    layer = got["decoder"]["layer_1"]
    np.testing.assert_array_equal(layer["q_gen"]["kernel"], layer["q_und"]["kernel"])  # both experts from it
    np.testing.assert_array_equal(layer["q_und"]["kernel"], params["decoder"]["layer_1"]["q_und"]["kernel"])
    model = UnifiedModel(cfg)
    want, vel = model.apply({"params": params}, **_text_args())
    logits, _ = model.apply({"params": got}, **_text_args())
    assert vel is None
    np.testing.assert_allclose(logits, want, atol=1e-5)
    meta = json.loads((out / "conversion.json").read_text())
    assert meta["kind"] == "qwen2" and meta["config"]["width"] == cfg.decoder.width and len(meta["files"]) == 3


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_config_that_disagrees_with_config_json_is_refused_naming_the_key(text_only, tmp_path, capsys):
    """bagel7b_process:test has width 64; config.json says 30/36. Nothing is written."""
    cfg, _, folder = text_only
    out = tmp_path / "out"
    assert convert_main(["qwen2", "--checkpoint", str(folder), "--out", str(out),
                         "--config", f"{bagel7b_process.__file__}:test"]) == 2
    line = _one_error_line(capsys)
    assert str(folder / "config.json") in line and "vocab_size=97" in line  # the first key that differs
    assert not out.exists()
    told = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, mlp=48))
    with pytest.raises(ConversionError, match=r"intermediate_size=40 gives model\.mlp=40, but the config has 48"):
        hf.convert_qwen2(str(folder), str(out), told)


def test_qk_norm_asked_of_a_qwen2_checkpoint_starts_at_one(text_only, tmp_path):
    """BAGEL's own start from Qwen2.5: its config turns QK-norm on, the checkpoint has none; the
    told config's layout (scanned) is kept."""
    cfg, params, folder = text_only
    told = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, qk_norm=True, scan_layers=True))
    hf.convert_qwen2(str(folder), str(tmp_path / "out"), told, progress=None)
    block = load_converted(str(tmp_path / "out"))["model"]["decoder"]["layers"]["block"]
    for name in ("q_norm_und", "k_norm_gen"):
        np.testing.assert_array_equal(block[name]["scale"], np.ones((cfg.decoder.depth, cfg.decoder.head_dim)))
    np.testing.assert_array_equal(block["down_gen"]["kernel"][1], params["decoder"]["layer_1"]["down_und"]["kernel"])
    meta = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert "decoder/layer_0/q_norm_und/scale" in meta["filled"]


def test_index_must_match_its_shards(text_only, tmp_path):
    _, _, folder = text_only
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = "model-00002-of-00003.safetensors" if index["weight_map"][key].startswith(
        "model-00001") else "model-00001-of-00003.safetensors"
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in folder.iterdir():
        (bad / p.name).symlink_to(p)
    (bad / "model.safetensors.index.json").unlink()
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=f"lists key '{key}'"):
        hf.open_checkpoint(str(bad))


def _dummy(folder, config: dict, name: str = "model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    safetensors_numpy.save_file({"x": np.zeros(2, np.float32)}, str(folder / name))
    return folder


FLUX_VAE_JSON = dict(_class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                     in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32,
                     mid_block_add_attention=True, scaling_factor=0.3611, shift_factor=0.1159,
                     use_quant_conv=False, use_post_quant_conv=False, latents_mean=None, latents_std=None)


def test_flux_ae_config_from_diffusers_and_its_disagreements(tmp_path, capsys):
    assert ae_config_from_diffusers(FLUX_VAE_JSON) == AEConfig()  # FLUX.1's vae/config.json is our default
    folder = _dummy(tmp_path / "vae", dict(FLUX_VAE_JSON, norm_num_groups=16),
                    "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConversionError, match=r"norm_num_groups=16 gives vae\.groups=16, but the config has 32"):
        hf.convert_flux_ae(str(folder), str(tmp_path / "out"), AEConfig())
    folder = _dummy(tmp_path / "sd", dict(FLUX_VAE_JSON, use_quant_conv=True), "diffusion_pytorch_model.safetensors")
    assert convert_main(["flux-ae", "--checkpoint", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "use_quant_conv=true" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_siglip_position_grid_from_image_and_patch_size(tmp_path):
    """SigLIP2-so400m at 384 px has a 27x27 grid; BAGEL's config wants 70x70: refused, naming both keys."""
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16, patch_size=14, image_size=384)
    folder = _dummy(tmp_path / "siglip", dict(model_type="siglip", text_config={}, vision_config=vision))
    want = bagel7b_process.get_config().model.vision.to_dict()
    from strokes_jax.model.vision import VisionConfig
    with pytest.raises(ConversionError, match=r"image_size=384, patch_size=14 gives model\.vision\.max_side=27, "
                                              r"but the config has 70"):
        hf.convert_siglip(str(folder), str(tmp_path / "out"), VisionConfig(**want))
    with pytest.raises(ConversionError, match=r"num_hidden_layers=27 gives model\.vision\.depth=27.*every layer"):
        hf.convert_siglip(str(folder), str(tmp_path / "out"), VisionConfig(**dict(want, depth=26, max_side=27)),
                          drop_last_layer=False)
    keys = ["vision_model.encoder.layers.25.mlp.fc1.bias", "vision_model.encoder.layers.26.mlp.fc1.bias",
            "vision_model.head.probe", "text_model.embeddings.token_embedding.weight", "logit_scale"]
    assert hf.siglip_ignored(keys, depth=26) == keys[1:]


def test_streamed_layer_chunks_restore_to_the_in_memory_conversion(tmp_path, monkeypatch):
    """With every stack written a layer per chunk (the path large models take), the checkpoint
    restores to exactly what keymap.convert builds in memory, copies and fills included."""
    monkeypatch.setattr(writer, "MIN_SLOT_CHUNK", 0)
    dec = DecoderConfig(width=32, depth=3, heads=2, kv_heads=1, head_dim=16, mlp=48, scan_layers=True)
    cfg = ModelConfig(vocab_size=VOCAB, patch_dim=4, latent_grid=(2, 2), decoder=dec)
    rules, copies, fills = hf.qwen2_map(VOCAB, dec, has_qk_norm=False, tied=True)
    rng = np.random.default_rng(0)
    tensors = {r.src: rng.normal(size=r.shape).astype(np.float32) for r in rules}
    folder = _write_hf(tmp_path / "hf", tensors, _qwen2_json(dec, tie_word_embeddings=True), shards=2)
    reader, _, _ = hf.open_checkpoint(str(folder))
    stacking = bagel.decoder_stacking(cfg)
    want = keymap.convert(reader, rules, copies, fills=fills, stacking=stacking)
    hf.convert_qwen2(str(folder), str(tmp_path / "out"), cfg, progress=None)  # QK-norm on: scales filled
    got = load_converted(str(tmp_path / "out"))["model"]
    flat_got, flat_want = keymap.flat_paths(got), keymap.flat_paths(want)
    assert flat_got.keys() == flat_want.keys()
    for path, w in flat_want.items():
        np.testing.assert_array_equal(flat_got[path], w, err_msg="/".join(path))
    np.testing.assert_array_equal(got["lm_head"]["kernel"], tensors["model.embed_tokens.weight"].T)  # untied copy
    import orbax.checkpoint as ocp
    meta = ocp.StandardCheckpointer().metadata(str(tmp_path / "out" / "params")).item_metadata.tree
    stored = meta["model"]["decoder"]["layers"]["block"]["up_und"]["kernel"]
    assert stored.storage.chunk_shape == (1,) + tuple(stored.shape[1:])  # a layer is one chunk


def test_plan_refuses_an_unfilled_stack_slot():
    rules = [keymap.Rule("a", ("decoder", "layer_0", "w"), (2,))]
    stacking = lambda p: (("decoder", "layers", "block", "w"), 0, 2)
    with pytest.raises(ConversionError, match=r"stack slots \[1\]"):
        keymap.plan(keymap.DictReader({"a": np.zeros(2, np.float32)}), rules, stacking=stacking)
    with pytest.raises(ConversionError, match="copies decoder/x, which no rule writes"):
        keymap.plan(keymap.DictReader({}), [], [keymap.Copy(("decoder", "y"), ("decoder", "x"))])
