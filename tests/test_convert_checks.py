"""The BAGEL converter's checks on what it reads and where it writes, on small synthetic
checkpoints with BAGEL's key names (bagel7b_process:test shapes): a NaN or a non-float tensor
is refused naming its key and file (unless allowed), an existing --out is refused before
anything is read, --overwrite replaces it, and the command's errors are one line, exit 2.
Needs only safetensors (no torch)."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

from strokes_jax.configs import bagel7b_process
from strokes_jax.convert import bagel, keymap
from strokes_jax.convert.cli import configs_of, main as convert_main
from strokes_jax.convert.keymap import ConversionError, Reader
from strokes_jax.model import counts

safetensors_numpy = pytest.importorskip("safetensors.numpy")

CONFIG = f"{bagel7b_process.__file__}:test"
NAN_KEY = "language_model.model.layers.1.mlp_moe_gen.down_proj.weight"


@pytest.fixture(scope="module")
def cfgs():
    return configs_of(bagel7b_process.get_config("test"))


@pytest.fixture(scope="module")
def tensors(cfgs):
    """BAGEL-named source tensors (float32) for the test config: random values at the model's
    param shapes, exported through the inverse key map, plus the fixed sin-cos tables. Shapes
    come from eval_shape, so nothing is initialised or compiled."""
    cfg, ae_cfg = cfgs
    rng = np.random.default_rng(0)
    fill = lambda tree: jax.tree_util.tree_map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), tree)
    rules, _ = bagel.model_rules(cfg)
    ema = keymap.export(fill(counts.abstract_params(cfg)), rules, bagel.decoder_stacking(cfg))
    for t in bagel.fixed_tables(cfg):
        ema[t.src] = t.value
    ae = keymap.export(fill(counts.abstract_vae_params(ae_cfg)), bagel.vae_rules(ae_cfg))
    return ema, ae


def _write(d, ema, ae):
    """bfloat16 (as BAGEL ships) unless a tensor is meant to be of another dtype."""
    store = lambda t: {k: np.ascontiguousarray(v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v)
                       for k, v in t.items()}
    d.mkdir(exist_ok=True)
    safetensors_numpy.save_file(store(ema), str(d / "ema.safetensors"))
    safetensors_numpy.save_file(store(ae), str(d / "ae.safetensors"))
    return d / "ema.safetensors", d / "ae.safetensors"


def _cli(ema, ae, out, *extra):
    return convert_main(["bagel", "--ema", str(ema), "--ae", str(ae), "--out", str(out), "--config", CONFIG,
                         *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def reads(monkeypatch):
    """Every tensor read and every file opened by a Reader, in order."""
    got = []
    init, get = Reader.__init__, Reader.get
    monkeypatch.setattr(Reader, "__init__", lambda self, files: (got.append(("open", list(files))),
                                                                 init(self, files))[1])
    monkeypatch.setattr(Reader, "get", lambda self, k: (got.append(("get", k)), get(self, k))[1])
    return got


def _with_nan(ema):
    """The checkpoint's tensors with one NaN in NAN_KEY (the others shared, not copied)."""
    bad = dict(ema)
    bad[NAN_KEY] = ema[NAN_KEY].copy()
    bad[NAN_KEY][3, 1] = np.nan
    return bad


def test_nan_in_a_decoder_tensor_is_refused_naming_its_key(tensors, tmp_path, capsys):
    ema, ae = tensors
    bad = _with_nan(ema)
    ema_path, ae_path = _write(tmp_path / "src", bad, ae)
    out = tmp_path / "out"
    assert _cli(ema_path, ae_path, out) == 2
    line = _one_error_line(capsys)
    assert repr(NAN_KEY) in line and str(ema_path) in line and "--allow_nonfinite" in line
    assert not out.exists()
    # The library raises the same, and so does an inf in the VAE.
    cfg, ae_cfg = configs_of(bagel7b_process.get_config("test"))
    with pytest.raises(ConversionError, match=NAN_KEY):
        bagel.convert_model(Reader([str(ema_path)]), cfg)
    key = "decoder.up.0.block.1.conv2.weight"
    bad_ae = dict(ae)
    bad_ae[key] = ae[key].copy()
    bad_ae[key].reshape(-1)[-1] = -np.inf
    _, ae_path = _write(tmp_path / "src_ae", ema, bad_ae)
    with pytest.raises(ConversionError, match=f"{key}' in {ae_path}"):
        bagel.convert_vae(Reader([str(ae_path)]), ae_cfg)


def test_nan_converts_with_allow_nonfinite(cfgs, tensors, tmp_path):
    cfg, _ = cfgs
    ema, ae = tensors
    bad = _with_nan(ema)
    ema_path, ae_path = _write(tmp_path / "src", bad, ae)
    out = tmp_path / "out"
    assert _cli(ema_path, ae_path, out, "--allow_nonfinite") == 0
    got = bagel.load_converted(str(out))
    rule = next(r for r in bagel.model_rules(cfg)[0] if r.src == NAN_KEY)
    w = np.asarray(keymap._fetch(got["model"], rule.dst, bagel.decoder_stacking(cfg)))
    assert np.isnan(w[1, 3]) and np.isfinite(w).sum() == w.size - 1  # the kernel is the transpose


@pytest.mark.parametrize("where", ["ema", "ae"])
def test_int32_tensor_is_refused_naming_its_key_before_any_read(tensors, tmp_path, capsys, reads, where):
    ema, ae = (dict(t) for t in tensors)
    src, key = ((ema, "language_model.model.layers.0.self_attn.q_proj.weight") if where == "ema"
                else (ae, "encoder.conv_in.weight"))
    src[key] = np.zeros(src[key].shape, np.int32)
    ema_path, ae_path = _write(tmp_path / "src", ema, ae)
    assert _cli(ema_path, ae_path, tmp_path / "out") == 2
    line = _one_error_line(capsys)
    assert repr(key) in line and str(ema_path if where == "ema" else ae_path) in line
    assert "int32" in line and "--allow_dtype" in line
    assert [k for op, k in reads if op == "get"] == []  # found from the header alone


def test_int32_tensor_is_refused_when_read(tensors):
    """A reader that cannot tell dtypes from a header is still checked, tensor by tensor."""
    ema, _ = tensors
    key = "connector.fc1.bias"
    rules = [r for r in bagel.model_rules(configs_of(bagel7b_process.get_config("test"))[0])[0]
             if r.src.startswith("connector.")]
    bad = {r.src: ema[r.src] for r in rules}
    bad[key] = bad[key].astype(np.int32)

    class NoHeader:
        keys = lambda self: list(bad)
        shape = lambda self, k: bad[k].shape
        get = lambda self, k: bad[k]

    with pytest.raises(ConversionError, match=f"key '{key}' has dtype int32"):
        keymap.convert(NoHeader(), rules)
    out = keymap.convert(NoHeader(), rules, allow_dtype=True, dtype=np.float32)
    assert out["vision"]["connector"]["fc1"]["bias"].dtype == np.float32


def test_existing_out_is_refused_before_anything_is_read(tmp_path, capsys, reads):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # The sources need not even exist: nothing is opened.
    assert _cli(tmp_path / "missing_ema.safetensors", tmp_path / "missing_ae.safetensors", out) == 2
    assert _one_error_line(capsys) == f"error: --out {out}: exists; pass --overwrite to replace it"
    assert reads == [] and (out / "keep.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_it_did_not_write(tensors, tmp_path, capsys, reads):
    ema_path, ae_path = _write(tmp_path / "src", *tensors)
    out = tmp_path / "out"
    out.mkdir()
    (out / "conversion.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    assert _cli(ema_path, ae_path, out, "--overwrite") == 2
    line = _one_error_line(capsys)
    assert "notes.txt" in line and "not replacing it" in line
    assert reads == [] and (out / "notes.txt").exists()


def test_missing_source_is_one_line(tensors, tmp_path, capsys):
    _, ae_path = _write(tmp_path / "src", *tensors)
    missing = tmp_path / "nope.safetensors"
    assert _cli(missing, ae_path, tmp_path / "out") == 2
    assert str(missing) in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_a_previous_conversion(cfgs, tensors, tmp_path, capsys):
    cfg, _ = cfgs
    ema, ae = tensors
    ema_path, ae_path = _write(tmp_path / "src", ema, ae)
    out = tmp_path / "out"
    out.mkdir()  # a previous conversion's leftovers, including an interrupted Orbax save
    (out / "conversion.json").write_text('{"stale": true}')
    (out / "params").mkdir()
    (out / "params" / "junk").write_text("x")
    (out / "params.orbax-checkpoint-tmp-1").mkdir()
    # A source refused under --overwrite leaves the old folder as it was.
    bad = dict(ema, **{NAN_KEY: np.full(ema[NAN_KEY].shape, np.inf, np.float32)})
    bad_ema, _ = _write(tmp_path / "bad", bad, ae)
    assert _cli(bad_ema, ae_path, out, "--overwrite") == 2
    assert NAN_KEY in _one_error_line(capsys) and (out / "params" / "junk").exists()

    assert _cli(ema_path, ae_path, out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["conversion.json", "params"]
    assert not (out / "params" / "junk").exists() and "stale" not in (out / "conversion.json").read_text()
    got = bagel.load_converted(str(out))
    rule = next(r for r in bagel.model_rules(cfg)[0] if r.src == NAN_KEY)
    want = keymap.LINEAR.forward(ema[NAN_KEY].astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(keymap._fetch(got["model"], rule.dst, bagel.decoder_stacking(cfg)), want)


def test_nonfinite_count_is_chunked():
    x = np.zeros(keymap._FINITE_CHUNK * 2 + 5, ml_dtypes.bfloat16)
    x[[0, keymap._FINITE_CHUNK, x.size - 1]] = [np.nan, np.inf, -np.inf]
    assert keymap.nonfinite_count(x) == 3
    assert keymap.nonfinite_count(np.arange(4, dtype=np.int32)) == 0
