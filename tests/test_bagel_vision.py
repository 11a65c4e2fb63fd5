"""Our SigLIP ViT (+ connector and 2-D sin-cos table) vs HF `transformers` SiglipVisionModel on
a tiny random config, float32 on CPU. The reference's weights are saved under BAGEL's names
(`vit_model.vision_model.*`) the way BAGEL stores them: last encoder layer dropped, patch
embedding as a Linear over (row, col, channel); the converter reads that file. `convert
siglip` reads the folder HF's save_pretrained writes (stock Conv2d patch embedding).

Run with -s to see the measured errors.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.reference
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from strokes_jax.convert import bagel, hf  # noqa: E402
from strokes_jax.convert.keymap import Reader, convert  # noqa: E402
from strokes_jax.convert.output import load_converted  # noqa: E402
from strokes_jax.model.layers import sincos_2d  # noqa: E402
from strokes_jax.model.vision import SiglipViT, VisionTower, patch_positions  # noqa: E402
from strokes_jax.sequence.tokenizer import patchify  # noqa: E402

P, SIDE, LAYERS, LLM_WIDTH = 4, 4, 3, 48


def mae_sincos_2d(grid: int, dim: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed as BAGEL uses it, written out independently."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)))
    return np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
        patch_size=P, image_size=P * SIDE, vision_use_head=False, hidden_act="gelu_pytorch_tanh")
    hf_cfg._attn_implementation = "eager"
    ref = transformers.SiglipVisionModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                    + 0.2 * torch.randn_like(p))
    connector = torch.nn.Sequential(torch.nn.Linear(32, LLM_WIDTH), torch.nn.GELU("tanh"),
                                    torch.nn.Linear(LLM_WIDTH, LLM_WIDTH))
    tensors = {}
    for k, v in ref.state_dict().items():
        k = k.removeprefix("vision_model.")
        if k.startswith(f"encoder.layers.{LAYERS - 1}."):
            continue  # BAGEL keeps all but the last layer
        if k == "embeddings.patch_embedding.weight":  # BAGEL's convert_conv2d_to_linear
            v = v.permute(0, 2, 3, 1).reshape(v.shape[0], -1)
        tensors[f"vit_model.vision_model.{k}"] = v.contiguous()
    tensors["connector.fc1.weight"], tensors["connector.fc1.bias"] = connector[0].weight, connector[0].bias
    tensors["connector.fc2.weight"], tensors["connector.fc2.bias"] = connector[2].weight, connector[2].bias
    tensors["vit_pos_embed.pos_embed"] = torch.as_tensor(mae_sincos_2d(SIDE, LLM_WIDTH), dtype=torch.float32)
    path = tmp_path_factory.mktemp("vit") / "ema.safetensors"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    vcfg = bagel.vision_config_from_hf(hf_cfg.to_dict(), max_side=SIDE)
    assert vcfg.depth == LAYERS - 1
    reader = Reader([str(path)])
    # The stored (MAE-formula) table must equal the one our model computes.
    table = bagel.FixedTable(bagel.VIT_TABLE, sincos_2d(SIDE, SIDE, LLM_WIDTH))
    bagel.check_fixed_tables(reader, [table])
    np.testing.assert_allclose(mae_sincos_2d(SIDE, LLM_WIDTH), table.value, atol=1e-6)
    params = convert(reader, bagel.vision_rules(vcfg, LLM_WIDTH, prefix=()), ignore=[table.src])
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, P * SIDE, P * SIDE)).astype(np.float32)
    with torch.no_grad():
        out = ref(pixel_values=torch.as_tensor(images), output_hidden_states=True)
        # BAGEL's features: post_layernorm after the second-to-last layer.
        want = getattr(ref, "vision_model", ref).post_layernorm(out.hidden_states[LAYERS - 1])
        want_tower = connector(want).numpy() + mae_sincos_2d(SIDE, LLM_WIDTH)[None]
    patches = np.stack([patchify(im.transpose(1, 2, 0), P) for im in images])  # (row, col, ch)
    return vcfg, params, patches, want.numpy(), want_tower, ref


def _err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_vit_hidden_states_match_hf(setup):
    vcfg, params, patches, want, _, _ = setup
    pos = jnp.broadcast_to(patch_positions(SIDE, SIDE, vcfg.max_side), patches.shape[:2])
    got = SiglipViT(vcfg).apply({"params": params["vit"]}, patches, pos, jnp.ones(pos.shape, jnp.int32))
    err = _err(got, want)
    print(f"\n[siglip] hidden states max abs err {err:.3e} (scale {np.abs(want).max():.2f})")
    assert err < 1e-4


def test_packed_images_attend_only_within_themselves(setup):
    """Both images in one row with a non-image token between: same features as one per row."""
    vcfg, params, patches, want, want_tower, _ = setup
    n = SIDE * SIDE
    row = np.concatenate([patches[0], np.zeros((1, patches.shape[-1]), np.float32), patches[1]])[None]
    pos1 = np.asarray(patch_positions(SIDE, SIDE, vcfg.max_side))
    pos = np.concatenate([pos1, [0], pos1])[None]
    ids = np.concatenate([np.full(n, 1), [0], np.full(n, 2)])[None]
    got = VisionTower(vcfg, LLM_WIDTH).apply({"params": params}, row, pos, ids)[0]
    err = max(_err(got[:n], want_tower[0]), _err(got[n + 1:], want_tower[1]))
    print(f"\n[siglip+connector+table, packed] max abs err {err:.3e}")
    assert err < 1e-4


@pytest.mark.parametrize("layout", ["vision_model", "siglip_model"])
def test_convert_siglip_reads_the_hf_folder(setup, tmp_path, layout):
    """`convert siglip` from config.json alone (layers - 1, grid image_size / patch_size): the
    same config as BAGEL's, and HF's features after the second-to-last layer. Both layouts: a
    SiglipVisionModel as save_pretrained writes it, and a whole SiglipModel's (`vision_model.`
    names beside a text tower, the vision config nested)."""
    import json
    vcfg, _, patches, want, _, ref = setup
    folder = tmp_path / "siglip"
    ref.save_pretrained(folder)
    if layout == "siglip_model":
        vision = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(model_type="siglip", text_config={}, vision_config=vision)))
        tensors = {f"vision_model.{k.removeprefix('vision_model.')}": v.contiguous()
                   for k, v in ref.state_dict().items()}
        tensors.update({"logit_scale": torch.ones(1), "text_model.embeddings.token_embedding.weight": torch.ones(3, 2)})
        save_file(tensors, str(folder / "model.safetensors"))
    hf.convert_siglip(str(folder), str(tmp_path / "out"), progress=None)
    meta = (tmp_path / "out" / "conversion.json").read_text()
    assert f'"max_side": {SIDE}' in meta and f'"depth": {LAYERS - 1}' in meta
    params = load_converted(str(tmp_path / "out"))["model"]["vision"]["vit"]
    pos = jnp.broadcast_to(patch_positions(SIDE, SIDE, vcfg.max_side), patches.shape[:2])
    got = SiglipViT(vcfg).apply({"params": params}, patches, pos, jnp.ones(pos.shape, jnp.int32))
    err = _err(got, want)
    print(f"\n[convert siglip, {layout}] hidden states max abs err {err:.3e}")
    assert err < 1e-4
