"""The report: results JSON, a Markdown score table, and filmstrips (PNG) that show each
episode's stages with their text."""

from __future__ import annotations

import html
import json
import os
import re
import textwrap
from typing import Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from strokes_jax.evaluate import injection, inspection, inspection_probe, intervals
from strokes_jax.worlds import prompts, shapes

SCALE = 4
CAPTION_CHARS = 26


def _clean(text: str) -> str:
    text = re.sub(r"<\|im_start\|>|<\|im_end\|>", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _font(size: int = 11):
    """A real (FreeType) font: Pillow's bundled one where Pillow has FreeType, else DejaVu
    from the system; the bitmap default only as the last resort (it squeezes spaces)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        pass
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default()


def filmstrip(prompt: str, text: str, images: Sequence[np.ndarray], path: str | None,
              title: str = "") -> np.ndarray:
    """One panel per image, captioned with the text written since the previous image, and
    the text that followed the last image (its inspection, the end marker) in a last column
    of text."""
    parts = text.split("<image>")
    captions = [_clean(p) for p in parts]
    if captions:
        captions[0] = _clean(captions[0].replace(prompt, "", 1))
    font = _font()
    line_h = 14
    side = shapes.CANVAS * SCALE
    tail = len(captions) > len(images) and captions[len(images)]
    columns = len(images) + (1 if tail else 0)
    lines = [textwrap.wrap(captions[i] if i < len(captions) else "", CAPTION_CHARS)
             for i in range(columns)]
    cap_h = line_h * max([len(c) for c in lines] + [1]) + 8
    heading = max(font.getlength(title or prompt), font.getlength(prompt)) + 16
    width = max(1, columns) * (side + 8) + 8
    canvas = Image.new("RGB", (int(max(width, heading)), side + cap_h + 44), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title or prompt, fill="black", font=font)
    if title:
        draw.text((8, 20), prompt, fill="black", font=font)
    for i in range(columns):
        x = 8 + i * (side + 8)
        if i < len(images):
            big = Image.fromarray(np.asarray(images[i], np.uint8)).resize((side, side),
                                                                          Image.NEAREST)
            canvas.paste(big, (x, 38))
            top = 42 + side
        else:  # text after the last image: no empty panel, the text starts at the top
            top = 38
        for j, line in enumerate(lines[i]):
            draw.text((x, top + line_h * j), line, fill="black", font=font)
    if path:  # None: the array only (TensorBoard during training); gs:// works too
        with epath.Path(path).open("wb") as f:
            canvas.save(f, format="PNG")
    return np.asarray(canvas)


def has_hard(results) -> bool:
    return any(prompts.HARD_TAG in r["scores"] for r in results)


def score_cells(r: dict, hard: bool) -> list[str]:
    """A summary's score cells: the six categories, overall, and the hard split when the
    table has a hard column; each with its 95% interval where the summary holds one."""
    sc, iv = r["scores"], r.get("intervals") or {}
    tags = list(shapes.TAGS) + ["overall"] + ([prompts.HARD_TAG] if hard else [])
    return [intervals.fmt(sc.get(t), iv.get(t), 3 if t == "overall" else 2) for t in tags]


def score_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per mode, GenEval's six tags, overall, the hard split (when
    scored; never part of overall), NFE."""
    hard = has_hard(results.values())
    tags = list(shapes.TAGS) + ["overall"] + ([prompts.HARD_TAG] if hard else [])
    head = ("| mode | " + " | ".join(tags)
            + " | NFE/image | NFE/sample | evals/sample | images/sample | well-formed |")
    sep = "|" + "---|" * (len(tags) + 6)
    rows = [head, sep]
    for mode, r in results.items():
        rows.append(f"| {mode} | " + " | ".join(score_cells(r, hard)) + f" | {r['nfe_per_image']:.1f} | "
                    f"{r['nfe_per_sample']:.1f} | {r.get('evals_per_sample', float('nan')):.1f} | "
                    f"{r['images_per_sample']:.2f} | {r['well_formed']:.2f} |")
    return "\n".join(rows)


def interval_note(results: dict[str, dict]) -> str:
    """What the brackets and the hard column mean, and the hard split by object count; ends
    in a space when not empty, to sit before the next sentence."""
    boot = next((r["bootstrap"] for r in results.values() if r.get("bootstrap")), None)
    out = []
    if boot:
        out.append(f"Brackets: {boot['level']:.0%} bootstrap intervals over prompts "
                   f"({boot['resamples']} resamples, prompts resampled with replacement within "
                   f"each category, each keeping all its images; percentile intervals).")
    if has_hard(results.values()):
        out.append(f"`hard` is the harder split ({prompts.HARD_MIN_OBJECTS} to "
                   f"{prompts.HARD_MAX_OBJECTS} coloured objects over 3 or 4 shapes, counts, "
                   f"one or two relations), scored apart and not part of overall.")
        for mode, r in results.items():
            by = (r.get("hard") or {}).get("by_objects")
            if by:
                out.append(f"Hard split by objects asked for, {mode}: " + ", ".join(
                    f"{k}: {intervals.fmt(v[0], v[1:3])} ({plural(v[3], 'prompt')})"
                    for k, v in by.items()) + ".")
    return " ".join(out) + " " if out else ""


def write(workdir: str, payload: dict, strips: Sequence[tuple[str, str, str, Sequence[np.ndarray]]]):
    """payload: JSON-able results; strips: (name, prompt, text, images). Returns the report
    path and the rendered filmstrips by name."""
    out = os.path.join(workdir, "report")
    epath.Path(out, "filmstrips").mkdir(parents=True, exist_ok=True)
    names, rendered = [], {}
    for name, prompt, text, images in strips:
        fname = os.path.join("filmstrips", f"{name}.png")
        rendered[name] = filmstrip(prompt, text, images, os.path.join(out, fname), title=name)
        names.append(fname)
    epath.Path(out, "results.json").write_text(json.dumps(payload, indent=1, default=str))
    tr = payload.get("train", {})
    losses = tr.get("losses", [])
    data = payload.get("config", {}).get("data", {})
    # A model trained on no critique never says "wrong": its misses are by construction.
    no_critiques = (not data.get("mix", {}).get("critique") and not data.get("extra_sources"))
    critique_note = (" The training mix held no critiques, so the model was never taught to call a"
                     " step wrong: every verdict is ok and every wrong step counts as a miss."
                     if no_critiques else "")
    md = ["# Shapes-GenEval report", "",
          f"commit `{payload['commit']}`, config `{payload['config_name']}`, device "
          f"{payload['device']['device_kind']} x{payload['device']['device_count']} "
          f"({payload['device']['cpu_count']} CPU cores)", "",
          score_table(payload["results"]), "",
          f"Scores are the fraction of images that pass GenEval's rules on the exact detector; "
          f"overall is the plain mean of the six categories. {interval_note(payload['results'])}"
          f"{plural(payload['bench']['prompts'], 'prompt')}"
          f" x {plural(payload['bench']['images_per_prompt'], 'image')} per mode; flow steps per image "
          f"{payload['bench']['flow_steps']}; iteration cap {payload['bench']['max_iterations']}.", "",
          *[f"Inspection, {m}: {inspection.line(r['inspection'])}.{critique_note}\n"
            for m, r in payload["results"].items() if r.get("inspection")],
          *[f"Inspection, {m}, {inspection_probe.line(r['inspection_probe'])}.\n"
            for m, r in payload["results"].items() if r.get("inspection_probe")],
          *[f"Inspection, {m}, {injection.line(r['injection'])}.\n"
            for m, r in payload["results"].items() if r.get("injection")],
          f"Training: {tr.get('params', '?')} parameters, steps {tr.get('start_step', 0)} -> "
          f"{tr.get('end_step', '?')} in {tr.get('train_seconds', 0):.0f}s; "
          f"loss by step: {', '.join(f'{s}:{v:.3f}' for s, v in losses[::max(1, len(losses) // 8)])}.",
          "", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in payload.get("timings", {}).items()),
          "", "## Filmstrips", ""]
    md += [f"![{n}]({n})" for n in names]
    path = os.path.join(out, "report.md")
    epath.Path(path).write_text("\n".join(md) + "\n")
    epath.Path(out, "report.html").write_text(to_html(md))
    return path, rendered


def _code(escaped: str) -> str:
    """Markdown `code` spans as <code> (the text is already HTML-escaped)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def to_html(md_lines: Sequence[str]) -> str:
    """The Markdown report as a standalone HTML page (tables, images, paragraphs)."""
    body, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-")]
            cells = [[_code(html.escape(c.strip())) for c in r.strip("|").split("|")] for r in rows]
            body.append("<table>" + "".join(
                "<tr>" + "".join(f"<{t}>{c}</{t}>" for c in row) + "</tr>"
                for t, row in zip(["th"] + ["td"] * (len(cells) - 1), cells)) + "</table>")
            table.clear()

    # An element may hold several lines (the score table is one string): split them, or
    # the whole table lands in one row.
    for line in (ln for item in md_lines for ln in item.split("\n")):
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1:-1]
            body.append(f'<p><img src="{html.escape(src)}" alt="{html.escape(src)}"></p>')
        elif line:
            body.append(f"<p>{_code(html.escape(line))}</p>")
    flush()
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #999;padding:4px 8px;text-align:right}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Shapes-GenEval report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
