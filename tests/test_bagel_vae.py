"""Our FLUX autoencoder vs `diffusers`' AutoencoderKL with FLUX settings (no quant convs, 16
latent channels, GroupNorm(32, 1e-6), mid attention) on tiny channels, float32 on CPU.

The converter reads the ORIGINAL FLUX names of `ae.safetensors`, so the reference's diffusers
names are mapped to them here, explicitly; that map is the inverse of diffusers' own FLUX
conversion. Run with -s to see the measured errors.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytestmark = pytest.mark.reference
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

from strokes_jax.convert import bagel  # noqa: E402
from strokes_jax.convert.keymap import ConversionError, Reader  # noqa: E402
from strokes_jax.model.vae import AEConfig, AutoEncoder  # noqa: E402

CH, MULT, BLOCKS = 32, (1, 1, 2), 1
LEVELS = len(MULT)


def flux_name(k: str) -> str:
    """diffusers AutoencoderKL key -> original FLUX `ae.safetensors` key."""
    rename = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.up.{LEVELS - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"decoder.up.{LEVELS - 1 - int(m[1])}.upsample."),
        (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
        (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    for pat, rep in rename:
        k = re.sub(pat, rep, k)
    return k


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * LEVELS,
        up_block_types=("UpDecoderBlock2D",) * LEVELS,
        block_out_channels=tuple(CH * m for m in MULT), layers_per_block=BLOCKS,
        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159, mid_block_add_attention=True).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    tensors = {}
    for k, v in ref.state_dict().items():
        fk = flux_name(k)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", fk):
            v = v[:, :, None, None]  # FLUX stores the attention projections as 1x1 convs
        tensors[fk] = v.contiguous()
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    save_file(tensors, str(path))
    cfg = AEConfig(ch=CH, ch_mult=MULT, num_res_blocks=BLOCKS, z_channels=16)
    params = bagel.convert_vae(Reader([str(path)]), cfg)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
    return ref, cfg, params, images, path, tensors


def _err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_latents_and_reconstructions_match_diffusers(setup):
    ref, cfg, params, images, _, _ = setup
    with torch.no_grad():
        mean = ref.encode(torch.as_tensor(images)).latent_dist.mean
        want_z = (0.3611 * (mean - 0.1159)).numpy().transpose(0, 2, 3, 1)
        want_x = ref.decode(mean).sample.numpy().transpose(0, 2, 3, 1)
    ae = AutoEncoder(cfg)
    got_z = ae.apply({"params": params}, images.transpose(0, 2, 3, 1), method=AutoEncoder.encode)
    got_x = ae.apply({"params": params}, got_z, method=AutoEncoder.decode)
    assert got_z.shape == (2, 16 // cfg.downsample, 24 // cfg.downsample, 16)
    ez, ex = _err(got_z, want_z), _err(got_x, want_x)
    print(f"\n[flux ae] latent max abs err {ez:.3e} (scale {np.abs(want_z).max():.2f}); "
          f"reconstruction max abs err {ex:.3e} (scale {np.abs(want_x).max():.2f})")
    assert ez < 1e-4 and ex < 1e-4


def test_corrupted_ae_names_the_key(setup, tmp_path):
    _, cfg, _, _, _, tensors = setup
    bad = dict(tensors)
    bad["decoder.up.1.upsample.conv.weight"] = bad["decoder.up.1.upsample.conv.weight"][:, :-1].contiguous()
    del bad["encoder.mid.attn_1.q.bias"]
    save_file(bad, str(tmp_path / "ae.safetensors"))
    with pytest.raises(ConversionError) as e:
        bagel.convert_vae(Reader([str(tmp_path / "ae.safetensors")]), cfg)
    assert "encoder.mid.attn_1.q.bias" in str(e.value)
    assert "decoder.up.1.upsample.conv.weight" in str(e.value)
