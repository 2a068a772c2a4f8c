"""Checkpointed stages: a rerun after a crash resumes from the last completed stage.

Each stage writes into a private folder `<workdir>/<name>.partial-<pid>`; only when the stage function returns
is that folder fsynced and renamed to `<workdir>/<name>` with a `_DONE.json` marker inside. A stage folder without
the marker (or a leftover `.partial-*`) is never trusted: it is removed and the stage runs again. The marker
records the stage's inputs fingerprint, so a rerun with different inputs or config recomputes instead of reusing
stale work.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

DONE_MARKER = "_DONE.json"


def fingerprint(obj: Any) -> str:
    """Stable sha256 of a JSON-able object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class StageRecord:
    name: str
    resumed: bool
    seconds: float
    result: dict


@dataclass
class StageRunner:
    """Runs named stages once per inputs fingerprint inside `workdir`.

    Args:
        workdir: folder that holds one sub-folder per completed stage.

    Example:
        >>> runner = StageRunner(Path(tmp))
        >>> out = runner.run("pairs", {"since": 0}, lambda d: {"n": 3})
        >>> out["n"]
        3
    """

    workdir: Path
    records: list[StageRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for leftover in self.workdir.glob("*.partial-*"):
            log.info("removing partial stage output %s left by a crashed run", leftover)
            shutil.rmtree(leftover, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.workdir / name

    def done(self, name: str, key: str | None = None) -> dict | None:
        marker = self.path(name) / DONE_MARKER
        if not marker.exists():
            return None
        record = json.loads(marker.read_text())
        if key is not None and record.get("key") != key:
            return None
        return record

    def run(self, name: str, inputs: Any, fn: Callable[[Path], dict]) -> dict:
        """Run `fn(stage_dir) -> result` unless a completed stage with the same inputs exists.

        Returns the stage's JSON result (from the marker when resumed).
        """
        key = fingerprint(inputs)
        record = self.done(name, key)
        if record is not None:
            log.info("stage %s: resumed from %s", name, self.path(name))
            self.records.append(StageRecord(name, True, 0.0, record["result"]))
            return record["result"]
        final = self.path(name)
        if final.exists():
            shutil.rmtree(final)  # incomplete or made from other inputs
        partial = self.workdir / f"{name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        start = time.perf_counter()
        log.info("stage %s: running", name)
        result = fn(partial) or {}
        seconds = time.perf_counter() - start
        (partial / DONE_MARKER).write_text(json.dumps({"key": key, "result": result, "seconds": seconds},
                                                      sort_keys=True, default=str))
        _fsync_tree(partial)
        os.rename(partial, final)
        fd = os.open(self.workdir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(StageRecord(name, False, seconds, result))
        return result

    def summary(self) -> list[dict]:
        return [{"stage": r.name, "resumed": r.resumed, "seconds": round(r.seconds, 3)} for r in self.records]
