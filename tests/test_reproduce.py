"""The reproduction command end to end on the tiny test config: every row trains the same
number of steps, the full-method row goes through phase 1, self-sampled critiques and phase
2 on the mixture, and one table with per-category scores, NFE and episodes comes out."""

import json
import os

import pytest

from strokes_jax.configs import shapes_repro
from strokes_jax.evaluate import reproduce

pytestmark = pytest.mark.slow


def test_reproduce_writes_the_ablation_table(tmp_path, monkeypatch):
    c = shapes_repro.get_config("test")
    c.train.update(steps=4, eval_every=0, checkpoint_every=4)
    c.optim.update(total_steps=4, warmup_steps=1)
    c.reproduce.update(curve_points=2, single_pass_multiples=(1.5,))
    summaries, train = {}, reproduce._train

    def spy(cfg, workdir):
        setup, summary = train(cfg, workdir)
        summaries[os.path.basename(workdir)] = summary
        return setup, summary

    monkeypatch.setattr(reproduce, "_train", spy)
    out = reproduce.run(c, "shapes_repro.py:test", str(tmp_path))
    assert list(out["rows"]) == list(reproduce.RUN_ORDER)
    assert sorted(reproduce.RUN_ORDER) == sorted(reproduce.ROWS)
    assert out["rows"]["single_pass"]["mode"] == "single_pass"
    for row, r in out["rows"].items():
        assert r["train_steps"] == 4
        # Packed episodes trained on: at least one per batch row (the full method's phase 1
        # and phase 2 together).
        assert r["episodes_seen"] >= 4 * c.data.batch_size, (row, r["episodes_seen"])
        assert 0.0 <= r["scores"]["overall"] <= 1.0 and r["nfe_per_image"] >= 0
    assert out["rows"]["self_critique"]["episodes_seen"] == (
        summaries["self_critique_phase1"]["episodes_seen"]
        + summaries["self_critique"]["episodes_seen"])
    assert out["rows"]["single_pass"]["nfe_per_image"] == c.flow["sample_steps"]  # always draws
    # Process rows also carry the teacher-forced inspection probe, named in the table's tail.
    assert out["rows"]["single_pass"]["inspection_probe"] is None
    probe = out["rows"]["self_critique"]["inspection_probe"]
    assert probe["summary"]["episodes"] > 0 and probe["positive"]["steps"] > 0
    # Phase 1 + phase 2 of the full method add up to the other rows' steps.
    p1 = max(int(d) for d in os.listdir(tmp_path / "self_critique_phase1" / "checkpoints")
             if d.isdigit())
    p2 = json.load(open(tmp_path / "self_critique" / "report" / "results.json"))
    assert p1 >= 1 and p1 + p2["train"]["end_step"] == 4
    # Learning curve: the checkpoint at 2 of 4 steps (not the first step's, which Orbax
    # also keeps), the row itself, a 1.5x run (6 steps).
    curve = dict(out["single_pass_curve"])
    assert set(curve) == {0.5, 1.0, 1.5}
    assert curve[1.0] == out["rows"]["single_pass"]["scores"]["overall"]
    assert json.load(open(tmp_path / "single_pass_x1.5" / "report" / "results.json"))[
        "train"]["end_step"] == 6
    assert "single_pass_multiple_to_match" in out
    assert open(tmp_path / "learning_curve.svg").read().startswith("<svg")
    assert sum(out["self_critique_outcomes"].values()) == c.self_critique.num_prompts
    table = open(tmp_path / "reproduction.md").read()
    at = [table.index(f"| {row} |") for row in reproduce.ROWS]
    assert at == sorted(at)  # printed in ladder order
    assert "teacher-forced probe: image errors caught" in table
    assert f"{out['rows']['additive']['episodes_seen']} seen)" in table
    assert all(r["start_step"] == 0 for r in out["rows"].values()) and "resumed" not in table
    # A row that resumed from a checkpoint says so next to its (partial) wall time.
    out["rows"]["additive"]["start_step"] = 3
    assert "(resumed at step 3) |" in reproduce.table(out)


def test_a_preempted_row_stops_the_reproduction(tmp_path, monkeypatch):
    import pytest
    from strokes_jax.train import loop

    calls = []

    def preempted_train(c, workdir, *a, **k):
        calls.append(workdir)
        return None, {"preempted": True, "end_step": 1, "losses": []}

    monkeypatch.setattr(loop, "train", preempted_train)
    with pytest.raises(reproduce.Preempted, match="preempted at step 1"):
        reproduce.run(shapes_repro.get_config("test"), "x", str(tmp_path))
    assert len(calls) == 1  # no later row started


def test_multiple_to_match_interpolates():
    from strokes_jax.evaluate import curve
    pts = [(0.5, 0.1), (1.0, 0.3), (2.0, 0.7)]
    assert curve.multiple_to_match(pts, 0.5) == 1.5
    assert curve.multiple_to_match(pts, 0.05) == 0.5
    assert curve.multiple_to_match(pts, 0.8) is None


def test_every_repro_variant_builds():
    """Each variant's config passes the setup checks (model, optimizer, mesh, sharding) and
    its rows' mixes exist; an unknown variant fails by name."""
    from strokes_jax.train import loop
    for arg in ("quick", "long", "test", None):
        c = shapes_repro.get_config(arg)
        assert set(c.reproduce.mixes) == set(reproduce.ROWS) - {"self_critique"}
        s = loop.setup(c)
        assert s.model.cfg.decoder.width == c.model.width
    assert shapes_repro.get_config("long").train.steps == 2000
    with pytest.raises(ValueError, match="'gpu'"):
        shapes_repro.get_config("gpu")


def test_rows_come_from_the_config_in_run_order():
    c = shapes_repro.get_config("test")
    assert reproduce.selected_rows(c) == reproduce.RUN_ORDER
    c.reproduce.rows = ("symbolic_critique", "single_pass")
    assert reproduce.selected_rows(c) == ("single_pass", "symbolic_critique")
    c.reproduce.rows = ("additive", "full_method")
    with pytest.raises(ValueError, match=r"reproduce\.rows.*full_method"):
        reproduce.selected_rows(c)


def test_rerunning_a_row_keeps_the_other_rows(tmp_path, monkeypatch):
    """Rerunning some rows into a workdir replaces those rows only; the table names each
    row's commit and config when they differ. A file from another config is moved aside."""
    scores = iter([0.25, 0.5, 0.75, 1.0])

    def fake_train_eval(c, workdir, modes, name):
        res = {"scores": {"overall": next(scores)}, "nfe_per_image": 20.0,
               "nfe_per_sample": 30.0}
        return None, {"losses": [], "start_step": 0}, {"results": {modes[0]: res}}

    monkeypatch.setattr(reproduce, "_train_eval", fake_train_eval)
    c = shapes_repro.get_config("test")
    c.reproduce.rows = ("additive", "edits")
    first = reproduce.run(c, "repro:test", str(tmp_path))
    assert "more than one run" not in reproduce.table(first)
    c.reproduce.rows = ("edits",)  # the same experiment: which rows run is not its config
    same = reproduce.run(c, "repro:test", str(tmp_path))
    assert same["rows"]["edits"]["scores"]["overall"] == 0.75  # redone (0.5 before)
    assert "more than one run" not in reproduce.table(same)
    c.eval.max_iterations += 1  # an override: the same command, another experiment
    second = reproduce.run(c, "repro:test", str(tmp_path))
    assert second["rows"]["additive"]["scores"]["overall"] == 0.25  # kept
    assert second["rows"]["edits"]["scores"]["overall"] == 1.0  # redone again
    assert second["rows"]["additive"]["config_sha"] != second["rows"]["edits"]["config_sha"]
    table = open(tmp_path / "reproduction.md").read()
    assert "Rows from more than one run: additive at" in table and " on cpu (config " in table
    assert list(json.load(open(tmp_path / "reproduction.json"))["rows"]) == ["additive", "edits"]
    # Another config name or step budget: refused, since the row folders would resume from
    # the other run's checkpoints; the earlier table stays as it was.
    before = open(tmp_path / "reproduction.json").read()
    with pytest.raises(ValueError, match=r"repro:test at 8 steps per row, not repro:other"):
        reproduce.run(c, "repro:other", str(tmp_path))
    c.train.steps += 1
    with pytest.raises(ValueError, match="use a fresh --workdir"):
        reproduce.run(c, "repro:test", str(tmp_path))
    assert open(tmp_path / "reproduction.json").read() == before
