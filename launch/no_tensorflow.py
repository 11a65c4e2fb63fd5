"""Run `python -m strokes_jax ...` on an accelerator image that has PyTorch but no TensorFlow.

    python launch/no_tensorflow.py reproduce --config shapes_repro --workdir DIR

CUDA images often ship JAX and PyTorch without TensorFlow, and tensorflow-cpu (260 MB) plus
its dependencies is too big to carry. Two imports need it:
- `clu.metric_writers` imports its TF summary writer unconditionally. Here that module is
  registered as clu's own PyTorch TensorBoard writer, so events still land in TensorBoard
  files (scalars, images, hparams), written by `torch.utils.tensorboard`.
- TFDS prepares and reads ArrayRecord datasets without TF (its documented TF-less mode).
With TensorFlow installed this does nothing but call the usual entry point.
"""

from __future__ import annotations

import os
import sys
import types


def install_clu_torch_writer() -> bool:
    """Route clu's `SummaryWriter` to `TorchTensorboardWriter` when TF is missing."""
    try:
        import tensorflow  # noqa: F401
        return False
    except ImportError:
        pass
    name = "clu.metric_writers.summary_writer"
    mod = types.ModuleType(name)

    class SummaryWriter:  # clu.metric_writers.__init__ imports this before the torch writer exists
        def __new__(cls, logdir, *args, **kwargs):
            return _torch_writer_class()(os.fspath(logdir))

    mod.SummaryWriter = SummaryWriter
    sys.modules[name] = mod
    return True


def _torch_writer_class():
    from clu.metric_writers.torch_tensorboard_writer import TorchTensorboardWriter

    class _Writer(TorchTensorboardWriter):
        # clu's interface hands images as [N, H, W, C] batches; its torch writer declares them
        # HWC, which torch rejects. Texts it refuses outright; the eval job writes some.
        def write_images(self, step, images):
            for key, value in images.items():
                self._writer.add_images(key, value, global_step=step, dataformats="NHWC")

        def write_texts(self, step, texts):
            for key, value in texts.items():
                self._writer.add_text(key, value, global_step=step)

    return _Writer


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)  # strokes_jax/ from a checkout, installed or not
    if install_clu_torch_writer():
        print("no TensorFlow: clu writes TensorBoard events through torch.utils.tensorboard",
              flush=True)
    from strokes_jax.__main__ import run
    sys.argv[0] = "strokes_jax"
    run()


if __name__ == "__main__":
    main()
