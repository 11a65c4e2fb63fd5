"""The memory plan printed before compiling agrees with XLA's own buffer assignment
(`compiled.memory_analysis()`, CPU compile of abstract shapes) within 20%, for scanned and
unscanned stacks, remat policies and freezing choices; the state's part exactly."""

import jax
import pytest

from strokes_jax.configs import bagel7b_process, shapes_tiny
from strokes_jax.train import memory


def _config(name, seq_len, remat, scan, freeze=()):
    c = (bagel7b_process if name == "bagel" else shapes_tiny).get_config("test")
    c.data.update(seq_len=seq_len, batch_size=2)
    c.model.update(remat=remat, scan_layers=scan)
    c.train.update(sparse_routing=(), freeze=freeze)
    c.mesh.shape = (1, 1, 1)
    if name == "bagel":
        c.model.latent_grid = (4, 4)
    return c


@pytest.mark.slow
@pytest.mark.parametrize("name,seq_len,remat,scan,freeze", [
    ("bagel", 512, "full", True, ()),
    ("bagel", 256, "none", True, ()),
    ("bagel", 512, "dots", True, ()),
    ("bagel", 512, "full", True, ("vit", "und", "embeddings")),
    ("shapes", 512, "full", False, ()),
])
def test_plan_agrees_with_xla(name, seq_len, remat, scan, freeze):
    c = _config(name, seq_len, remat, scan, freeze)
    mc = memory.model_config_of(c)
    p = memory.plan(c, mc, 1)
    m = memory.compiled(c, mc, jax.devices()[:1])
    state = p.params + p.ema + p.optimizer + p.batch
    assert abs(state - m["arguments"]) < 0.02 * m["arguments"], (state, m)
    assert 0.8 < p.total / m["peak"] < 1.2, (p, m)
    assert m["xla_flops"] > 0  # XLA's count of the same compiled step, for the FLOP accounting


def test_freezing_removes_optimizer_state_and_gradients():
    c = _config("bagel", 128, "full", True)
    mc = memory.model_config_of(c)
    full = memory.plan(c, mc, 1, ())
    frozen = memory.plan(c, mc, 1, ("und", "embeddings"))
    assert frozen.params == full.params
    assert frozen.optimizer < 0.7 * full.optimizer and frozen.grads < 0.7 * full.grads
    assert abs(full.optimizer - 2 * full.params) < 64  # two moments (+ step counts)


@pytest.mark.slow
def test_the_plan_splits_over_the_mesh():
    c = bagel7b_process.get_config("gpu8")
    mc = memory.model_config_of(c)
    eight = memory.plan(c, mc, 8)
    assert 14e9 < eight.params * 8 / 4 < 15e9  # BAGEL-7B-MoT: 14B float32 parameters
    c.mesh.shape = (8, 1, 1)  # data parallel: every device holds everything
    rep = memory.plan(c, mc, 8)
    assert 7.5 < rep.params / eight.params <= 8.0
    text = memory.report(bagel7b_process.get_config("gpu8"), 8, "h100")
    assert "fits 80 GB" in text and "vit,und,embeddings" in text


def test_device_names():
    assert memory.device_gb("h100") == 80 and memory.device_gb("24") == 24
    with pytest.raises(ValueError, match="--device tpu9"):
        memory.device_gb("tpu9")
