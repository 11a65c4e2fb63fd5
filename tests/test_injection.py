"""Error injection: the generator puts the mistake in where it is asked (an exactly rendered
wrong sketch, or an imposed plan), the model goes on from it, and the checker reads what the
inspection and refinement made of it."""

import numpy as np
import pytest

from strokes_jax.episodes import critique, mixer
from strokes_jax.evaluate import injection
from strokes_jax.inference.generator import Generated
from strokes_jax.worlds import checker, grammar, prompts, shapes

from test_generate import _gen


def _additive(min_steps=2, tags=shapes.TAGS):
    for e in mixer.generate_episodes(5, 80, {"additive": 1.0}):
        if len(e.steps) >= min_steps and e.tag in tags:
            return e
    raise AssertionError("no additive episode long enough")


def _prompt(e):
    return prompts.Prompt(e.prompt, e.tag, e.metadata)


def test_read_plan_and_wrong_drawings():
    x, y = shapes.Obj("circle", "red", 0, 0), shapes.Obj("square", "blue", 1, 1)
    got = injection.read_plan(grammar.Command("add", y).text(), grammar.describe((x, y)))
    assert got == ((x,), y)
    assert injection.read_plan("remove a red circle at top left", grammar.describe((x,))) is None
    rng = np.random.default_rng(0)
    assert injection.wrong_drawing("image:missing", (x,), y, rng) == (x,)
    extra = injection.wrong_drawing("image:extra", (x,), y, rng)
    assert extra[:2] == (x, y) and len(extra) == 3
    color = injection.wrong_drawing("image:color", (x,), y, rng)
    assert color[1].cell == y.cell and color[1].color != y.color
    place = injection.wrong_drawing("image:place", (x,), y, rng)
    assert place[1].color == y.color and place[1].cell not in (x.cell, y.cell)
    with pytest.raises(injection.InjectionError, match="eval.inject_kinds"):
        injection.check_kinds(["image:colour"])


@pytest.mark.parametrize("kind", critique.IMAGE_KINDS)
def test_an_injected_sketch_replaces_the_models_own(etok, kind):
    ref = _additive()
    p = _prompt(ref)
    gen = _gen(etok, ref)
    base = gen([p.text], "process", rng=np.random.default_rng(0))
    inj = injection.Injector(kind, 1, [p], base, seed=3)
    out = gen([p.text], "process", rng=np.random.default_rng(0), inject=inj)[0]
    assert 0 in inj.what, f"{kind} was not put in"
    what = inj.what[0]
    step = out.episode.steps[1]
    # The sketch of iteration 1 is the exact render of the wrong drawing, not the model's.
    np.testing.assert_array_equal(step.sketch, shapes.render(what["drawn"]))
    assert set(checker.drawn_scene(step.sketch)) == set(what["drawn"]) != set(what["planned"])
    np.testing.assert_array_equal(out.episode.steps[0].sketch, ref.steps[0].sketch)
    # The oracle ignores what it sees: it says "ok" and repairs nothing, as an uncritical
    # model would; that is the control row's behaviour.
    o = injection.outcome(kind, 1, p, out, what)
    assert not o["caught"] and not o["repaired"]


@pytest.mark.parametrize("kind,tag,at", [("text:extra", "two_object", 0),
                                         ("text:color", "color_attr", 0),
                                         ("text:relation", "position", 1)])
def test_an_imposed_plan_is_what_the_episode_says(etok, kind, tag, at):
    ref = _additive(at + 1, (tag,))
    p = _prompt(ref)
    gen = _gen(etok, ref)
    base = gen([p.text], "process", rng=np.random.default_rng(0))
    inj = injection.Injector(kind, at, [p], base, seed=3)
    assert 0 in inj.plans, f"{kind} has no option for {p.text!r}"
    out = gen([p.text], "process", rng=np.random.default_rng(0), inject=inj)[0]
    step = out.episode.steps[at]
    assert f"<ins> {step.ins} </ins> <des> {step.des} </des>" == inj.plans[0]
    planned = grammar.parse_description(step.des)
    assert prompts.partial_check(planned, p)[0], "the imposed plan must contradict the prompt"
    assert step.ins != ref.steps[at].ins


def test_outcome_reads_a_caught_and_repaired_mistake():
    rng = np.random.default_rng(1)
    for e in mixer.generate_episodes(7, 40, {"additive": 1.0}):
        p = _prompt(e)
        scene = checker.drawn_scene(e.final_image())
        try:
            c = critique.critique_episode(rng, "c", p, scene, kind="image:color")
        except (ValueError, AssertionError):
            continue
        break
    at = next(i for i, s in enumerate(c.steps) if s.refine)
    planned = grammar.parse_description(c.steps[at].des)
    result = Generated(p.text, "process", "", c.images(), 10, c, None, False)
    o = injection.outcome("image:color", at, p, result, {"planned": planned})
    assert o == {"caught": True, "repaired": True, "correct": True, "nfe": 10}
    # The same episode read as a plan-side mistake: the verdict names no plan issue.
    assert not injection.outcome("text:color", at, p, result, {})["caught"]


def test_run_counts_every_kind_against_its_baseline(etok):
    ref = _additive()
    gen = _gen(etok, ref)
    res = injection.run(gen, [_prompt(ref)], critique.KINDS, at=0, batch_size=1, seed=0)
    assert res["baseline"]["correct"] == 1.0
    for kind in critique.IMAGE_KINDS:
        k = res["kinds"][kind]
        assert k["injected"] == 1 and k["caught"] == 0.0 and k["repaired"] == 0.0, (kind, k)
        assert k["extra_nfe"] == 0.0 and k["baseline_correct"] == 1.0
    sides = injection.side_summary(res)
    assert sides["image"]["injected"] == 4
    assert "image errors at iteration 0 (4): caught 0%" in injection.line(res)


@pytest.mark.slow
@pytest.mark.parametrize("kind,at", [("image:extra", 1), ("text:extra", 0)])
def test_injection_is_the_same_through_the_kv_cache(kind, at):
    """A real model's velocities (text steered): the injected sketch or plan enters both
    backends' contexts alike, so what the model draws after it agrees."""
    from test_kv_cache import _TextSteered, _cached, _init_params, _model, _uncached

    from strokes_jax.sequence import tokenizer as tk
    etok = tk.EpisodeTokenizer(tk.Tokenizer.for_words(grammar.vocabulary()),
                               (shapes.CANVAS, shapes.CANVAS, 3), 6)
    model = _model(etok)
    params = _init_params(model)
    refs = [e for e in mixer.generate_episodes(5, 40, {"additive": 1.0}) if len(e.steps) >= 2][:2]
    bench = [_prompt(e) for e in refs]
    kw = dict(max_len=512, flow_steps=3, shift=1.0, max_iterations=8, max_text_tokens=64, seed=3)
    outs = []
    for cls in (_uncached, _cached):
        gen = cls(_TextSteered(model, etok, refs), params, etok, **kw)
        base = gen([p.text for p in bench], "process", rng=np.random.default_rng(0))
        inj = injection.Injector(kind, at, bench, base, seed=3)
        got = gen([p.text for p in bench], "process", rng=np.random.default_rng(0), inject=inj)
        assert sorted(inj.what) == [0, 1], inj.what
        outs.append(got)
        for b, g in zip(base, got):
            assert b.text != g.text if kind.startswith("text") else len(g.images) == len(b.images)
    for a, b in zip(*outs):
        assert a.text == b.text and a.nfe == b.nfe
        for x, y in zip(a.images, b.images):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
