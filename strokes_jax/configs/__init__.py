"""Configs shipped with the package, picked by name or by path.

`--config NAME[:ARG]` names a file here (`shapes_tiny`, `shapes_repro`, `mot_1b`,
`bagel7b_process`, with or without `.py`); any other value is a path to a config file of
your own. ARG is the file's variant string, `key=value` pairs or flags separated by commas
(`shapes_repro:long`, `shapes_tiny:test`), parsed by `schema.parse_arg`.

Resolving a name imports nothing heavy, so a missing file fails at once.
"""

from __future__ import annotations

import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("shapes_tiny", "shapes_repro", "mot_1b", "bagel7b_process")
DEFAULT = "shapes_tiny"


class ConfigNotFound(ValueError):
    pass


def resolve(spec: str) -> str:
    """`NAME[:ARG]` or `PATH[:ARG]` -> `PATH[:ARG]` of an existing file; ConfigNotFound names
    what was looked for."""
    path, sep, arg = spec.partition(":")
    if os.path.isfile(path):
        return spec
    name = os.path.basename(path)
    name = name[:-3] if name.endswith(".py") else name
    packaged = os.path.join(HERE, name + ".py")
    if name in NAMES and (path in (name, name + ".py") or not os.path.exists(path)):
        return packaged + sep + arg
    raise ConfigNotFound(f"config file not found: {path!r} (packaged configs: {', '.join(NAMES)})")


def load(spec: str):
    """`NAME[:ARG]` or `PATH[:ARG]` -> the file's get_config(ARG), checked against the schema."""
    from strokes_jax.configs import schema

    path, _, arg = resolve(spec).partition(":")
    mod_spec = importlib.util.spec_from_file_location("_strokes_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return schema.check(mod.get_config(arg or None))


def overrides(extra, allowed: bool, error, hint: str = "") -> dict[str, str]:
    """`--config.KEY=VALUE` arguments (what argparse left over) -> {KEY: VALUE}. Anything
    else, or any override where the command takes none (`allowed` false), goes to `error`
    (argparse's parser.error) naming the argument."""
    out = {}
    for a in extra:
        key, eq, value = a.partition("=")
        if not allowed or not key.startswith("--config.") or not eq:
            error(f"unrecognized argument {a!r}{hint}")
        out[key[len("--config."):]] = value
    return out
