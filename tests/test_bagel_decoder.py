"""The understanding expert vs HF `transformers` Qwen2 (biased q/k/v, no QK-norm) and Qwen3
(no attention bias, QK-norm before RoPE): build a tiny random reference, save it as
safetensors under BAGEL's key names, convert it with our converter and compare logits on text
tokens (float32, CPU). GQA, RoPE theta 1e6 and an untied head are exercised by the config.

Run with -s to see the measured max abs error and KL.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from strokes_jax.convert import bagel  # noqa: E402
from strokes_jax.convert.keymap import ConversionError, Reader, merge  # noqa: E402
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
            else:
                p.copy_(0.15 * torch.randn_like(p))
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


def _our_logits(cfg, params, tokens):
    model = UnifiedModel(cfg)
    b, n = tokens.shape
    z = jnp.zeros((b, n), jnp.int32)
    args = dict(tokens=jnp.asarray(tokens), types=z, positions=jnp.broadcast_to(jnp.arange(n), (b, n)),
                segment_ids=jnp.ones_like(z), blocks=z, patch_pos=z,
                latents=jnp.zeros((b, n, cfg.patch_dim)), timesteps=jnp.zeros((b, n)))
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


def test_missing_gen_expert_names_key(converted):
    _, _, path, cfg = converted
    with pytest.raises(ConversionError, match=r"q_proj_moe_gen\.weight"):
        bagel.convert_model(Reader([str(path)]), cfg, gen_heads=False, vision=False)
