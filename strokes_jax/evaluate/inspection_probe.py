"""Does the inspection look? A teacher-forced probe of the <inspect> stage.

Scoring the model's own traces (evaluate/inspection.py) measures inspection on the errors the
model happens to make; a model that draws almost perfectly leaves nothing to catch, and one
that draws badly may be judged on the wrong things. This probe fixes the inputs instead:
exactly rendered episodes on the evaluation prompts, each with one known error of every
critique kind that applies (critique.py: an image drawn with the wrong colour, in the wrong
cell, missing the planned object or with an extra one; a plan that contradicts the prompt),
plus error-free episodes. Everything before each verdict is teacher-forced, and the probe
reads what the model predicts at the two decision tokens of the verdict grammar, the words
after "plan" and after "image" ("ok" or "wrong"), and whether it predicts every token of the
verdict text (the issue named word for word).

Per kind: the detection rate (says "wrong" on the side that is wrong), the verdict-exact rate,
and for error-free steps the false-alarm rate per side. A model whose inspection ignores the
image says "image ok" at the same rate whatever was drawn.
"""

from __future__ import annotations

import collections
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from strokes_jax.episodes import episode as ep
from strokes_jax.data import pipeline
from strokes_jax.episodes import critique, trajectories as tr
from strokes_jax.evaluate import inspection, shapes_bench
from strokes_jax.sequence.layout import batch_keys
from strokes_jax.train import inputs
from strokes_jax.train.step import encoded, to_latents, vit_inputs
from strokes_jax.worlds import checker, grammar, prompts, shapes

POSITIVE = "positive"


def probe_episodes(seed: int, per_tag: int, kinds: Sequence[str] = critique.KINDS):
    """[(episode, kind)]: for every evaluation prompt, one error-free additive episode and one
    episode per applicable critique kind, on a scene sampled for the prompt."""
    out = []
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4243]))
    for n, p in enumerate(shapes_bench.benchmark_prompts(seed, per_tag)):
        scene = prompts.sample_scene(rng, p)
        out.append((tr.make_episode(f"probe{n}", p, tr.additive_steps(scene), "additive"),
                    POSITIVE))
        app = critique.applicable(p, scene)
        for kind in kinds:
            if kind not in app:
                continue
            try:
                e = critique.critique_episode(rng, f"probe{n}_{kind}", p, scene, kind=kind)
            except tr.TrajectoryError:  # e.g. no free cell fixes a relation: nothing to probe
                continue
            out.append((e, kind))
    return out


def own_trace_items(samples, bench: Sequence[prompts.Prompt], rerender: bool = False,
                    kind: str = "own"):
    """[(episode, kind)] from the model's own process traces, for the probe: each trace up to
    its first wrong step, every verdict replaced by the exact checker's, and no refine.
    With `rerender`, every sketch is replaced by the exact render of what the detector found
    in it: the same scene, drawn as the training data draws it. Comparing the two tells
    whether the inspection fails to see the error or fails to read the model's own strokes.
    Traces with an unparseable plan, an undetectable drawing, or a wrong step the checker
    cannot name in one issue are left out."""
    by_text = {p.text: p for p in bench}
    out = []
    for n, smp in enumerate(samples):
        e = smp.result.episode
        if smp.mode != "process" or e is None:
            continue
        steps = []
        for step in e.steps:
            truth, verdict = inspection.expected_verdict(step, by_text[smp.prompt])
            if truth not in ("ok", "plan_wrong", "image_wrong") or (truth != "ok" and verdict is None):
                steps = None
                break
            sketch = step.sketch
            if rerender:
                sketch = shapes.render(checker.drawn_scene(step.sketch))
            steps.append(ep.Step(sketch=sketch, ins=step.ins, des=step.des,
                                 inspect=(verdict or grammar.Verdict()).text(),
                                 sketch_target=False))
            if truth != "ok":
                break
        if steps:
            out.append((ep.Episode(id=f"own{n}", prompt=e.prompt, tag=e.tag,
                                   metadata=e.metadata, steps=steps, kind=e.kind), kind))
    return out


def decision_points(etok, arrays: dict, episode: ep.Episode) -> list[dict]:
    """Per inspected step: the positions whose next-token predictions decide each side, the
    truth per side, and the token range of the verdict text (for the exact check)."""
    # A word as it stands inside the verdict, after a space (a BPE's " ok", a word-level " ok").
    word = lambda w: etok.tok.encode(" " + w)[-1]  # noqa: E731
    plan_id, image_id = word("plan"), word("image")
    tokens, stages = arrays["tokens"], arrays["stages"]
    inspect_open, inspect_close = etok.tok.ids["<inspect>"], etok.tok.ids["</inspect>"]
    starts = [i for i, t in enumerate(tokens) if t == inspect_open]
    inspected = [s for s in episode.steps if s.inspect is not None]
    if len(starts) != len(inspected):
        raise ValueError(f"episode {episode.id!r}: {len(starts)} <inspect> tokens for "
                         f"{len(inspected)} inspected steps")
    out = []
    for start, step in zip(starts, inspected):
        end = start + 1
        while end < len(tokens) and stages[end] == ep.INSPECT and tokens[end] != inspect_close:
            end += 1
        span = range(start + 1, end)
        v = grammar.parse_verdict(step.inspect)
        at = {tokens[i]: i for i in reversed(span)}  # first occurrence of each word
        out.append({"plan_at": at[plan_id], "image_at": at[image_id],
                    "plan_wrong": v.plan_issue is not None, "image_wrong": v.image_issue is not None,
                    # positions whose next token is the verdict text and its closing tag
                    "text": (start, end)})
    return out


def _forward(model, ok_id: int, wrong_id: int, codec):
    encode = codec.step_latents if codec.in_step else None

    @jax.jit
    def f(params, batch, codec_params):
        batch = encoded(batch, codec_params, encode)
        # Noisy copies are invisible to every text token (attention.py), so their content and
        # t do not change the logits read here; the clean copies carry the images.
        logits, _ = model.apply({"params": params}, batch["tokens"], batch["types"],
                                batch["positions"], batch["segment_ids"], batch["blocks"],
                                batch["patch_pos"], to_latents(batch["patches"]),
                                jnp.zeros(batch["tokens"].shape), **vit_inputs(batch))
        # P(wrong) between the verdict grammar's two words, at every position.
        p_wrong = jax.nn.softmax(logits[..., jnp.array([ok_id, wrong_id])], axis=-1)[..., 1]
        return jnp.argmax(logits, -1), p_wrong
    return f


def probe(model, params, etok, items, seq_len: int, batch_size: int = 16) -> dict:
    """Run the probe on `items` from probe_episodes; returns rates per kind and the counts."""
    ok_id, wrong_id = etok.tok.encode(" ok")[-1], etok.tok.encode(" wrong")[-1]
    fwd = _forward(model, ok_id, wrong_id, etok.codec)
    rows, meta, too_long = [], [], 0
    for e, kind in items:
        e = inputs.world_episode(etok, e)
        a = etok(e)
        if len(a["tokens"]) > seq_len:  # the training data drops these too (max_tokens)
            too_long += 1
            continue
        rows.append(pipeline.single_row(a, seq_len, etok.tok.pad_id, etok.patch_dim,
                                        etok.vit_patch_dim, record=f"episode {e.id!r}"))
        meta.append((e, kind, decision_points(etok, a, e), a["tokens"]))
    n = collections.Counter()
    p_wrong = collections.defaultdict(list)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
        batch = {k: np.stack([r[k] for r in chunk]) for k in batch_keys(chunk[0])}
        pred, p_wrong_at = jax.device_get(fwd(params, batch, etok.codec.params))
        for j, (e, kind, points, tokens) in enumerate(meta[i:i + batch_size]):
            for d in points:
                err = [s for s in ("plan", "image") if d[f"{s}_wrong"]]
                key = kind if err else POSITIVE
                said = {s: pred[j, d[f"{s}_at"]] == wrong_id for s in ("plan", "image")}
                lo, hi = d["text"]
                exact = all(pred[j, t] == tokens[t + 1] for t in range(lo, hi))
                n[(key, "steps")] += 1
                n[(key, "exact")] += exact
                for s in ("plan", "image"):
                    n[(key, f"{s}_said_wrong")] += said[s]
                    p_wrong[(key, s)].append(float(p_wrong_at[j, d[f"{s}_at"]]))
                if err:
                    n[(key, "caught")] += all(said[s] for s in err)
    out = _rates(n, p_wrong)
    out["summary"]["episodes"], out["summary"]["too_long"] = len(rows), too_long
    return out


def _rates(n, p_wrong) -> dict:
    out = {}
    for key in sorted({k for k, _ in n}):
        steps = n[(key, "steps")]
        r = {"steps": steps, "verdict_exact": n[(key, "exact")] / steps}
        for s in ("plan", "image"):
            r[f"{s}_said_wrong"] = n[(key, f"{s}_said_wrong")] / steps
            r[f"{s}_mean_p_wrong"] = float(np.mean(p_wrong[(key, s)]))
        if key != POSITIVE:
            r["caught"] = n[(key, "caught")] / steps
        out[key] = r
    img = [k for k in out if k.startswith("image:")]
    txt = [k for k in out if k.startswith("text:")]
    side = lambda ks: (sum(out[k]["caught"] * out[k]["steps"] for k in ks)  # noqa: E731
                       / max(1, sum(out[k]["steps"] for k in ks)))
    pos = out.get(POSITIVE, {})
    out["summary"] = {"image_errors_caught": side(img), "plan_errors_caught": side(txt),
                      "false_alarm_image": pos.get("image_said_wrong"),
                      "false_alarm_plan": pos.get("plan_said_wrong")}
    return out


def line(r: dict) -> str:
    s = r["summary"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    return (f"teacher-forced probe: image errors caught {pct(s['image_errors_caught'])}, plan "
            f"errors caught {pct(s['plan_errors_caught'])}, false alarms on right steps "
            f"{pct(s['false_alarm_image'])} (image) / {pct(s['false_alarm_plan'])} (plan)")
