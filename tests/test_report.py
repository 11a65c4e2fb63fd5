"""Report pieces a reader sees: filmstrips in a real font without empty panels, picks that
cover every category, Markdown code spans and plurals in the HTML."""

from __future__ import annotations

import types

import numpy as np
from PIL import ImageFont

from strokes_jax.evaluate import job, report
from strokes_jax.worlds import shapes


def test_filmstrip_font_is_a_real_font():
    assert isinstance(report._font(), ImageFont.FreeTypeFont)


def test_filmstrip_text_after_the_last_image_is_a_text_column():
    img = np.full((shapes.CANVAS, shapes.CANVAS, 3), 255, np.uint8)
    img[:8, :8] = (255, 0, 0)
    text = ("a photo of a red square <ins> add red square at r0 c0 </ins> <image> "
            "<inspect> plan ok ; image ok </inspect> <|endofepisode|>")
    strip = report.filmstrip("a photo of a red square", text, [img], None, title="t")
    side = shapes.CANVAS * report.SCALE
    assert strip.shape[1] >= 2 * (side + 8)  # one image column, one text column
    text_col = strip[38:38 + side, 8 + side + 8:8 + 2 * side + 8]
    assert (text_col < 128).any()  # the inspection text is drawn there
    grey = (strip == 128).all(axis=-1)
    assert not (grey.sum(axis=1) > side // 2).any()  # no outlined empty panel


def test_filmstrip_picks_cover_every_category():
    samples = [types.SimpleNamespace(tag=t, i=i) for t in shapes.TAGS for i in range(6)]
    picks = job.filmstrip_picks(samples, 12)
    assert [p.tag for p in picks[:6]] == list(shapes.TAGS)
    assert len(picks) == 12 and {p.tag for p in picks[6:]} == set(shapes.TAGS)


def test_html_renders_code_spans_and_plurals():
    page = report.to_html(["commit `abc`, config `shapes_tiny.py`", "| a | b |", "|---|---|",
                           "| `x` | 1 |"])
    assert "`" not in page and "<code>abc</code>" in page and "<td><code>x</code></td>" in page
    assert report.plural(1, "image") == "1 image" and report.plural(2, "image") == "2 images"
