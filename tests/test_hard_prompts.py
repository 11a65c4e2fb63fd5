"""The hard split: 3 to 6 coloured objects, counts, one or two relations, on the 3x3 grid,
phrased in the world's vocabulary and checked exactly by GenEval's rules; training can stop
short of the largest prompts with max_objects."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from strokes_jax.episodes import mixer
from strokes_jax.sequence import tokenizer as tk
from strokes_jax.worlds import detect, grammar, prompts, shapes

H = prompts.HARD_TAG


def _hard(n: int, seed: int = 0, **kw):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        p = prompts.sample_prompt(rng, H, **kw)
        yield p, prompts.sample_scene(rng, p)


def test_hard_prompts_are_in_the_vocabulary_and_checkable_exactly():
    vocab, tok = set(grammar.vocabulary()), tk.Tokenizer.shapes()
    shape_seen = collections.Counter()
    for p, scene in _hard(400):
        inc = p.metadata["include"]
        assert set(p.text.split()) <= vocab, p.text
        tok.encode(p.text)  # the tokenizer refuses a word outside the vocabulary
        assert p.tag == H and 3 <= len(inc) <= 4 and len({c["class"] for c in inc}) == len(inc)
        assert all("color" in c and 1 <= c["count"] <= 4 for c in inc)
        n = prompts.object_count(p)
        rels = [c["position"] for c in inc if "position" in c]
        assert 3 <= n <= 6 and 1 <= len(rels) <= (2 if len(inc) == 4 else 1)
        assert all(tgt < i for i, c in enumerate(inc) if "position" in c for tgt in [c["position"][1]])
        # exact counts: every clause excludes one more
        assert [e["count"] for e in p.metadata["exclude"]] == [c["count"] + 1 for c in inc]
        assert len(scene) == n and prompts.check_scene(scene, p) == (True, "")
        assert detect.check_image(shapes.render(scene), p) == (True, "")
        assert prompts.partial_check(scene, p) == ([], [])
        shape_seen[n] += 1
    assert set(shape_seen) == {3, 4, 5, 6}


def test_the_rules_catch_a_wrong_hard_scene():
    p, scene = next(_hard(1, seed=3))
    inc = p.metadata["include"]
    first = scene[0]
    wrong_colour = [o.replace(color=next(c for c in shapes.COLORS if c != first.color))
                    if o == first else o for o in scene]
    assert not prompts.check_scene(wrong_colour, p)[0]
    assert not prompts.check_scene(scene[:-1], p)[0]  # one object short
    free = shapes.free_cells(scene)[0]
    extra = list(scene) + [scene[0].replace(row=free[0], col=free[1])]
    assert not prompts.check_scene(extra, p)[0], inc  # one too many of a class


def test_max_objects_bounds_training_prompts():
    sizes = {prompts.object_count(p) for p, _ in _hard(200, max_objects=4)}
    assert sizes == {3, 4}
    assert {prompts.object_count(p) for p, _ in _hard(50, max_objects=3)} == {3}
    for bad in (2, 7):
        with pytest.raises(ValueError, match="max_objects"):
            prompts.sample_prompt(np.random.default_rng(0), H, max_objects=bad)


def test_the_six_categories_draw_as_before_whatever_max_objects():
    for tag in shapes.TAGS:
        a, b = np.random.default_rng(1), np.random.default_rng(1)
        pa, pb = prompts.sample_prompt(a, tag), prompts.sample_prompt(b, tag, max_objects=3)
        assert pa == pb and prompts.sample_scene(a, pa) == prompts.sample_scene(b, pb)


@pytest.mark.parametrize("kind", ["additive", "edit", "critique"])
def test_hard_prompts_make_training_episodes(kind):
    for i in range(4):
        e = mixer.make_one(5, i, {kind: 1.0}, tags=(H,))
        assert e.tag == H


def test_data_hard_max_objects_adds_the_category_to_training_and_stays_within_the_rows():
    from strokes_jax.data import shapes_builder
    fits = shapes_builder.fits_within(512, 6)
    eps = list(mixer.generate_episodes(3, 7 * 8, {"additive": 0.5, "critique": 0.5}, fits=fits,
                                       hard_max_objects=4))
    hard = [e for e in eps if e.tag == H]
    assert len(hard) == 8 and {e.tag for e in eps} == set(shapes.TAGS) | {H}
    assert {len(checker_scene(e)) for e in hard} <= {3, 4} and all(fits(e) for e in eps)
    # Without the key the stream is the one it always was.
    plain = list(mixer.generate_episodes(3, 12, {"additive": 1.0}))
    assert [e.prompt for e in plain] == [e.prompt for e in mixer.generate_episodes(3, 12, {"additive": 1.0},
                                                                                   hard_max_objects=0)]


def checker_scene(e):
    from strokes_jax.worlds import checker
    return checker.drawn_scene(e.final_image())


def test_a_hard_bound_the_rows_cannot_hold_is_refused_before_any_data():
    from strokes_jax.configs import schema, shapes_tiny
    from strokes_jax.train import prepare
    c = shapes_tiny.get_config()
    c.data.hard_max_objects = 6
    with pytest.raises(schema.ConfigKeyError, match=r"config key data.hard_max_objects: episode .* "
                                                    r"does not fit data.seq_len"):
        prepare.data_config(c)
    c.data.hard_max_objects = 4
    assert prepare.data_config(c).hard_max_objects == 4 and "_h4" in prepare.data_config(c).name
    c.data.hard_max_objects = 2
    with pytest.raises(schema.ConfigKeyError, match="data.hard_max_objects"):
        schema.check(c)
