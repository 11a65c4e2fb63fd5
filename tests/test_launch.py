"""launch/no_tensorflow.py: on an image without TensorFlow, clu's default writer still writes
TensorBoard events (scalars, [N, H, W, C] image batches, texts) through torch."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.reference
def test_clu_writes_events_without_tensorflow(tmp_path):
    pytest.importorskip("torch")  # the stand-in writer is torch's
    # TensorFlow is installed here, so the child hides it: `import tensorflow` then fails the
    # way it does on a GPU image that lacks it.
    code = textwrap.dedent(f"""
        import sys, glob
        sys.modules["tensorflow"] = None
        sys.path.insert(0, {os.path.join(ROOT, "launch")!r})
        import numpy as np
        import no_tensorflow
        assert no_tensorflow.install_clu_torch_writer()
        from clu import metric_writers
        w = metric_writers.create_default_writer({str(tmp_path)!r}, asynchronous=False)
        w.write_scalars(1, {{"loss": 0.5}})
        w.write_images(1, {{"strip": np.zeros((2, 8, 8, 3), np.uint8)}})
        w.write_texts(1, {{"verdict": "plan ok ; image ok"}})
        w.flush(); w.close()
        from tensorboard.backend.event_processing import event_accumulator as ea
        acc = ea.EventAccumulator(glob.glob({str(tmp_path)!r} + "/events.*")[0]); acc.Reload()
        tags = acc.Tags()
        assert "loss" in tags["scalars"], tags
        assert "strip" in tags["images"] or any("strip" in t for t in tags["images"]), tags
        print("ok", tags["images"])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.startswith("ok")


def test_with_tensorflow_the_launcher_changes_nothing():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    try:
        import no_tensorflow
        assert no_tensorflow.install_clu_torch_writer() is False
    finally:
        sys.path.remove(os.path.join(ROOT, "launch"))
