"""The seeded episode stream of the shapes world: episode i draws its tag, kind (by the
mix's weights) and scene from its own generator, so the stream is deterministic per
(seed, i) and any prefix is the same whatever its length."""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from strokes_jax.episodes import critique, episode as ep, trajectories as tr
from strokes_jax.worlds import prompts, shapes

MIX_KEYS = ("single_pass", "additive", "edit", "critique")


def episode_rng(seed: int, i: int) -> np.random.Generator:
    """Episode i's generator: SeedSequence(seed).spawn(n)[i] without depending on n."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))


class HardPromptTooLong(ValueError):
    """A hard-category episode that no path of its scene fits into the rows."""


def make_one(seed: int, i: int, mix: Mapping[str, float],
             tags: Sequence[str] = shapes.TAGS,
             fits: Callable[[ep.Episode], bool] | None = None,
             hard_max_objects: int = 0) -> ep.Episode:
    """Episode i of the stream (tag cycled, kind drawn by `mix`), validated and checked.

    `fits` (e.g. "tokenizes to at most seq_len tokens"): an edit or critique episode that does
    not fit falls back to the additive path of the same scene, which fits the default length
    for GenEval's six categories; this happens only for the longest (4-object) scenes. A
    `hard` prompt (up to `hard_max_objects` objects) whose additive path does not fit either
    is an error naming the bound, since dropping it would quietly train on easier prompts."""
    keys = [k for k in MIX_KEYS if mix.get(k, 0) > 0]
    unknown = set(mix) - set(MIX_KEYS)
    if unknown or not keys:
        raise ValueError(f"mix {dict(mix)} must weight some of {MIX_KEYS}, nothing else")
    p = np.array([mix[k] for k in keys], np.float64)
    rng = episode_rng(seed, i)
    tag = tags[i % len(tags)]
    kind = keys[int(rng.choice(len(keys), p=p / p.sum()))]
    prompt = prompts.sample_prompt(rng, tag, hard_max_objects or None)
    scene = prompts.sample_scene(rng, prompt)
    eid = f"{seed}-{i}"
    if kind == "single_pass":
        e, final = tr.single_pass_episode(eid, prompt, scene), scene
    elif kind == "critique":
        e, final = critique.critique_episode(rng, eid, prompt, scene, return_final=True)
    else:
        cmds = tr.additive_steps(scene) if kind == "additive" else tr.edit_steps(rng, prompt, scene)
        final = tr.check_path(cmds, prompt, scene)[-1]
        # An edit prompt with no applicable edit is, honestly, an additive episode.
        kind = "edit" if any(c.op != "add" for c in cmds) else "additive"
        e = tr.make_episode(eid, prompt, cmds, kind)
    if fits is not None and kind not in ("single_pass", "additive") and not fits(e):
        cmds = tr.additive_steps(scene)
        final = tr.check_path(cmds, prompt, scene)[-1]
        e = tr.make_episode(eid, prompt, cmds, "additive")
    if fits is not None and tag == prompts.HARD_TAG and not fits(e):
        raise HardPromptTooLong(
            f"config key data.hard_max_objects: episode {eid} ({len(scene)} objects, "
            f"{prompt.text!r}) does not fit data.seq_len; lower the bound or lengthen the rows")
    e.validate(tr.IMAGE_SHAPE)
    ok, why = prompts.check_scene(final, prompt)
    if not ok or not np.array_equal(e.final_image(), shapes.render(final)):
        raise tr.TrajectoryError(f"episode {eid}: final state fails the prompt ({why})")
    return e


def generate_episodes(seed: int, num: int, mix: Mapping[str, float],
                      tags: Sequence[str] = shapes.TAGS,
                      fits: Callable[[ep.Episode], bool] | None = None,
                      hard_max_objects: int = 0) -> Iterator[ep.Episode]:
    """Deterministic stream: episode i depends only on (seed, i, mix, tags, fits, the hard
    bound). hard_max_objects > 0 adds the `hard` category to the tags cycled, with prompts
    of 3 to that many objects (the evaluation's hard split goes further, to
    prompts.HARD_MAX_OBJECTS, so the largest test prompts are never trained on)."""
    if hard_max_objects and prompts.HARD_TAG not in tags:
        tags = tuple(tags) + (prompts.HARD_TAG,)
    for i in range(num):
        yield make_one(seed, i, mix, tags, fits, hard_max_objects)
