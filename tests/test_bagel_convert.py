"""The BAGEL converter end to end on a synthetic checkpoint with the real key names and tiny
shapes (bagel7b_process:test): key map <-> model coverage, bfloat16 safetensors ->
Orbax -> a forward pass with text, noisy/clean latents and ViT tokens, errors that name the
key, the Qwen2 tokenizer from tokenizer.json, and eval_shape parameter counts of the full
config. Needs only safetensors (no torch)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from strokes_jax.configs import bagel7b_process  # noqa: E402
from strokes_jax.convert import bagel, keymap  # noqa: E402
from strokes_jax.convert.cli import configs_of, main as convert_main  # noqa: E402
from strokes_jax.convert.keymap import ConversionError, Reader  # noqa: E402
from strokes_jax.model import counts  # noqa: E402
from strokes_jax.model.unified import VIT, UnifiedModel  # noqa: E402
from strokes_jax.model.vae import AutoEncoder  # noqa: E402
from strokes_jax.sequence.qwen import QwenTokenizer  # noqa: E402
from strokes_jax.sequence.tokenizer import CLEAN, NOISY, TEXT  # noqa: E402

# BAGEL's ema.safetensors names, {i}/{j} standing for layer numbers.
BAGEL_EMA_KEYS = {
    "language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
    *(f"language_model.model.layers.{{i}}.self_attn.{p}_proj{s}.{w}"
      for p in "qkv" for s in ("", "_moe_gen") for w in ("weight", "bias")),
    *(f"language_model.model.layers.{{i}}.self_attn.o_proj{s}.weight" for s in ("", "_moe_gen")),
    *(f"language_model.model.layers.{{i}}.self_attn.{n}_norm{s}.weight"
      for n in "qk" for s in ("", "_moe_gen")),
    *(f"language_model.model.layers.{{i}}.mlp{s}.{n}_proj.weight"
      for s in ("", "_moe_gen") for n in ("gate", "up", "down")),
    *(f"language_model.model.layers.{{i}}.{n}_layernorm{s}.weight"
      for n in ("input", "post_attention") for s in ("", "_moe_gen")),
    "language_model.model.norm.weight", "language_model.model.norm_moe_gen.weight",
    *(f"{n}.{w}" for n in ("time_embedder.mlp.0", "time_embedder.mlp.2", "vae2llm", "llm2vae")
      for w in ("weight", "bias")),
    "latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed",
    *(f"vit_model.vision_model.embeddings.patch_embedding.{w}" for w in ("weight", "bias")),
    "vit_model.vision_model.embeddings.position_embedding.weight",
    *(f"vit_model.vision_model.encoder.layers.{{j}}.{n}.{w}"
      for n in ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                "self_attn.out_proj", "layer_norm2", "mlp.fc1", "mlp.fc2")
      for w in ("weight", "bias")),
    *(f"vit_model.vision_model.post_layernorm.{w}" for w in ("weight", "bias")),
    *(f"connector.fc{n}.{w}" for n in "12" for w in ("weight", "bias")),
}


def _template(key: str) -> str:
    key = re.sub(r"^language_model\.model\.layers\.\d+\.", "language_model.model.layers.{i}.", key)
    return re.sub(r"\.encoder\.layers\.\d+\.", ".encoder.layers.{j}.", key)


@pytest.fixture(scope="module")
def cfgs():
    """The paper config's architecture, shrunk; its decoder is scanned (stacked layers)."""
    cfg, ae_cfg = configs_of(bagel7b_process.get_config("test"))
    assert cfg.decoder.scan_layers
    return cfg, ae_cfg


def unscanned(cfg):
    return dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, scan_layers=False,
                                                                remat="none"))


def _inputs(cfg, rng):
    """One packed row: text, a noisy image, <vision_start> clean image <vision_end>, ViT copy."""
    g = cfg.latent_grid[0] * cfg.latent_grid[1]
    v = cfg.vision
    nv = 4  # a 2x2-patch ViT image
    types = [TEXT] * 5 + [NOISY] * g + [TEXT] + [CLEAN] * g + [TEXT] + [TEXT] + [VIT] * nv + [TEXT] + [TEXT] * 3
    n = len(types)
    blocks = [0] * 5 + [1] * g + [2] * (g + 2) + [3] * (nv + 2) + [0] * 3
    pos = list(range(5)) + [5] * (2 * g + 2) + [6] * (nv + 2) + [7, 8, 9]
    ppos = [0] * 5 + list(range(g)) + [0] + list(range(g)) + [0] * (nv + 6)
    vpos = [0] * (n - nv - 4) + [0, 1, v.max_side, v.max_side + 1] + [0] * 4
    arr = lambda x: jnp.asarray(np.asarray(x)[None])
    return dict(tokens=arr(rng.integers(0, 100, n)), types=arr(types), positions=arr(pos),
                segment_ids=jnp.ones((1, n), jnp.int32), blocks=arr(blocks), patch_pos=arr(ppos),
                latents=arr(rng.normal(size=(n, cfg.patch_dim)).astype(np.float32)),
                timesteps=arr(np.where(np.asarray(types) == NOISY, 0.6, 0.0).astype(np.float32)),
                vit_patches=arr(rng.uniform(-1, 1, (n, v.patch_dim)).astype(np.float32)),
                vit_pos=arr(vpos))


@pytest.fixture(scope="module")
def synthetic(cfgs, tmp_path_factory):
    """Random params exported to BAGEL names through the inverse key map, stored in bfloat16."""
    cfg, ae_cfg = cfgs
    cfg = unscanned(cfg)
    rng = np.random.default_rng(0)
    args = _inputs(cfg, rng)
    params = jax.tree_util.tree_map(np.asarray, counts.nn.unbox(
        jax.jit(UnifiedModel(cfg).init)(jax.random.PRNGKey(1), **args)["params"]))
    # llm2vae starts at zero; give it values so the velocity path is checked too.
    params["llm2vae"]["kernel"] = rng.normal(0, 0.05, params["llm2vae"]["kernel"].shape).astype(np.float32)
    x = jnp.zeros((1, 8, 8, 3))
    vae_params = jax.tree_util.tree_map(
        np.asarray, jax.jit(AutoEncoder(ae_cfg).init)(jax.random.PRNGKey(2), x)["params"])
    rules, _ = bagel.model_rules(cfg)
    ema = keymap.export(params, rules)
    for t in bagel.fixed_tables(cfg):
        ema[t.src] = t.value
    ae = keymap.export(vae_params, bagel.vae_rules(ae_cfg))
    bf16 = lambda d: {k: np.asarray(v, ml_dtypes.bfloat16) for k, v in d.items()}
    d = tmp_path_factory.mktemp("bagel")
    safetensors_numpy.save_file(bf16(ema), str(d / "ema.safetensors"))
    safetensors_numpy.save_file(bf16(ae), str(d / "ae.safetensors"))
    rounded = lambda t: jax.tree_util.tree_map(
        lambda a: np.asarray(np.asarray(a, ml_dtypes.bfloat16), np.float32), t)
    return d, rounded(params), rounded(vae_params), ema, args


def test_key_map_covers_the_model(cfgs):
    cfg, ae_cfg = cfgs
    for c in (cfg, unscanned(cfg)):
        stacking = bagel.decoder_stacking(c)
        assert (stacking is None) == (c is not cfg)
        for init_gen in (False, True):
            rules, copies = bagel.model_rules(c, init_gen_from_und=init_gen)
            keymap.check_covers(counts.abstract_params(c), rules, copies, stacking)
    keymap.check_covers(counts.abstract_vae_params(ae_cfg), bagel.vae_rules(ae_cfg))


def test_synthetic_checkpoint_has_bagel_names(synthetic):
    _, _, _, ema, _ = synthetic
    assert {_template(k) for k in ema} == BAGEL_EMA_KEYS


def test_transforms_round_trip():
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    for t, src in ((keymap.LINEAR, x), (keymap.linear_to_heads(3, 2), x),
                   (keymap.bias_to_heads(3, 2), x[:, 0]),
                   (keymap.CONV2D, x.reshape(2, 3, 2, 2)), (keymap.CONV1X1_TO_LINEAR, x[:, :, None, None]),
                   (keymap.conv_patch_to_linear(3, 2), np.arange(4 * 3 * 2 * 2.0).reshape(4, 3, 2, 2))):
        y = t.forward(src)
        assert y.shape == t.flax_shape(src.shape), t.name
        np.testing.assert_array_equal(t.inverse(y), src, err_msg=t.name)
    # (row, col, channel) order of BAGEL's linear patch embedding: input index (r*p + c)*C + ch.
    w = np.arange(4 * 3 * 2 * 2.0).reshape(4, 3, 2, 2)  # [hidden, ch, row, col]
    k = keymap.conv_patch_to_linear(3, 2).forward(w)
    assert k[(1 * 2 + 0) * 3 + 2, 1] == w[1, 2, 1, 0]


@pytest.mark.slow
def test_convert_to_orbax_and_run(cfgs, synthetic, tmp_path):
    cfg, ae_cfg = cfgs
    d, params, vae_params, _, args = synthetic
    out = tmp_path / "converted"
    reads = []
    orig_get = Reader.get
    Reader.get = lambda self, k: (reads.append(k), orig_get(self, k))[1]
    try:
        bagel.convert_bagel(str(d / "ema.safetensors"), str(d / "ae.safetensors"), str(out), cfg,
                            ae_cfg, tokenizer=str(_tiny_tokenizer(tmp_path)), dtype=np.float32)
    finally:
        Reader.get = orig_get
    assert len(reads) == len(set(reads)), "a tensor was read twice"
    got = bagel.load_converted(str(out))
    stacking = bagel.decoder_stacking(cfg)  # the scanned layout, written in place
    for path, want in keymap.flat_paths(params).items():
        np.testing.assert_array_equal(keymap._fetch(got["model"], path, stacking), want,
                                      err_msg="/".join(path))
    model = UnifiedModel(cfg)
    logits, vel = model.apply({"params": got["model"]}, **args)
    ref_logits, ref_vel = UnifiedModel(unscanned(cfg)).apply({"params": params}, **args)
    assert np.all(np.isfinite(logits)) and np.all(np.isfinite(vel))
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    np.testing.assert_allclose(vel, ref_vel, atol=1e-5)
    # The ViT tokens reach the decoder: changing their pixels changes the later text logits.
    other = dict(args, vit_patches=args["vit_patches"] * -1.0)
    logits2, _ = model.apply({"params": got["model"]}, **other)
    assert np.abs(np.asarray(logits2 - logits)[0, -3:]).max() > 1e-4
    img = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 8, 8, 3)), jnp.float32)
    ae = AutoEncoder(ae_cfg)
    z = ae.apply({"params": got["vae"]}, img, method=AutoEncoder.encode)
    np.testing.assert_allclose(z, ae.apply({"params": vae_params}, img, method=AutoEncoder.encode), atol=1e-5)
    assert (out / "tokenizer.json").exists() and (out / "conversion.json").exists()


@pytest.mark.parametrize("corruption", ["missing", "shape", "unexpected", "table"])
def test_corrupted_checkpoint_names_the_key(cfgs, synthetic, tmp_path, corruption):
    cfg, _ = cfgs
    _, _, _, ema, _ = synthetic
    bad = dict(ema)
    key = {"missing": "language_model.model.layers.1.mlp_moe_gen.up_proj.weight",
           "shape": "vit_model.vision_model.encoder.layers.0.self_attn.k_proj.bias",
           "unexpected": "language_model.model.layers.9.mlp.up_proj.weight",
           "table": "latent_pos_embed.pos_embed"}[corruption]
    if corruption == "missing":
        del bad[key]
    elif corruption == "shape":
        bad[key] = bad[key][:-1]
    elif corruption == "unexpected":
        bad[key] = np.zeros((2, 2), np.float32)
    else:  # halves swapped: rows and columns confused
        w = bad[key].shape[1] // 2
        bad[key] = np.concatenate([bad[key][:, w:], bad[key][:, :w]], 1)
    path = tmp_path / "ema.safetensors"
    safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in bad.items()}, str(path))
    with pytest.raises(ConversionError, match=re.escape(key)):
        bagel.convert_model(Reader([str(path)]), cfg)


def _tiny_tokenizer(tmp_path):
    """A byte-level BPE tokenizer.json with Qwen2's special tokens, trained on a few words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a red cube left of a blue ball", "add a green square"] * 10, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_qwen_tokenizer_from_tokenizer_json(tmp_path):
    path = _tiny_tokenizer(tmp_path)
    tok = QwenTokenizer.from_file(path, model_vocab=512)
    text = "<ins>add a red cube</ins> and an unseen wörd"
    ids = tok.encode(text)
    assert tok.ids["<ins>"] in ids and tok.ids["</ins>"] in ids
    assert tok.decode(ids) == text  # byte-level: nothing is unknown
    assert len({tok.im_start, tok.im_end, tok.vision_start, tok.vision_end, tok.end_of_episode}) == 5
    with pytest.raises(ValueError, match="model.vocab_size"):
        QwenTokenizer.from_file(path, model_vocab=100)


def test_full_config_parameter_counts(capsys):
    """eval_shape only: the full BAGEL-7B-MoT config, printed by the command."""
    assert convert_main(["params"]) == 0
    out = capsys.readouterr().out
    assert "language_model" in out and "total_with_vae" in out
    cfg, ae_cfg = configs_of(bagel7b_process.get_config())
    c = counts.param_counts(cfg, ae_cfg)
    assert 14.0e9 < c["language_model"] < 14.2e9  # "about 14B": both experts + embed + head
    assert 7.0e9 < c["active_text_token"] < 7.7e9  # "7B active": one expert + embed + head
    assert c["expert_und"] == c["expert_gen"]
    assert 0.40e9 < c["vision"] < 0.43e9  # SigLIP2-so400m, 26 layers, + connector
    assert 0.08e9 < c["vae"] < 0.09e9


def test_cli_keeps_bfloat16(synthetic, tmp_path):
    d, params, _, _, _ = synthetic
    config = f"{bagel7b_process.__file__}:test"
    assert convert_main(["bagel", "--ema", str(d / "ema.safetensors"), "--ae", str(d / "ae.safetensors"),
                         "--out", str(tmp_path / "out"), "--config", config, "--dtype", "keep"]) == 0
    got = bagel.load_converted(str(tmp_path / "out"))
    q = got["model"]["decoder"]["layers"]["block"]["q_gen"]["kernel"][0]
    assert q.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(q, np.float32), params["decoder"]["layer_0"]["q_gen"]["kernel"])


@pytest.mark.slow
def test_convert_subcommand_of_the_main_entry(synthetic, tmp_path):
    """`python -m strokes_jax convert bagel ...`, in a fresh process as a user runs it, takes
    its own options."""
    import os
    import subprocess
    import sys
    d, params, _, _, _ = synthetic
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "strokes_jax", "convert", "bagel",
           "--ema", str(d / "ema.safetensors"), "--ae", str(d / "ae.safetensors"),
           "--out", str(out), "--config", f"{bagel7b_process.__file__}:test"]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"wrote {out}" in res.stdout
    got = bagel.load_converted(str(out))
    q = got["model"]["decoder"]["layers"]["block"]["q_gen"]["kernel"][0]
    assert q.dtype == jnp.float32  # the default --dtype
    np.testing.assert_array_equal(q, params["decoder"]["layer_0"]["q_gen"]["kernel"])
    # Bad arguments fail in the shared parser, under the subcommand's name.
    res = subprocess.run([sys.executable, "-m", "strokes_jax", "convert", "bagel"], cwd=root,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "python -m strokes_jax convert bagel" in res.stderr
    assert "--ema" in res.stderr


def test_package_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys; import strokes_jax.convert.bagel, strokes_jax.convert.cli, strokes_jax.convert.hf, "
            "strokes_jax.model.counts, strokes_jax.sequence.qwen; "
            "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_memory_bench_smoke():
    """The conversion memory benchmark runs end to end at a tiny size and reports peak memory
    against the output's size (the figures only mean something at the documented size)."""
    from strokes_jax.convert import memory_bench
    r = memory_bench.run(width=64, depth=2, mlp=128, vocab=512, heads=4)
    assert r["source_mb_bf16"] > 0 and r["output_mb_f32"] == 2 * r["source_mb_bf16"]
    assert r["peak_anon_mb"] >= r["anon_after_imports_mb"] > 0
    assert r["peak_rss_mb"] >= r["rss_after_imports_mb"] >= r["anon_after_imports_mb"]
    assert r["peak_rss_growth_over_output"] == pytest.approx(r["conversion_rss_growth_mb"] / r["output_mb_f32"])
    assert r["params"]["language_model"] > 0 and r["device"]["platform"] == "cpu"
