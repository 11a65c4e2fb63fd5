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


def _bucket(tmp_path):
    """etils.epath with gs://bucket/ served from a local folder: a stand-in for a bucket."""
    from etils.epath import testing

    def local(path):
        p = str(path)
        return str(tmp_path / "bucket" / p[len("gs://bucket/"):]) if p.startswith("gs://bucket/") else p

    def route(fn, path, *args, **kw):
        return fn(local(path), *args, **kw)

    def route2(fn, src, dst, *args, **kw):
        return fn(local(src), local(dst), *args, **kw)
    import contextlib
    from unittest import mock

    from etils.epath import gpath
    stack = contextlib.ExitStack()
    # With TensorFlow installed epath sends gs:// to tf.io.gfile, past the mockable table.
    stack.enter_context(mock.patch.object(gpath, "_is_tf_installed", lambda: False))
    stack.enter_context(testing.mock_epath(
        open=route, exists=route, isdir=route, makedirs=route, mkdir=route, listdir=route,
        glob=route, remove=route, rmtree=route, stat=route, rename=route2, replace=route2,
        copy=route2))
    return stack


def test_the_report_writes_to_a_bucket_workdir(tmp_path):
    """A gs:// workdir: the report, its JSON and its filmstrips go through etils.epath."""
    import json
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    payload = json.load(open(os.path.join(here, "..", "results", "images", "results.json")))
    img = np.zeros((shapes.CANVAS, shapes.CANVAS, 3), np.uint8)
    with _bucket(tmp_path):
        path, rendered = report.write("gs://bucket/run", payload,
                                      [("00_demo", "a photo of a cat", "<image> text", [img])])
    assert path == "gs://bucket/run/report/report.md" and "00_demo" in rendered
    out = tmp_path / "bucket" / "run" / "report"
    assert "Shapes-GenEval report" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["config_name"] == payload["config_name"]
    assert (out / "report.html").exists() and (out / "filmstrips" / "00_demo.png").stat().st_size > 0
    assert not os.path.exists("gs:")  # nothing landed in a local folder named after the URL
