"""Shared test settings: markers are declared in pyproject.toml; tests import the installed
package (no sys.path changes)."""

import pytest

from strokes_jax.episodes import mixer
from strokes_jax.sequence import tokenizer as tk
from strokes_jax.worlds import shapes


@pytest.fixture(scope="module")
def etok():
    """The shapes world's episode tokenizer (6-pixel patches)."""
    return tk.EpisodeTokenizer(tk.Tokenizer.shapes(), (shapes.CANVAS, shapes.CANVAS, 3), 6)


@pytest.fixture(scope="module")
def ref():
    """One additive shapes episode, the reference an Oracle model paints."""
    return next(iter(mixer.generate_episodes(5, 1, {"additive": 1.0})))
