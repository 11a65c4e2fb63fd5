"""The inspection confusion: each <inspect> verdict of a process sample against the exact
checker's verdict on the same step (false alarms, misses, exact verdicts); and the
teacher-forced probe on exactly rendered errors of every critique kind."""

import jax
import jax.numpy as jnp
import numpy as np

from strokes_jax.episodes import critique, trajectories
from strokes_jax.evaluate import inspection, inspection_probe as ip, shapes_bench
from strokes_jax.inference.generator import Generated
from strokes_jax.sequence.tokenizer import EpisodeTokenizer, Tokenizer
from strokes_jax.worlds import prompts, shapes


def _sample(tag, seed, edit=None):
    rng = np.random.default_rng(seed)
    p = prompts.sample_prompt(rng, tag)
    scene = prompts.sample_scene(rng, p)
    e = trajectories.make_episode("ref", p, trajectories.additive_steps(scene), "additive")
    if edit:
        edit(e, scene)
    g = Generated(p.text, "process", "", e.images(), 0, e, None, False)
    return p, shapes_bench.Sample(p.tag, p.text, "process", 0, True, "", 0, 0, len(e.images()),
                                  True, False, None, g)


def _other_color(o):
    return next(c for c in shapes.COLORS if c != o.color)


def test_right_steps_said_ok_count_as_right_calls():
    p, s = _sample("two_object", 0)
    c = inspection.confusion([s], [p])
    n = len(s.result.episode.steps)
    assert c["counts"] == {"ok_said_ok": n, "exact_checked": n, "exact": n}
    assert c["false_alarm_rate"] == 0.0 and c["miss_rate"] is None
    assert c["call_accuracy"] == 1.0 and c["exact_accuracy"] == 1.0


def test_false_alarm_miss_and_named_issue():
    def false_alarm(e, scene):  # a right drawing called wrong
        e.steps[0].inspect = f"plan ok ; image wrong : missing {_words(scene[0])}"

    def miss(e, scene):  # a wrong colour drawn, called ok
        e.steps[0].sketch = shapes.render((scene[0].replace(color=_other_color(scene[0])),))

    def named(e, scene):  # a wrong colour drawn, and the checker's own verdict given
        wrong = scene[0].replace(color=_other_color(scene[0]))
        e.steps[0].sketch = shapes.render((wrong,))
        e.steps[0].inspect = (f"plan ok ; image wrong : {_words(wrong)} should be "
                              f"{scene[0].color}")

    samples = [_sample("color_attr", 3, f) for f in (false_alarm, miss, named)]
    bench = [p for p, _ in samples]
    per = [inspection.confusion([s], [p])["counts"] for p, s in samples]
    assert per[0]["ok_said_wrong"] == 1 and per[0]["exact"] == len(samples[0][1].result.episode.steps) - 1
    assert per[1]["wrong_said_ok"] == 1 and per[1]["image_wrong"] == 1
    assert per[2]["wrong_said_wrong"] == 1, per[2]
    assert per[2]["exact"] == per[2]["exact_checked"], "the checker's wording is exact"
    c = inspection.confusion([s for _, s in samples], bench)
    assert c["false_alarm_rate"] > 0 and c["miss_rate"] == 0.5
    assert "false alarms" in inspection.line(c)


def test_unparseable_verdicts_and_single_pass_samples_are_not_scored():
    def garbled(e, scene):
        e.steps[0].inspect = "looks fine"

    p, s = _sample("single_object", 4, garbled)
    _, sp = _sample("single_object", 4)
    sp.mode = "single_pass"
    c = inspection.confusion([s, sp], [p])
    assert c["counts"] == {"unparseable_verdict": 1}
    assert c["false_alarm_rate"] is None
    # Left out of the rates, but the one-line summary says how many were not judged.
    assert c["steps_not_judged"] == 1 and "1 more not judged" in inspection.line(c)

    def garbled_plan(e, scene):
        e.steps[0].des = "a red"

    p, s = _sample("single_object", 4, garbled_plan)
    c = inspection.confusion([s], [p])
    assert c["counts"]["unparseable_plan"] == 1 and c["steps_not_judged"] == 1
    assert "0 inspected steps (0 wrong; 1 more not judged)" in inspection.line(c)


def _words(o):
    from strokes_jax.worlds import grammar
    return grammar.obj_words(o)


# -- the teacher-forced probe ------------------------------------------------------------------
class _Oracle:
    """Predicts the true next token everywhere, optionally with 'ok' and 'wrong' swapped."""

    def __init__(self, vocab, swap=None):
        self.vocab, self.swap = vocab, swap

    def apply(self, variables, tokens, *rest, **kw):
        nxt = jnp.roll(tokens, -1, axis=1)
        if self.swap:
            a, b = self.swap
            nxt = jnp.where(nxt == a, b, jnp.where(nxt == b, a, nxt))
        return jax.nn.one_hot(nxt, self.vocab) * 10.0, None


_ETOK = EpisodeTokenizer(Tokenizer.shapes(), (shapes.GRID * shapes.CELL, shapes.GRID * shapes.CELL, 3), 6)
_ITEMS = ip.probe_episodes(5, 2)


def test_probe_items_cover_every_kind_and_decision_tokens_follow_the_truth():
    kinds = {k for _, k in _ITEMS}
    assert kinds == set(critique.KINDS) | {ip.POSITIVE}
    word = lambda w: _ETOK.tok.encode(w)[0]  # noqa: E731
    for e, kind in _ITEMS:
        a = _ETOK(e)
        for d in ip.decision_points(_ETOK, a, e):
            for side in ("plan", "image"):
                assert a["tokens"][d[f"{side}_at"]] == word(side)
                want = word("wrong") if d[f"{side}_wrong"] else word("ok")
                assert a["tokens"][d[f"{side}_at"] + 1] == want
        errs = [d for d in ip.decision_points(_ETOK, a, e) if d["plan_wrong"] or d["image_wrong"]]
        assert len(errs) == (0 if kind == ip.POSITIVE else 1)
        if errs:
            assert errs[0]["image_wrong" if kind.startswith("image") else "plan_wrong"]


def test_probe_scores_an_oracle_a_yes_man_and_a_contrarian():
    v = _ETOK.tok.vocab_size
    ok, wrong = _ETOK.tok.encode("ok")[0], _ETOK.tok.encode("wrong")[0]
    oracle = ip.probe(_Oracle(v), {}, _ETOK, _ITEMS, seq_len=640, batch_size=8)
    s = oracle["summary"]
    assert s["image_errors_caught"] == s["plan_errors_caught"] == 1.0
    assert s["false_alarm_image"] == s["false_alarm_plan"] == 0.0
    assert all(r["verdict_exact"] == 1.0 for k, r in oracle.items() if k != "summary")
    contrarian = ip.probe(_Oracle(v, (ok, wrong)), {}, _ETOK, _ITEMS, seq_len=640, batch_size=8)
    s = contrarian["summary"]
    assert s["image_errors_caught"] == s["plan_errors_caught"] == 0.0
    assert s["false_alarm_image"] == s["false_alarm_plan"] == 1.0
    assert contrarian[ip.POSITIVE]["verdict_exact"] == 0.0
    short = ip.probe(_Oracle(v), {}, _ETOK, _ITEMS, seq_len=400, batch_size=8)["summary"]
    assert short["too_long"] > 0 and short["episodes"] + short["too_long"] == len(_ITEMS)
