"""Training: the loss goes down, resume is exact, a non-finite loss stops the run, and the main
job runs end to end on the tiny test config."""

import json
import os

import jax
import numpy as np
import pytest

from strokes_jax.configs import shapes_tiny
from strokes_jax.train import loop

pytestmark = pytest.mark.slow


def _config(**train):
    c = shapes_tiny.get_config("test")
    c.train.update(log_every=1, eval_every=0, **train)
    return c


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    c = _config()
    return loop.prepare_data(c, str(tmp_path_factory.mktemp("data")))


def test_few_steps_reduce_the_loss(tmp_path, sources):
    c = _config(steps=12, checkpoint_every=100)
    c.optim.update(total_steps=12, warmup_steps=1, lr=3e-3)
    _, summary = loop.train(c, str(tmp_path), sources)
    losses = [l for _, l in summary["losses"]]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


def test_resume_gives_identical_losses(tmp_path, sources):
    """Train 3 steps in one go, and 2 + 1 with a restart in between: the third step's loss
    must match exactly (same state, same data position, same per-step noise)."""
    full = _config(steps=3, checkpoint_every=1)
    _, s_full = loop.train(full, str(tmp_path / "full"), sources)
    first = _config(steps=2, checkpoint_every=1)
    loop.train(first, str(tmp_path / "split"), sources)
    _, s_resumed = loop.train(full, str(tmp_path / "split"), sources)
    assert s_resumed["start_step"] == 2
    assert s_resumed["losses"] == [s_full["losses"][-1]]


def test_sparse_routing_trains_like_dense_and_counts_its_fallbacks(tmp_path, sources):
    """Capacities that some of the batches exceed: those steps run dense (counted in the
    summary), the rest sparse, and the losses match dense routing's throughout."""
    from strokes_jax.model import routing
    c = _config(steps=4, checkpoint_every=100)
    s = loop.setup(c)
    it = loop.train_iterator(c, s.etok, loop.with_extra_sources(c, sources[0]), skips=None)
    host = [next(it) for _ in range(4)]
    gen = [np.isin(b["types"], (1, 2)) & (b["segment_ids"] > 0) for b in host]
    fills = sorted(g.sum() / g.size for g in gen)
    fractions = (fills[1], 1.0)  # rounded up to 64 tokens: at least two batches fit
    expect = sum(not routing.counts_fit(np.isin(b["types"], (1, 2)), b["segment_ids"] > 0,
                                        fractions) for b in host)
    assert 0 < expect < 4, fills
    _, dense = loop.train(c, str(tmp_path / "dense"), sources)
    c.train.sparse_routing = fractions
    _, sparse = loop.train(c, str(tmp_path / "sparse"), sources)
    assert sparse["sparse_routing"]["dense_steps"] == expect
    np.testing.assert_allclose([l for _, l in sparse["losses"]], [l for _, l in dense["losses"]],
                               rtol=1e-5)


def test_restore_for_eval_loads_the_latest_state(tmp_path, sources):
    c = _config(steps=2, checkpoint_every=1)
    trained, _ = loop.train(c, str(tmp_path), sources)
    restored, summary = loop.restore_for_eval(c, str(tmp_path))
    assert summary["end_step"] == 2
    for a, b in zip(jax.tree_util.tree_leaves(trained.state.params),
                    jax.tree_util.tree_leaves(restored.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, sources):
    c = _config(steps=3, checkpoint_every=1)
    c.optim.update(lr=1e30, warmup_steps=0, clip_norm=1e30)  # blows up at the first update
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        loop.train(c, str(tmp_path), sources)
    # Nothing non-finite was saved: whatever the newest checkpoint is, it is finite.
    try:
        restored, summary = loop.restore_for_eval(c, str(tmp_path))
    except FileNotFoundError:
        return  # the very first update blew up: no checkpoint at all is the right answer
    for x in jax.tree_util.tree_leaves(restored.state.params):
        assert np.isfinite(np.asarray(x)).all()


def test_main_job_end_to_end(tmp_path, capsys):
    """The demo command on the test config: data, training, both generation modes, scoring
    and the report, in one process."""
    from absl.testing import flagsaver  # noqa: F401  (absl is a dependency already)
    from strokes_jax import __main__ as cli

    workdir = str(tmp_path / "run")
    cli.FLAGS(["strokes_jax", f"--workdir={workdir}",
               f"--config={cli._DEFAULT_CONFIG}:test"])
    try:
        cli.main(["strokes_jax", "demo"])
        cli.main(["strokes_jax", "self-critique"])  # the trained checkpoint samples itself
    finally:
        cli.FLAGS.unparse_flags()
    stats = json.load(open(os.path.join(workdir, "self_critique", "stats.json")))
    assert sum(stats["outcomes"].values()) == stats["prompts"] == 6
    import grain
    src = grain.sources.ArrayRecordDataSource(stats["path"])
    assert len(src) == stats["episodes"]
    with open(os.path.join(workdir, "report", "results.json")) as f:
        res = json.load(f)
    assert set(res["results"]) == {"single_pass", "process", "process@cap1"}
    assert res["results"]["process@cap1"]["images_per_sample"] <= 2  # one sketch (+ refine)
    for mode, r in res["results"].items():
        assert set(r["scores"]) >= {"single_object", "two_object", "counting", "colors",
                                    "position", "color_attr", "overall"}
        assert r["images"] == 6
    for mode in ("single_pass", "process"):
        assert len(res["samples"][mode]) == 6
    assert res["train"]["end_step"] == 8
    strips = os.listdir(os.path.join(workdir, "report", "filmstrips"))
    assert strips and all(s.endswith(".png") for s in strips)
    assert os.path.exists(os.path.join(workdir, "report", "report.md"))
    page = open(os.path.join(workdir, "report", "report.html")).read()
    assert page.count("<img ") == len(strips)
    # The score table as a table: a header row, then one row of cells per mode.
    table = page[page.index("<table>"):page.index("</table>")]
    assert table.count("<tr>") == 1 + len(res["results"]) and "---" not in table
    assert table.count("<td>") == len(res["results"]) * table.count("<th>")
    # TensorBoard: filmstrips of the fixed prompts at each periodic evaluation during
    # training (steps 4 and 8), both modes, and the evaluation's filmstrips after it.
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tb"),
                                             size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()  # TF2 summaries: images are tensors with the images plugin's metadata
    images = [t for t in acc.Tags()["tensors"]
              if acc.SummaryMetadata(t).plugin_data.plugin_name == "images"]
    during = [t for t in images if t.startswith("train_samples/")]
    assert {t.split("/")[1] for t in during} == {"process", "single_pass"}, during
    for tag in during:
        assert [e.step for e in acc.Tensors(tag)] == [4, 8]
    assert any(t.startswith("filmstrips/") for t in images)
    assert res["train"]["hook_seconds"] > 0

    # `evaluate`, and the demo rerun on its finished checkpoint, keep the training record.
    cli.FLAGS(["strokes_jax", f"--workdir={workdir}", f"--config={cli._DEFAULT_CONFIG}:test"])
    try:
        cli.main(["strokes_jax", "evaluate"])
        cli.main(["strokes_jax", "demo"])
    finally:
        cli.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    assert "nothing to train (train.steps=8)" in out and "last losses" not in out
    with open(os.path.join(workdir, "report", "results.json")) as f:
        again = json.load(f)
    assert again["train"]["start_step"] == 0 and again["train"]["end_step"] == 8
    assert again["train"]["losses"] == res["train"]["losses"] and again["train"]["losses"]
    assert set(again["timings"]) >= {"data", "train", "generate_process"}
    md = open(os.path.join(workdir, "report", "report.md")).read()
    assert "steps 0 -> 8" in md and "loss by step: ." not in md


def test_phase_two_starts_from_phase_one_and_mixes_in_an_extra_split(tmp_path, sources):
    from strokes_jax.episodes import mixer, self_critique

    phase1, _ = loop.train(_config(steps=2, checkpoint_every=1), str(tmp_path / "p1"), sources)
    eps = list(mixer.generate_episodes(9, 8, {"additive": 1.0}))
    for e in eps:
        for s in e.steps:
            s.sketch_target = False  # as self-sampled critiques are
    path = str(tmp_path / "extra.array_record")
    self_critique.write_array_record(eps, path)

    c = _config(steps=2, checkpoint_every=1)
    c.train.init_from = str(tmp_path / "p1")
    c.data.extra_sources = ({"path": path, "weight": 1.0},)
    s = loop.setup(c)
    loop._init_from(s, c)
    for a, b in zip(jax.tree_util.tree_leaves(phase1.state.params),
                    jax.tree_util.tree_leaves(s.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(s.state.step) == 0
    mixed = loop.with_extra_sources(c, sources[0])
    assert [len(src) for src, _ in mixed] == [len(sources[0]), 8]
    _, summary = loop.train(c, str(tmp_path / "p2"), sources)
    assert summary["start_step"] == 0 and summary["end_step"] == 2

    c.data.extra_sources = ({"path": str(tmp_path / "missing"), "weight": 1.0},)
    with pytest.raises(FileNotFoundError, match=r"data.extra_sources\[0\].path"):
        loop.with_extra_sources(c, sources[0])


def test_training_filmstrip_prompts_spread_over_the_categories():
    from strokes_jax.evaluate import train_images
    from strokes_jax.worlds import shapes

    assert train_images.prompts(0, 1) == []
    six = train_images.prompts(6, 1)
    assert sorted(p.tag for p in six) == sorted(shapes.TAGS)
    eight = train_images.prompts(8, 1)
    assert len(eight) == 8 and sorted(p.tag for p in eight[:6]) == sorted(shapes.TAGS)


def test_episodes_in_a_batch_are_its_distinct_segments():
    seg = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert loop._episodes_in(seg) == 3
