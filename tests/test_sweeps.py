"""Config sweeps: declaring (product / zip / run names / keys checked against the schema),
running (dry run, skips of finished points, a failed point, a preempted one) with stand-in
children, gathering one table; and, slow, a real 3-point sweep on shapes_tiny:test that a
rerun skips entirely."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from strokes_jax import sweeps as hyper


def test_sweep_and_product_in_declaration_order():
    lr, steps = hyper.sweep("optim.lr", [1e-3, 3e-4]), hyper.sweep("train.steps", [10, 20])
    assert lr == [{"optim.lr": 1e-3}, {"optim.lr": 3e-4}]
    expect = [{"optim.lr": 1e-3, "train.steps": 10}, {"optim.lr": 1e-3, "train.steps": 20},
              {"optim.lr": 3e-4, "train.steps": 10}, {"optim.lr": 3e-4, "train.steps": 20}]
    assert hyper.product(lr, steps) == expect
    assert hyper.product([lr, steps]) == expect  # big_vision's hyper.product([...])
    with pytest.raises(hyper.SweepError, match="optim.lr is set by two axes"):
        hyper.product(lr, lr)


def test_zip_pairs_the_axes():
    pts = hyper.zip(hyper.sweep("optim.lr", [1e-3, 3e-4]), hyper.sweep("train.steps", [10, 20]))
    assert pts == [{"optim.lr": 1e-3, "train.steps": 10}, {"optim.lr": 3e-4, "train.steps": 20}]
    assert hyper.zip_ is hyper.zip
    with pytest.raises(hyper.SweepError, match="different lengths"):
        hyper.zip(hyper.sweep("optim.lr", [1e-3]), hyper.sweep("train.steps", [10, 20]))


def test_run_names_are_short_readable_and_distinct():
    pts = hyper.product(hyper.sweep("optim.lr", [1e-3]), hyper.sweep("train.steps", [10]),
                        hyper.sweep("bench.steps", [2]))
    assert hyper.run_names(pts) == ["lr=0.001,train.steps=10,bench.steps=2"]
    pts = hyper.zip(hyper.sweep("train.sparse_routing", [(0.5, 0.5), ()]),
                    hyper.sweep("model.attention", ["x/y", "cudnn"]))
    assert hyper.run_names(pts) == ["sparse_routing=0.5_0.5,attention=x_y", "sparse_routing=none,attention=cudnn"]
    a, b = hyper.run_names(hyper.sweep("model.attention", ["a b", "a/b"]))  # both sanitise to a_b
    assert a != b and a.startswith("attention=a_b-") and b.startswith("attention=a_b-")
    assert hyper.run_names([{}]) == ["base"]
    assert len(hyper.run_names(hyper.sweep("model.attention", ["z" * 300]))[0]) < 100
    with pytest.raises(hyper.SweepError, match="appears twice"):
        hyper.run_names(hyper.sweep("optim.lr", [1e-3, 1e-3]))


def test_shapes_tiny_declares_a_learning_rate_sweep():
    points = hyper.expand("shapes_tiny:test", {"train.tb_images": "0", "eval.kv_cache": "false"})
    assert [p.name for p in points] == ["lr=0.0003", "lr=0.001", "lr=0.003"]
    assert [p.config.optim.lr for p in points] == [3e-4, 1e-3, 3e-3]
    assert all(p.config.train.tb_images == 0 and p.config.eval.kv_cache is False for p in points)
    assert all(p.config.train.steps == 8 for p in points)  # the test variant's own settings


def _config_file(tmp_path, sweep_expr: str) -> str:
    path = tmp_path / "mine.py"
    path.write_text(textwrap.dedent(f"""
        from strokes_jax.configs import shapes_tiny

        def get_config(arg=None):
            return shapes_tiny.get_config("test")

        def get_sweep(arg, hyper):
            return {sweep_expr}
    """))
    return str(path)


@pytest.mark.parametrize("sweep_expr, message", [
    ('hyper.sweep("optim.lr", [1e-3]) + hyper.sweep("optim.lrr", [1e-3])',
     "sweep point lrr=0.001: unknown config key optim.lrr (did you mean optim.lr?)"),
    ('hyper.sweep("optm.lr", [1e-3])', "sweep point lr=0.001: unknown config key optm (did you mean optim?)"),
    ('hyper.sweep("optim.lr", [1e-3, -1.0])', "sweep point lr=-1.0: config key optim.lr: -1.0 is not a number > 0"),
    ('hyper.sweep("train.steps", [2.5])', "sweep point steps=2.5: config key train.steps:"),
    ('hyper.sweep("optim", [1])', "sweep point optim=1: config key optim holds a section"),
    ('hyper.sweep("vae", [1])', "sweep point vae=1: config key vae holds None"),
])
def test_a_bad_point_fails_naming_the_point_and_key(tmp_path, sweep_expr, message):
    with pytest.raises(hyper.SweepError) as e:
        hyper.expand(_config_file(tmp_path, sweep_expr))
    assert str(e.value).startswith(message), str(e.value)


def test_sweep_wide_overrides_are_checked_too(tmp_path):
    with pytest.raises(hyper.SweepError, match="sweep point lr=0.0003: unknown config key train.tb_imagse"):
        hyper.expand("shapes_tiny:test", {"train.tb_imagse": "0"})
    with pytest.raises(hyper.SweepError, match="optim.lr: swept by"):
        hyper.expand("shapes_tiny:test", {"optim.lr": "0.1"})
    with pytest.raises(hyper.SweepError, match="declares no sweep"):
        hyper.expand("shapes_repro")


def test_the_preemption_code_is_the_command_lines():
    from strokes_jax.__main__ import EXIT_PREEMPTED
    assert hyper.EXIT_PREEMPTED == EXIT_PREEMPTED


def test_a_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
    """In a child whose `jax` cannot be imported: expanding and printing stays light."""
    poison = tmp_path / "poison"
    for name in ("jax", "tensorflow"):
        (poison / name).mkdir(parents=True)
        (poison / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
    wd = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-c", "import sys; from strokes_jax import sweeps; sys.exit(sweeps.main("
                        f"['run', '--config', 'shapes_tiny:test', '--workdir', {str(wd)!r}, '--dry-run', "
                        "'--config.train.tb_images=0']))"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(poison)), cwd=tmp_path, timeout=3600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3, r.stdout
    for line, lr in zip(lines, ("0.0003", "0.001", "0.003")):
        assert line.endswith(f"-m strokes_jax demo --config shapes_tiny:test --workdir {wd}/lr={lr} "
                             f"--config.train.tb_images=0 --config.optim.lr={lr}"), line
    assert not wd.exists()


# A stand-in for `python -m strokes_jax demo`: behaves by its run name, writes what a
# finished demo leaves (train_record.json at train.steps, report/results.json).
_FAKE = """
import json, os, sys
run_dir = sys.argv[1]
name = os.path.basename(run_dir)
print("fake run", name)
if os.environ.get("FAKE_FAIL") == name:
    sys.exit(3)
if os.environ.get("FAKE_PREEMPT") == name:
    sys.exit(75)
lr = float(name.split("=")[1])
os.makedirs(os.path.join(run_dir, "report"), exist_ok=True)
json.dump({"end_step": 8, "train_seconds": 1.5, "losses": [[4, 2.0], [8, lr * 100]]},
          open(os.path.join(run_dir, "train_record.json"), "w"))
scores = {"overall": 1 - lr * 100, "counting": 0.5}
json.dump({"results": {"process": {"scores": scores, "nfe_per_sample": 7.0},
                       "single_pass": {"scores": {"overall": 0.0}, "nfe_per_sample": 3.0}}},
          open(os.path.join(run_dir, "report", "results.json"), "w"))
"""


@pytest.fixture
def fake_children(monkeypatch, tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(_FAKE)
    launched = []

    def argv(command, spec, run_dir, overrides):
        launched.append(os.path.basename(run_dir))
        return [sys.executable, str(script), run_dir]
    monkeypatch.setattr(hyper, "_argv", argv)
    return launched


def _statuses(wd):
    return {p["name"]: p["status"] for p in json.load(open(wd / "sweep.json"))["points"]}


def test_a_failed_point_is_reported_and_the_rest_still_run(tmp_path, fake_children, monkeypatch, capsys):
    wd = tmp_path / "sweep"
    monkeypatch.setenv("FAKE_FAIL", "lr=0.001")
    assert hyper.run("shapes_tiny:test", str(wd)) == 1
    assert _statuses(wd) == {"lr=0.0003": "done", "lr=0.001": "failed", "lr=0.003": "done"}
    out = capsys.readouterr().out
    assert "failed: lr=0.001 (exit code 3;" in out
    assert "fake run lr=0.001" in (wd / "lr=0.001" / "log.txt").read_text()
    monkeypatch.delenv("FAKE_FAIL")
    fake_children.clear()
    assert hyper.run("shapes_tiny:test", str(wd)) == 0  # the rerun retries only the failed point
    assert fake_children == ["lr=0.001"]
    assert _statuses(wd) == {"lr=0.0003": "skipped-finished", "lr=0.001": "done", "lr=0.003": "skipped-finished"}
    rec = json.load(open(wd / "sweep.json"))
    assert rec["config"] == "shapes_tiny:test" and rec["points"][1]["overrides"] == {"optim.lr": 1e-3}
    with pytest.raises(hyper.SweepError, match="holds a sweep of config 'shapes_tiny:test'"):
        hyper.run("shapes_tiny", str(wd))


def test_a_preempted_point_stops_the_sweep(tmp_path, fake_children, monkeypatch):
    wd = tmp_path / "sweep"
    monkeypatch.setenv("FAKE_PREEMPT", "lr=0.001")
    assert hyper.run("shapes_tiny:test", str(wd)) == hyper.EXIT_PREEMPTED
    assert _statuses(wd) == {"lr=0.0003": "done", "lr=0.001": "preempted", "lr=0.003": "pending"}
    monkeypatch.delenv("FAKE_PREEMPT")
    fake_children.clear()
    assert hyper.run("shapes_tiny:test", str(wd)) == 0
    assert fake_children == ["lr=0.001", "lr=0.003"]


_WAITS_FOR_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))  # as a training run: save, exit 75
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""


def test_sigterm_reaches_the_running_point_and_stops_the_sweep(tmp_path):
    (tmp_path / "child.py").write_text(_WAITS_FOR_SIGTERM)
    driver = textwrap.dedent(f"""
        import sys
        from strokes_jax import sweeps
        sweeps._argv = lambda command, spec, run_dir, overrides: [sys.executable, {str(tmp_path / "child.py")!r}]
        sys.exit(sweeps.main(["run", "--config", "shapes_tiny:test", "--workdir", {str(tmp_path / "w")!r}]))
    """)
    p = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, cwd=tmp_path)
    seen = []
    for line in p.stdout:  # waits on progress, not on a clock
        seen.append(line)
        if line.strip() == "ready":
            p.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + p.communicate(timeout=3600)[0]
    assert p.returncode == hyper.EXIT_PREEMPTED, out
    assert "rerun the same sweep command to resume" in out
    assert _statuses(tmp_path / "w") == {"lr=0.0003": "preempted", "lr=0.001": "pending", "lr=0.003": "pending"}


def test_results_are_one_sorted_table(tmp_path, fake_children):
    wd = tmp_path / "sweep"
    assert hyper.run("shapes_tiny:test", str(wd)) == 0
    out = hyper.results(str(wd))
    assert [r["name"] for r in out["rows"]] == ["lr=0.0003", "lr=0.001", "lr=0.003"]  # highest overall first
    assert out["rows"][0]["process.overall"] == pytest.approx(0.97)
    assert out["rows"][0]["final_loss"] == pytest.approx(0.03)
    md = (wd / "sweep_results.md").read_text()
    assert "| name | status | optim.lr | process.overall | process.nfe_per_sample |" in md
    assert "| lr=0.0003 | done | 0.0003 | 0.97 | 7 |" in md
    with open(wd / "sweep_results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["optim.lr"] for r in table] == ["0.0003", "0.001", "0.003"]
    assert table[0]["process.counting"] == "0.5" and table[0]["train_seconds"] == "1.5"
    by_loss = hyper.results(str(wd), sort_by="final_loss")  # lower is better: lowest first
    assert [r["name"] for r in by_loss["rows"]] == ["lr=0.0003", "lr=0.001", "lr=0.003"]
    assert [r["name"] for r in hyper.results(str(wd), "final_loss", descending=True)["rows"]][0] == "lr=0.003"
    try:
        import matplotlib  # noqa: F401
        assert out["plot"] and os.path.getsize(out["plot"]) > 0
    except ImportError:
        assert out["plot"] is None and "matplotlib is not installed" in out["plot_note"]
    with pytest.raises(hyper.SweepError, match="no run has 'process.nope'"):
        hyper.results(str(wd), sort_by="process.nope")
    assert hyper.main(["results", "--workdir", str(wd)]) == 0


def test_the_command_line_rejects_what_it_does_not_know(tmp_path, capsys):
    assert hyper.main(["run", "--config", "shapes_tiny:test", "--workdir", str(tmp_path),
                       "--dry-run", "--config.optim.lrr=1"]) == 2
    assert "error: sweep point lr=0.0003: unknown config key optim.lrr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hyper.main(["run", "--config", "shapes_tiny:test", "--workdir", str(tmp_path), "--bogus"])
    assert hyper.main(["results", "--workdir", str(tmp_path / "none")]) == 2


@pytest.mark.slow
def test_a_real_sweep_runs_resumes_and_gathers(tmp_path, capsys):
    """Three demo runs on shapes_tiny:test (about a minute each on 2 CPU cores); the rerun
    starts no run; the table holds the three with their scores."""
    wd = tmp_path / "sweep"
    args = ["run", "--config", "shapes_tiny:test", "--workdir", str(wd), "--config.train.tb_images=0",
            "--config.train.steps=4", "--config.train.checkpoint_every=4", "--config.train.eval_every=0"]
    assert hyper.main(args) == 0, capsys.readouterr().out[-3000:]
    names = ["lr=0.0003", "lr=0.001", "lr=0.003"]
    assert _statuses(wd) == dict.fromkeys(names, "done")
    logs = {n: (wd / n / "log.txt").read_text() for n in names}
    assert all("trained 0 -> 4 steps" in log for log in logs.values()), logs
    assert "--config.optim.lr=0.003" in logs["lr=0.003"]
    capsys.readouterr()
    assert hyper.main(args) == 0
    assert _statuses(wd) == dict.fromkeys(names, "skipped-finished")
    assert {n: (wd / n / "log.txt").read_text() for n in names} == logs  # nothing ran
    assert "3 skipped-finished" in capsys.readouterr().out
    out = hyper.results(str(wd))
    assert sorted(r["name"] for r in out["rows"]) == names
    for r in out["rows"]:
        assert 0.0 <= r["process.overall"] <= 1.0 and r["single_pass.nfe_per_sample"] > 0
        assert r["end_step"] == 4 and r["final_loss"] > 0
    md = (wd / "sweep_results.md").read_text()
    assert all(f"| {n} | skipped-finished |" in md for n in names)
