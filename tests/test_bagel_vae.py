"""Our FLUX autoencoder vs `diffusers`' AutoencoderKL with FLUX settings (no quant convs, 16
latent channels, GroupNorm(32, 1e-6), mid attention) on tiny channels, float32 on CPU.

`convert bagel` reads the ORIGINAL FLUX names of `ae.safetensors`, so the reference's tensors
are saved under them through the converter's own FLUX -> diffusers name map (hf.diffusers_name,
which `convert flux-ae` uses); `convert flux-ae` reads the folder diffusers' save_pretrained
writes, config.json included. Run with -s to see the measured errors.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytestmark = pytest.mark.reference
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

from strokes_jax.convert import bagel, hf, keymap  # noqa: E402
from strokes_jax.convert.keymap import ConversionError, Reader  # noqa: E402
from strokes_jax.convert.output import load_converted  # noqa: E402
from strokes_jax.model.vae import AEConfig, AutoEncoder  # noqa: E402

CH, MULT, BLOCKS = 32, (1, 1, 2), 1
LEVELS = len(MULT)


def _reference(ch=CH, mult=MULT, groups=32, seed=0):
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(mult),
        up_block_types=("UpDecoderBlock2D",) * len(mult),
        block_out_channels=tuple(ch * m for m in mult), layers_per_block=BLOCKS,
        latent_channels=16, norm_num_groups=groups, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159, mid_block_add_attention=True).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return ref


def _encode_decode(ref, cfg, params, images):
    with torch.no_grad():
        mean = ref.encode(torch.as_tensor(images)).latent_dist.mean
        want_z = (0.3611 * (mean - 0.1159)).numpy().transpose(0, 2, 3, 1)
        want_x = ref.decode(mean).sample.numpy().transpose(0, 2, 3, 1)
    ae = AutoEncoder(cfg)
    got_z = ae.apply({"params": params}, images.transpose(0, 2, 3, 1), method=AutoEncoder.encode)
    got_x = ae.apply({"params": params}, got_z, method=AutoEncoder.decode)
    assert got_z.shape == (2, 16 // cfg.downsample, 24 // cfg.downsample, 16)
    return (_err(got_z, want_z), np.abs(want_z).max()), (_err(got_x, want_x), np.abs(want_x).max())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = _reference()
    cfg = AEConfig(ch=CH, ch_mult=MULT, num_res_blocks=BLOCKS, z_channels=16)
    flux_name = {hf.diffusers_name(r.src, LEVELS): r.src for r in bagel.vae_rules(cfg)}
    tensors = {}
    for k, v in ref.state_dict().items():
        fk = flux_name[k]
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", fk):
            v = v[:, :, None, None]  # FLUX stores the attention projections as 1x1 convs
        tensors[fk] = v.contiguous()
    assert set(tensors) == set(flux_name.values())
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    save_file(tensors, str(path))
    params = bagel.convert_vae(Reader([str(path)]), cfg)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
    return ref, cfg, params, images, path, tensors


def _err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_latents_and_reconstructions_match_diffusers(setup):
    ref, cfg, params, images, _, _ = setup
    (ez, sz), (ex, sx) = _encode_decode(ref, cfg, params, images)
    print(f"\n[flux ae] latent max abs err {ez:.3e} (scale {sz:.2f}); reconstruction max abs err {ex:.3e} "
          f"(scale {sx:.2f})")
    assert ez < 1e-4 and ex < 1e-4


def test_convert_flux_ae_reads_the_diffusers_folder(setup, tmp_path):
    """The same weights through `convert flux-ae` (diffusers names, Linear attention projections)
    give exactly what ae.safetensors gives."""
    ref, cfg, params, images, _, _ = setup
    ref.save_pretrained(tmp_path / "vae")
    hf.convert_flux_ae(str(tmp_path / "vae"), str(tmp_path / "out"), cfg, progress=None)
    got = load_converted(str(tmp_path / "out"))["vae"]
    want = keymap.flat_paths(params)
    assert keymap.flat_paths(got).keys() == want.keys()
    for p, w in want.items():
        np.testing.assert_array_equal(keymap.flat_paths(got)[p], w, err_msg="/".join(p))


def test_convert_flux_ae_takes_groups_and_channels_from_config_json(tmp_path):
    """GroupNorm(8) on 16 channels: read from config.json the conversion agrees with diffusers;
    told FLUX's 32 groups, it refuses naming norm_num_groups."""
    ref = _reference(ch=16, mult=(1, 2), groups=8, seed=1)
    ref.save_pretrained(tmp_path / "vae")
    hf.convert_flux_ae(str(tmp_path / "vae"), str(tmp_path / "out"), progress=None)
    cfg = AEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=BLOCKS, z_channels=16, groups=8)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
    (ez, _), (ex, _) = _encode_decode(ref, cfg, load_converted(str(tmp_path / "out"))["vae"], images)
    print(f"\n[flux ae, 8 groups, via config.json] latent err {ez:.3e}, reconstruction err {ex:.3e}")
    assert ez < 1e-4 and ex < 1e-4
    with pytest.raises(ConversionError, match=r"norm_num_groups=8 gives vae\.groups=8, but the config has 32"):
        hf.convert_flux_ae(str(tmp_path / "vae"), str(tmp_path / "out2"), AEConfig(ch=16, ch_mult=(1, 2),
                                                                                  num_res_blocks=BLOCKS))


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
