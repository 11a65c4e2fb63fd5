"""The understanding expert vs HF `transformers` Qwen2 (biased q/k/v, no QK-norm) and Qwen3
(no attention bias, QK-norm before RoPE): build a tiny random reference, save it as
safetensors under BAGEL's key names, convert it with our converter and compare logits on text
tokens (float32, CPU). GQA, RoPE theta 1e6 and an untied head are exercised by the config.
`convert qwen2` is checked the same way on the folder `save_pretrained` writes (sharded),
including a tied head and a width the 2-D position table cannot take (30).

Run with -s to see the measured max abs error and KL.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.reference
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from strokes_jax.convert import bagel, hf  # noqa: E402
from strokes_jax.convert.keymap import ConversionError, Reader, merge  # noqa: E402
from strokes_jax.convert.output import load_converted  # noqa: E402
from strokes_jax.model.mot import DecoderConfig  # noqa: E402
from strokes_jax.model.unified import ModelConfig, UnifiedModel  # noqa: E402

VOCAB, L = 101, 12
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
              tie_word_embeddings=False, max_position_embeddings=64,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def _reference(kind: str):
    torch.manual_seed(0 if kind == "qwen2" else 1)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**COMMON)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(head_dim=16, attention_bias=False, **COMMON)
        model = transformers.Qwen3ForCausalLM(cfg)
    cfg._attn_implementation = "eager"
    # Random init has zero biases and unit norms; make every tensor informative so a wrong
    # mapping of any of them shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:  # a sharper head, so the KL is measured on peaked distributions
                p.copy_((1.0 if "lm_head" in name else 0.15) * torch.randn_like(p))
    return model.eval(), cfg


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def converted(request, tmp_path_factory):
    kind = request.param
    ref, hf_cfg = _reference(kind)
    path = tmp_path_factory.mktemp(kind) / "ema.safetensors"
    # HF names are BAGEL's once prefixed: language_model.model.layers.{i}.self_attn.q_proj...
    save_file({f"language_model.{k}": v.contiguous() for k, v in ref.state_dict().items()},
              str(path))
    vocab, dec = bagel.decoder_config_from_hf(hf_cfg.to_dict())
    return kind, ref, path, ModelConfig(vocab_size=vocab, patch_dim=4, latent_grid=(2, 2),
                                        decoder=dec)


def _our_logits(cfg, params, tokens, *, text_only: bool = False):
    model = UnifiedModel(cfg)
    b, n = tokens.shape
    z = jnp.zeros((b, n), jnp.int32)
    args = dict(tokens=jnp.asarray(tokens), types=z, positions=jnp.broadcast_to(jnp.arange(n), (b, n)),
                segment_ids=jnp.ones_like(z), blocks=z, patch_pos=z,
                latents=None if text_only else jnp.zeros((b, n, cfg.patch_dim)),
                timesteps=None if text_only else jnp.zeros((b, n)))
    init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **args))["params"]
    fresh = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), _unbox(init))
    full = merge(fresh, params)
    logits, _ = model.apply({"params": full}, **args)
    return np.asarray(logits)


def kl_divergence(p_logits, q_logits) -> float:
    """Mean over tokens of KL(softmax p || softmax q), in float64 so rounding stays below it."""
    lp = _log_softmax(np.asarray(p_logits, np.float64))
    lq = _log_softmax(np.asarray(q_logits, np.float64))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _unbox(tree):
    import flax.linen as nn
    return nn.unbox(tree)


def test_config_from_hf(converted):
    kind, _, _, cfg = converted
    d = cfg.decoder
    assert (d.width, d.depth, d.heads, d.kv_heads, d.head_dim, d.mlp) == (64, 2, 4, 2, 16, 96)
    assert d.rope_theta == 1e6
    assert (d.qkv_bias, d.qk_norm) == ((True, False) if kind == "qwen2" else (False, True))


def test_logits_match_hf(converted):
    kind, ref, path, cfg = converted
    params = bagel.convert_model(Reader([str(path)]), cfg, init_gen_from_und=True,
                                 gen_heads=False, vision=False)
    # The generation expert is an exact copy of the understanding expert.
    l0 = params["decoder"]["layer_0"]
    np.testing.assert_array_equal(l0["q_gen"]["kernel"], l0["q_und"]["kernel"])
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, L))
    with torch.no_grad():
        want = ref(torch.as_tensor(tokens)).logits.numpy()
    got = _our_logits(cfg, params, tokens)
    err = float(np.max(np.abs(got - want)))
    kl = kl_divergence(want, got)
    print(f"\n[{kind}] logits max abs err {err:.3e} (logit scale {np.abs(want).max():.2f}), "
          f"KL(hf||ours) {kl:.3e}")
    assert err < 1e-4 * max(1.0, np.abs(want).max())
    assert kl < 1e-8


def _compare(kind, ref, cfg, params, *, text_only=False):
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, L))
    with torch.no_grad():
        want = ref(torch.as_tensor(tokens)).logits.numpy()
    got = _our_logits(cfg, params, tokens, text_only=text_only)
    err, kl = float(np.max(np.abs(got - want))), kl_divergence(want, got)
    print(f"\n[{kind}] logits max abs err {err:.3e} (logit scale {np.abs(want).max():.2f}), KL(hf||ours) {kl:.3e}")
    assert err < 1e-4 * max(1.0, np.abs(want).max())
    assert kl < 1e-8


def test_convert_qwen2_matches_hf(converted, tmp_path):
    """`convert qwen2` on save_pretrained's sharded folder, told a scanned config that agrees with
    config.json: the scanned result, both experts from the one decoder, gives HF's logits."""
    kind, ref, _, cfg = converted
    ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    scanned = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, scan_layers=True))
    hf.convert_qwen2(str(tmp_path / "hf"), str(tmp_path / "out"), scanned, progress=None)
    params = load_converted(str(tmp_path / "out"))["model"]
    block = params["decoder"]["layers"]["block"]
    np.testing.assert_array_equal(block["up_gen"]["kernel"], block["up_und"]["kernel"])
    _compare(f"convert qwen2, {kind}", ref, scanned, params)


@pytest.mark.parametrize("width,tied", [(30, False), (48, True)])
def test_convert_qwen2_text_only_and_tied(width, tied, tmp_path):
    """Width 30 (no 2-D table exists for it: the model runs text-only) and a tied head (untied
    as a copy of the embedding), both read from config.json alone."""
    torch.manual_seed(3)
    hf_cfg = transformers.Qwen2Config(**dict(COMMON, hidden_size=width, num_attention_heads=3, num_key_value_heads=1,
                                             tie_word_embeddings=tied))
    hf_cfg._attn_implementation = "eager"
    ref = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_((1.0 + 0.2 * torch.randn_like(p)) if "norm" in name else 0.3 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "hf")
    hf.convert_qwen2(str(tmp_path / "hf"), str(tmp_path / "out"), progress=None)
    vocab, dec = bagel.decoder_config_from_hf(hf_cfg.to_dict(), allow_tied=tied)
    cfg = ModelConfig(vocab_size=vocab, patch_dim=4, latent_grid=(2, 2), decoder=dec)
    _compare(f"convert qwen2, width {width}, tied={tied}", ref, cfg, load_converted(str(tmp_path / "out"))["model"],
             text_only=True)


def test_missing_gen_expert_names_key(converted):
    _, _, path, cfg = converted
    with pytest.raises(ConversionError, match=r"q_proj_moe_gen\.weight"):
        bagel.convert_model(Reader([str(path)]), cfg, gen_heads=False, vision=False)


def test_latent_token_embedding_matches_bagel():
    """vae2llm(x_t) + time_embedder(t) + latent 2-D table, vs BAGEL's torch code for the same
    weights (TimestepEmbedder: raw t, 256 features cosine half first, Linear-SiLU-Linear)."""
    import math

    from strokes_jax.model.layers import sincos_2d
    torch.manual_seed(2)
    w, p, grid = 32, 64, 4
    vae2llm, mlp0, mlp2 = torch.nn.Linear(p, w), torch.nn.Linear(256, w), torch.nn.Linear(w, w)
    t = torch.tensor([0.0, 0.3, 0.97, 1.0])
    x = torch.randn(4, p)
    pos = torch.tensor([0, 5, 10, 15])

    def bagel_timestep_embedding(t, dim=256, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    table = np.asarray(sincos_2d(grid, grid, w))
    with torch.no_grad():
        want = (vae2llm(x) + mlp2(torch.nn.functional.silu(mlp0(bagel_timestep_embedding(t))))
                ).numpy() + table[pos.numpy()]
    cfg = ModelConfig(vocab_size=8, patch_dim=p, latent_grid=(grid, grid),
                      decoder=DecoderConfig(width=w, depth=1, heads=2, kv_heads=1, head_dim=16, mlp=48))
    tensors = {"vae2llm.weight": vae2llm.weight, "vae2llm.bias": vae2llm.bias,
               "time_embedder.mlp.0.weight": mlp0.weight, "time_embedder.mlp.0.bias": mlp0.bias,
               "time_embedder.mlp.2.weight": mlp2.weight, "time_embedder.mlp.2.bias": mlp2.bias,
               "llm2vae.weight": torch.zeros(p, w), "llm2vae.bias": torch.zeros(p)}
    from strokes_jax.convert.keymap import DictReader, convert
    heads = convert(DictReader({k: v.detach().numpy() for k, v in tensors.items()}),
                    bagel.gen_head_rules(cfg))
    n = 4
    z = jnp.zeros((1, n), jnp.int32)
    args = dict(tokens=z, types=jnp.full((1, n), 1), positions=z, segment_ids=jnp.ones_like(z),
                blocks=jnp.ones_like(z), patch_pos=jnp.asarray(pos.numpy())[None],
                latents=jnp.asarray(x.numpy())[None], timesteps=jnp.asarray(t.numpy())[None])
    model = UnifiedModel(cfg)
    init = _unbox(model.init(jax.random.PRNGKey(0), **args)["params"])
    _, state = model.apply({"params": merge(init, heads)}, **args, capture_intermediates=True)
    inter = state["intermediates"]
    got = (inter["vae2llm"]["__call__"][0] + inter["time_embedder"]["__call__"][0])[0] + table[pos.numpy()]
    err = float(np.max(np.abs(np.asarray(got) - want)))
    print(f"\n[latent token embedding] max abs err {err:.3e}")
    assert err < 1e-5
