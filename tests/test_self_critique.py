"""Self-sampled critiques: generated traces are inspected by the exact checker on both sides
and become positive or negative episodes; the model's own drawings are context only."""

import dataclasses

import numpy as np
import pytest

from strokes_jax.episodes import episode as ep
from strokes_jax.sequence import tokenizer as tk
from strokes_jax.episodes import self_critique as sc
from strokes_jax.episodes import trajectories
from strokes_jax.inference.generator import Generated
from strokes_jax.worlds import checker, grammar, prompts, shapes
from strokes_jax.sequence import layout


def _trace(tag, seed=0):
    rng = np.random.default_rng(seed)
    p = prompts.sample_prompt(rng, tag)
    scene = prompts.sample_scene(rng, p)
    e = trajectories.make_episode("ref", p, trajectories.additive_steps(scene), "additive")
    return p, scene, e


def _gen(e, prompt):
    return Generated(prompt.text, "process", "", e.images(), 0, e, None, False)


def test_a_correct_trace_is_a_positive_episode():
    p, scene, e = _trace("color_attr")
    out, what = sc.critique_trace(_gen(e, p), p, "x")
    assert what == "positive"
    assert len(out.steps) == len(e.steps)
    assert all(s.inspect == "plan ok ; image ok" and not s.sketch_target for s in out.steps)


def test_a_wrongly_drawn_step_gets_an_image_side_critique():
    p, scene, e = _trace("color_attr", 1)
    first = scene[0]
    wrong = first.replace(color=next(c for c in shapes.COLORS if c != first.color))
    e.steps[0].sketch = shapes.render((wrong,))
    out, what = sc.critique_trace(_gen(e, p), p, "x")
    assert what == "negative"
    v = grammar.parse_verdict(out.steps[0].inspect)
    assert v.plan_issue is None and v.image_issue.kind == "color"
    cmd = grammar.parse_command(out.steps[0].refine)
    assert cmd.op == "recolour" and cmd.apply((wrong,)) == (first,)
    np.testing.assert_array_equal(out.steps[0].refined, shapes.render((first,)))
    final = grammar.parse_description(out.steps[-1].des)
    assert prompts.check_scene(final, p)[0]
    assert out.steps[0].sketch_target is False and all(s.sketch_target for s in out.steps[1:])


def test_a_plan_that_contradicts_the_prompt_gets_a_text_side_critique():
    p, scene, e = _trace("colors", 2)
    (obj,) = scene
    wrong = obj.replace(color=next(c for c in shapes.COLORS if c != obj.color))
    e.steps[0] = ep.Step(sketch=shapes.render((wrong,)), ins=f"add {grammar.obj_words(wrong)}",
                         des=grammar.describe((wrong,)), inspect="plan ok ; image ok")
    out, what = sc.critique_trace(_gen(e, p), p, "x")
    assert what == "negative"
    v = grammar.parse_verdict(out.steps[0].inspect)
    assert v.image_issue is None and v.plan_issue.kind == "color" and v.plan_issue.color == obj.color
    assert grammar.parse_command(out.steps[0].refine).apply((wrong,)) == (obj,)


@pytest.mark.parametrize("kind", ["missing", "extra", "place"])
def test_image_issue_kinds(kind):
    a = shapes.Obj("square", "red", 0, 0)
    b = shapes.Obj("circle", "blue", 1, 1)
    planned = (a, b)
    drawn = {"missing": (a,), "extra": (a, b, shapes.Obj("cross", "green", 2, 2)),
             "place": (a, b.replace(row=2, col=0))}[kind]
    issue, cmd = checker.image_issue(drawn, planned)
    assert issue.kind == kind
    assert set(cmd.apply(drawn)) == set(planned)


def test_unusable_traces_are_counted_not_kept():
    p, scene, e = _trace("two_object", 3)
    bad = dataclasses.replace(e, steps=[dataclasses.replace(e.steps[0], des="red square at")])
    gens = [(_gen(e, p), p), (_gen(bad, p), p),
            (Generated(p.text, "process", "", [], 0, None, "malformed", False), p)]
    out, counts = sc.critiques(gens, "t")
    assert counts == {"positive": 1, "unparseable": 1, "malformed": 1}
    assert len(out) == 1


def test_context_only_sketches_carry_no_flow_loss_and_round_trip():
    p, scene, e = _trace("counting", 4)
    out, what = sc.critique_trace(_gen(e, p), p, "x")
    etok = tk.EpisodeTokenizer(tk.Tokenizer.shapes(), (shapes.CANVAS, shapes.CANVAS, 3), 6)
    arr = etok(out)
    assert np.sum(arr["types"] == layout.NOISY) == 0  # every sketch is the model's own: context
    assert np.sum(arr["types"] == layout.CLEAN) == 36 * len(out.steps)
    back = ep.Episode.from_bytes(out.to_bytes())
    assert [s.sketch_target for s in back.steps] == [False] * len(out.steps)
    assert back.to_bytes() == out.to_bytes()


def _negative_image(seed):
    p, scene, e = _trace("color_attr", seed)
    first = scene[0]
    e.steps[0].sketch = shapes.render((first.replace(color=next(c for c in shapes.COLORS
                                                               if c != first.color)),))
    return sc.critique_trace(_gen(e, p), p, f"n{seed}")[0]


def _negative_plan(seed):
    p, scene, e = _trace("colors", seed)
    (obj,) = scene
    wrong = obj.replace(color=next(c for c in shapes.COLORS if c != obj.color))
    e.steps[0] = ep.Step(sketch=shapes.render((wrong,)), ins=f"add {grammar.obj_words(wrong)}",
                         des=grammar.describe((wrong,)), inspect="plan ok ; image ok")
    return sc.critique_trace(_gen(e, p), p, f"t{seed}")[0]


def test_balance_bounds_the_positive_share_and_reports_the_sides():
    pos = [sc.critique_trace(_gen(e, p), p, f"p{i}")[0]
           for i, (p, _, e) in enumerate(_trace("color_attr", s) for s in range(10))]
    neg = [_negative_image(1), _negative_image(3), _negative_plan(2)]
    assert [sc.side(e) for e in neg] == ["image", "image", "plan"] and sc.side(pos[0]) == "positive"
    mixed = pos[:5] + neg + pos[5:]
    kept, made_up = sc.balance(mixed, 0.5)
    assert made_up == {"positive": 3, "negative_plan": 1, "negative_image": 2, "positives_dropped": 7}
    assert [e.id for e in kept] == [e.id for e in pos[:3] + neg]  # the earliest positives, in order
    everything, made_up = sc.balance(mixed, 1.0)
    assert len(everything) == 13 and made_up["positives_dropped"] == 0
    assert sc.balance(pos, 0.5)[0] == []  # no negatives: no positives either, and it says so
