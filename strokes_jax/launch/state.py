"""The launcher's memory on this machine: every slice it created (its spec) and the newest job
on each (name, workdir, command, when it started, what was last seen), so that `logs`,
`status` and a rerun of `run` find them after the terminal closed or the launcher was killed.

One JSON file, ~/.strokes_pod/state.json unless $STROKES_POD_STATE or --state names another;
every change is read, modified and replaced atomically under a lock, so two launchers (one
per slice) do not lose each other's records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time

DEFAULT = os.path.join("~", ".strokes_pod", "state.json")


def default_path() -> str:
    return os.path.expanduser(os.environ.get("STROKES_POD_STATE") or DEFAULT)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class State:
    def __init__(self, path: str | None = None, dry_run: bool = False):
        self.path = os.path.expanduser(path) if path else default_path()
        self.dry_run = dry_run  # a dry run reads the records and writes none

    def read(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            data = {}
        except ValueError as e:
            raise ValueError(f"{self.path}: not a launcher state file ({e}); move it away") from None
        data.setdefault("pods", {})
        data.setdefault("sweeps", {})
        return data

    @contextlib.contextmanager
    def update(self):
        """Yields the records to change in place; written back when the block ends."""
        if self.dry_run:
            yield self.read()
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.read()
            yield data
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)

    def pod(self, name: str) -> dict | None:
        return self.read()["pods"].get(name)

    def set_pod(self, spec: dict, **fields) -> None:
        with self.update() as data:
            entry = data["pods"].setdefault(spec["name"], {})
            entry.update(spec=spec, updated=now(), **fields)

    def set_job(self, pod: str, **fields) -> dict:
        """Merges `fields` into the pod's newest job (a new `job` name starts a new record)."""
        with self.update() as data:
            entry = data["pods"].setdefault(pod, {})
            job = entry.get("job") or {}
            if fields.get("job") and fields["job"] != job.get("job"):
                job = {}
            job.update(fields, updated=now())
            entry["job"] = job
            return dict(job)

    def put_job(self, pod: str, job: dict | None) -> None:
        with self.update() as data:
            entry = data["pods"].setdefault(pod, {})
            if job:
                entry["job"] = job
            else:
                entry.pop("job", None)

    def forget(self, pod: str) -> None:
        with self.update() as data:
            data["pods"].pop(pod, None)
