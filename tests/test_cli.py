"""The command line and the config schema: `--help`, a missing config file, an unknown key
and an unknown variant each give one line and exit code 2 without importing JAX or
TensorFlow (the child cannot import them); every packaged config passes the schema."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from strokes_jax import configs
from strokes_jax.configs import schema


@pytest.fixture(scope="module")
def no_jax(tmp_path_factory):
    """A PYTHONPATH entry whose `jax` and `tensorflow` raise on import."""
    d = tmp_path_factory.mktemp("poison")
    for name in ("jax", "tensorflow"):
        (d / name).mkdir()
        (d / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
    return str(d)


def _cli(args, no_jax, cwd):
    env = dict(os.environ, PYTHONPATH=no_jax)
    return subprocess.run([sys.executable, "-m", "strokes_jax", *args], capture_output=True,
                          text=True, env=env, cwd=cwd)


def test_help_lists_every_command(no_jax, tmp_path):
    from strokes_jax.__main__ import COMMANDS
    r = _cli(["--help"], no_jax, tmp_path)
    assert r.returncode == 0, r.stderr
    for cmd in COMMANDS:
        assert f"  {cmd} " in r.stdout
    r = _cli(["train", "--help"], no_jax, tmp_path)
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "nope.py"], "error: config file not found: 'nope.py'"),
    (["train", "--config=shapes_tiny:test", "--config.eval.cfg_txt_scale=2"],
     "error: unknown config key eval.cfg_txt_scale (did you mean eval.cfg_text_scale?)"),
    (["train", "--config", "shapes_tiny:tset"],
     "error: config variant 'tset': unknown (this config takes: images, test)"),
    (["frobnicate"], "error: unknown command 'frobnicate'"),
    (["train", "--config", "shapes_tiny:test", "--config.train.keep_checkpoints=0"],
     "error: config key train.keep_checkpoints: 0 is not a whole number >= 1"),
    (["train", "--config", "shapes_tiny:test", "--config.train.checkpoint_every=0"],
     "error: config key train.checkpoint_every: 0 is not a whole number >= 1"),
    (["train", "--config", "shapes_tiny:test", "--config.train.steps=-5"],
     "error: config key train.steps: -5 is not a whole number >= 0"),
    (["train", "--config", "shapes_tiny:test", "--config.data.batch_size=0"],
     "error: config key data.batch_size: 0 is not a whole number >= 1"),
    (["train", "--config", "shapes_tiny:test", "--config.train.steps=abc"],
     "error: flag --config.train.steps=abc: invalid literal for int()"),
])
def test_bad_input_is_one_line_before_jax(args, message, no_jax, tmp_path):
    r = _cli(args + [f"--workdir={tmp_path / 'w'}"], no_jax, tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert not os.path.exists(tmp_path / "w")


def test_a_workdir_that_is_a_file_is_refused(no_jax, tmp_path):
    (tmp_path / "afile").write_text("")
    r = _cli(["train", "--config", "shapes_tiny:test", f"--workdir={tmp_path / 'afile'}"], no_jax,
             tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == \
        f"error: --workdir {tmp_path / 'afile'}: is a file, not a folder"


@pytest.mark.slow
def test_a_preempted_run_exits_with_its_own_code(tmp_path):
    """SIGTERM during `train`: the checkpoint is saved, the command says so and exits 75, not
    0, so a retry loop can tell a preempted run from a finished one."""
    import signal
    from strokes_jax.__main__ import EXIT_PREEMPTED
    p = subprocess.Popen([sys.executable, "-m", "strokes_jax", "train", "--config", "shapes_tiny:test",
                          f"--workdir={tmp_path / 'w'}", "--config.train.steps=100000",
                          "--config.train.tb_images=0", "--config.train.eval_every=0"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    seen = []
    for line in p.stdout:  # waits on progress, not on a clock
        seen.append(line)
        if line.startswith("step 4/"):
            p.send_signal(signal.SIGTERM)
            break
    rest, _ = p.communicate()
    out = "".join(seen) + rest
    assert p.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "preempted at step" in out and "rerun the command to resume" in out
    assert os.listdir(tmp_path / "w" / "checkpoints")


def test_an_unknown_key_in_a_config_file_fails_naming_it(tmp_path, no_jax):
    """BAGEL's CFG keys under `flow` (they belong in `eval`) are an error, not a silent no-op."""
    path = tmp_path / "mine.py"
    path.write_text(textwrap.dedent("""
        from strokes_jax.configs import bagel7b_process

        def get_config(arg=None):
            c = bagel7b_process.get_config("test")
            c.flow.cfg_text_scale = 4.0
            return c
    """))
    with pytest.raises(AttributeError, match="cfg_text_scale"):
        configs.load(str(path))
    r = _cli(["train", "--config", str(path)], no_jax, tmp_path)
    assert r.returncode == 2 and "cfg_text_scale" in r.stderr and len(r.stderr.splitlines()) == 1


def test_check_names_every_unknown_key():
    c = ml_collections.ConfigDict(schema.defaults().to_dict())
    c.eval.cfg_txt_scale = 2.0
    c.bogus = 1
    with pytest.raises(schema.ConfigKeyError) as e:
        schema.check(c)
    assert "eval.cfg_txt_scale (did you mean eval.cfg_text_scale?)" in str(e.value)
    assert "bogus" in str(e.value)
    c = ml_collections.ConfigDict(schema.defaults().to_dict())
    c.data.mix = dict(edit=1.0)  # open maps take any key; the mixer checks them
    schema.check(c)


@pytest.mark.parametrize("spec", ["shapes_tiny", "shapes_tiny:test", "shapes_repro",
                                  "shapes_repro:long", "shapes_repro:quick", "shapes_repro:test",
                                  "mot_1b", "mot_1b:fsdp", "bagel7b_process",
                                  "bagel7b_process:gpu8", "bagel7b_process:test"])
def test_packaged_configs_pass_the_schema(spec):
    c = configs.load(spec)
    assert schema.check(c) is c


def test_bagel_config_puts_cfg_where_generation_reads_it():
    c = configs.load("bagel7b_process")
    assert (c.eval.cfg_text_scale, tuple(c.eval.cfg_interval), c.eval.cfg_renorm) == \
        (4.0, (0.4, 1.0), "global")
    assert c.flow.sample_steps == 50 and c.flow.sample_shift == 3.0


def test_config_names_and_paths_resolve(tmp_path):
    assert configs.resolve("shapes_repro:long") == os.path.join(configs.HERE, "shapes_repro.py:long")
    assert configs.resolve("shapes_repro.py") == os.path.join(configs.HERE, "shapes_repro.py")
    own = tmp_path / "shapes_tiny.py"  # a file of the user's own wins over the packaged name
    own.write_text("")
    assert configs.resolve(f"{own}:test") == f"{own}:test"
    with pytest.raises(configs.ConfigNotFound, match="packaged configs"):
        configs.resolve("no_such_config")


def test_parse_arg_variants():
    o = schema.parse_arg("test,steps=20,name=abc", test=False, steps=0, name="", long=False)
    assert (o.test, o.steps, o.name, o.long) == (True, 20, "abc", False)
    assert schema.parse_arg(None, test=False).test is False
    with pytest.raises(schema.ConfigKeyError, match="needs a value"):
        schema.parse_arg("steps", steps=0)


def test_schedule_length_follows_the_training_steps():
    """optim.total_steps None means train.steps, so `--config.train.steps=10` shortens the
    cosine schedule with it; setting both keeps both."""
    from strokes_jax.train import state as st
    c = configs.load("shapes_tiny")
    assert c.optim.total_steps is None
    c.optim.warmup_steps = 2
    end = c.optim.lr * c.optim.end_lr_factor
    assert float(st.schedule(c.optim, 10)(10)) == pytest.approx(end)
    assert float(st.schedule(c.optim, 1000)(10)) > 10 * end
    c.optim.total_steps = 20
    assert float(st.schedule(c.optim, 10)(10)) > end
    assert float(st.schedule(c.optim, 10)(20)) == pytest.approx(end)


@pytest.mark.slow
def test_the_demo_prints_no_alarming_lines(tmp_path):
    """What a user sees: progress, the score table and the report path; no WARNING lines
    from TFDS or absl, no 'Downloading' (nothing is downloaded), no native-library notices."""
    r = subprocess.run([sys.executable, "-m", "strokes_jax", "demo", "--config", "shapes_tiny:test",
                        f"--workdir={tmp_path / 'w'}", "--config.train.tb_images=0"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    for bad in ("WARNING", "Downloading", "Traceback", "absl::InitializeLog", "oneDNN"):
        assert bad not in out, out
    assert "| process |" in r.stdout and "report:" in r.stdout
    assert "trained 0 -> 8 steps" in out
