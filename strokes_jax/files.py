"""Small JSON records (run_info.json, train_record.json) written atomically, through
etils.epath so that a gs:// workdir works the same as a local one."""

from __future__ import annotations

import json

from etils import epath


def read_json(path: str):
    """The parsed file, or None when it does not exist."""
    p = epath.Path(path)
    if not p.exists():
        return None
    return json.loads(p.read_text())


def write_json(path: str, obj, **dump) -> None:
    """Written to a temporary name, then renamed over `path`: readers see the old record or
    the new one, never half of one."""
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / (p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, **dump))
    tmp.replace(p)


def makedirs(path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)
