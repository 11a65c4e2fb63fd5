"""The README keeps exactly two commands, and CI runs the README's test command verbatim."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S).group(1)
    return [l for l in block.splitlines() if l.strip() and not l.lstrip().startswith("#")]


def test_readme_has_exactly_two_commands():
    cmds = _commands()
    assert len(cmds) == 2, cmds
    assert "strokes_jax demo" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert _commands()[1] in ci.splitlines()
