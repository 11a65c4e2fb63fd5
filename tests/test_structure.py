"""The package's shape: no import cycles between modules or between packages (read from the
sources with ast, so a cycle is caught before anything imports), configs inside the package,
and a single command-line door."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "strokes_jax")


def _modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
                    os.path.join(d, f)
    return out


def _type_checking_only(node, parents) -> bool:
    return any(isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test)
               for p in parents)


def _imports(path: str, mods: dict[str, str], name: str) -> set[str]:
    """Modules of the package that `path` imports, at any depth of the file (a function-local
    import is still an edge), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(open(path).read())
    out = set()

    def visit(node, parents):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not _type_checking_only(node, parents):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative import
                    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    out.add(t)
        for child in ast.iter_child_nodes(node):
            visit(child, parents + [node])

    visit(tree, [])
    return out


def _graph():
    mods = _modules()
    return {m: _imports(p, mods, m) for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := dfs(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := dfs(n)):
            return c
    return None


def _package(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else mod


def test_no_import_cycle_between_modules():
    graph = {m: {t for t in ts if t != "strokes_jax"} for m, ts in _graph().items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_import_cycle_between_packages():
    """strokes_jax.worlds -> episodes -> sequence -> model -> data -> train -> inference ->
    evaluate: a package may import the ones it builds on, never the other way round."""
    pkgs: dict[str, set[str]] = {}
    for m, ts in _graph().items():
        src = _package(m)
        pkgs.setdefault(src, set()).update(_package(t) for t in ts if _package(t) != src
                                           and t != "strokes_jax")
    assert _cycle(pkgs) is None, " -> ".join(_cycle(pkgs))


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_configs_live_in_the_package():
    from strokes_jax import configs
    for name in configs.NAMES:
        assert os.path.isfile(os.path.join(PKG, "configs", name + ".py"))
    assert not os.path.exists(os.path.join(ROOT, "configs"))


@pytest.mark.parametrize("mod", ["strokes_jax.convert", "strokes_jax.inference",
                                 "strokes_jax.train", "strokes_jax.evaluate"])
def test_one_command_line_door(mod):
    """Every command runs through `python -m strokes_jax`; no subpackage has its own."""
    assert not os.path.exists(os.path.join(ROOT, *mod.split("."), "__main__.py"))
    for path in _modules().values():
        if not path.endswith(os.path.join("strokes_jax", "__main__.py")):
            assert '__name__ == "__main__"' not in open(path).read(), path


@pytest.mark.slow
def test_the_wheel_carries_the_configs(tmp_path):
    """A plain `pip install .` (not -e) must find its configs: they are package modules."""
    import shutil
    import subprocess
    import sys
    import zipfile
    # Built from a copy: setuptools writes build/ and egg-info next to the sources.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "runs", "build", "*.egg-info", "__pycache__", "results", "docs"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("strokes_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("shapes_tiny", "shapes_repro", "mot_1b", "bagel7b_process", "schema"):
        assert f"strokes_jax/configs/{name}.py" in names
    assert not any(n.startswith(("configs/", "tests/", "scripts/")) for n in names)
    assert any(n.endswith("LICENSE") for n in names)
