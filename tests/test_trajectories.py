"""Episode generators: additive / edit paths, symbolic critiques, the seeded stream.

The `replay` helper re-derives every state of an episode from its text alone (plan commands,
verdicts, refine commands) and checks each image against an exact render, so the tests check
that text and pixels tell the same story, not just that the generator ran.
"""

import collections

import numpy as np
import pytest

from strokes_jax.episodes import episode as ep
from strokes_jax.sequence import tokenizer as T
from strokes_jax.episodes import critique as cr
from strokes_jax.episodes import mixer, trajectories as tr
from strokes_jax.worlds import grammar, prompts, shapes

SEEDS = range(40)
MIX = {"single_pass": 1.0, "additive": 1.0, "edit": 1.0, "critique": 1.0}


def sampled(tag, seed):
    rng = np.random.default_rng(seed)
    p = prompts.sample_prompt(rng, tag)
    return rng, p, prompts.sample_scene(rng, p)


def replay(e: ep.Episode):
    """Final state of a planned episode, checking every step's text against its images."""
    prompt = prompts.Prompt(e.prompt, e.tag, e.metadata)
    state, kinds = (), []
    for s in e.steps:
        planned = grammar.parse_description(s.des)
        assert grammar.parse_command(s.ins).apply(state) == planned
        v = grammar.parse_verdict(s.inspect)
        if v.ok:
            assert s.refine is None
            drawn = fixed = planned
            assert not prompts.partial_check(planned, prompt)[0], "a positive plan step is wrong"
        else:
            kinds.append(cr.critique_kind(s))
            if v.plan_issue is not None:
                drawn = planned
                viol = prompts.partial_check(drawn, prompt)[0]
                assert len(viol) == 1 and viol[0].obj == v.plan_issue.obj
            else:
                i = v.image_issue
                drawn = {"color": state + (i.obj,), "place": state + (i.obj,), "missing": state,
                         "extra": planned + (i.obj,)}[i.kind]
            fixed = grammar.parse_command(s.refine).apply(drawn)
            if v.image_issue is not None:
                assert fixed == planned, "an image-side fix must restore the plan"
            assert not prompts.partial_check(fixed, prompt)[0]
            np.testing.assert_array_equal(s.refined, shapes.render(fixed))
            assert not np.array_equal(s.sketch, s.refined), "the sketch must show the error"
        np.testing.assert_array_equal(s.sketch, shapes.render(drawn))
        state = fixed
    return state, kinds


@pytest.mark.parametrize("tag", shapes.TAGS)
def test_additive_paths_are_monotone_and_end_in_the_scene(tag):
    for seed in SEEDS:
        _, p, scene = sampled(tag, seed)
        cmds = tr.additive_steps(scene)
        st = tr.states(cmds)
        assert all(c.op == "add" for c in cmds) and len(st) == len(scene)
        for a, b in zip(((),) + tuple(st), st):
            assert set(a) < set(b)
        assert st[-1] == scene
        assert not tr.violations_along(st, p)


@pytest.mark.parametrize("op", tr.EDIT_OPS)
def test_edit_paths_use_the_op_and_stay_valid(op):
    used = collections.Counter()
    for tag in shapes.TAGS:
        for seed in SEEDS:
            rng, p, scene = sampled(tag, seed)
            cmds = tr.edit_steps(rng, p, scene, ops=(op,))
            st = tr.check_path(cmds, p, scene)  # raises on a violation or a wrong end
            edits = [c for c in cmds if c.op != "add"]
            if not edits:
                continue
            assert [c.op for c in edits] == [op]
            # A real detour: some intermediate object is not where the final scene has it.
            assert any(not set(s) <= set(scene) for s in st[:-1])
            assert len(cmds) == len(scene) + 1
            used[tag] += 1
    assert sum(used.values()) > 0
    if op == "recolour":  # only unconstrained colours may be recoloured
        assert used["colors"] == 0
    if op == "swap":  # a swap breaks every one-relation layout, and one object has no partner
        assert used["position"] == used["single_object"] == used["colors"] == 0


def test_edit_steps_fall_back_to_additive():
    rng, p, scene = sampled("colors", 0)
    cmds = tr.edit_steps(rng, p, scene, ops=("recolour",))
    assert cmds == tr.additive_steps(scene)


@pytest.mark.parametrize("kind", cr.KINDS)
def test_every_critique_kind_is_produced_and_consistent(kind):
    tags = {"text:color": ("colors", "color_attr"), "text:relation": ("position",)}.get(
        kind, shapes.TAGS)
    made = 0
    for tag in tags:
        for seed in range(12):
            rng, p, scene = sampled(tag, seed)
            e, final = cr.critique_episode(rng, f"t-{seed}", p, scene, kind=kind,
                                           return_final=True)
            e.validate(tr.IMAGE_SHAPE)
            assert e.kind == "critique"
            got, kinds = replay(e)
            assert kinds == [kind] and got == final
            assert prompts.check_scene(final, p)[0]
            # Only drawings that match their plan are flow targets: an image-side wrong
            # sketch is context for the inspection; a text-side one draws its plan right.
            crit = [st for st in e.steps if st.refine is not None]
            assert len(crit) == 1
            assert crit[0].sketch_target == (kind in cr.TEXT_KINDS)
            assert all(st.sketch_target for st in e.steps if st.refine is None)
            made += 1
    assert made > 0


def test_text_side_critiques_need_their_clause():
    _, p, scene = sampled("single_object", 0)
    app = cr.applicable(p, scene)
    assert "text:color" not in app and "text:relation" not in app
    assert set(cr.IMAGE_KINDS) <= set(app) and "text:extra" in app


def test_random_critique_episodes_cover_all_kinds():
    seen = collections.Counter()
    for i in range(300):
        rng, p, scene = sampled(shapes.TAGS[i % 6], 1000 + i)
        e = cr.critique_episode(rng, str(i), p, scene)
        seen.update(replay(e)[1])
    assert set(seen) == set(cr.KINDS), seen


def test_generate_episodes_is_deterministic_and_valid():
    a = [e.to_bytes() for e in mixer.generate_episodes(7, 60, MIX)]
    b = [e.to_bytes() for e in mixer.generate_episodes(7, 60, MIX)]
    c = [e.to_bytes() for e in mixer.generate_episodes(7, 15, MIX)]
    assert a == b and a[:15] == c
    assert a != [e.to_bytes() for e in mixer.generate_episodes(8, 60, MIX)]

    tok = T.EpisodeTokenizer(T.Tokenizer.shapes(), tr.IMAGE_SHAPE, 6)
    images, kinds = collections.defaultdict(list), collections.Counter()
    for raw in a:
        e = ep.Episode.from_bytes(raw).validate(tr.IMAGE_SHAPE)
        kinds[e.kind] += 1
        out = tok(e)  # raises on unknown words
        assert (out["tokens"] != tok.tok.unk_id).all()
        if e.kind == "single_pass":
            assert len(e.steps) == 1 and e.steps[0].ins is None
            continue
        final, _ = replay(e)
        assert prompts.check_scene(final, prompts.Prompt(e.prompt, e.tag, e.metadata))[0]
        images[e.kind].append(len(e.images()))
    assert set(kinds) == set(mixer.MIX_KEYS), kinds
    mean = np.mean([n for v in images.values() for n in v])
    print(f"mean images per planned episode {mean:.2f}; per kind "
          f"{ {k: round(float(np.mean(v)), 2) for k, v in images.items()} }")
    assert 1 < mean < 5


def test_mix_selects_kinds_and_rejects_bad_keys():
    eps = list(mixer.generate_episodes(3, 12, {"critique": 1.0}))
    assert {e.kind for e in eps} == {"critique"}
    assert [e.id for e in eps[:2]] == ["3-0", "3-1"]
    with pytest.raises(ValueError):
        next(mixer.generate_episodes(3, 1, {"self_critique": 1.0}))
