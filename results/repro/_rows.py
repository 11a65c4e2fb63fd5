"""Shared by the results/repro scripts: ROW=WORKDIR[=LABEL] arguments -> restored rows."""
import sys

from absl import flags

flags.FLAGS(["x"])  # absl flags must be parsed before the package's modules read them
sys.path.insert(0, ".")

from configs import shapes_repro  # noqa: E402
from strokes_jax.evaluate import reproduce  # noqa: E402
from strokes_jax.train import loop  # noqa: E402


def restored(args, variant=None):
    """For each ROW=WORKDIR[=LABEL]: (label, workdir, row config, setup, restore info), with
    the newest checkpoint of WORKDIR restored. `variant` is the shapes_repro variant whose
    evaluation settings apply (the model is the same in every variant)."""
    for arg in args:
        row, wd, *label = arg.split("=")
        c = reproduce.row_config(shapes_repro.get_config(variant), row)
        setup, info = loop.restore_for_eval(c, wd)
        yield (label[0] if label else row), wd, c, setup, info
