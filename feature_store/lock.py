"""The store's writer lock: ``fcntl.flock`` on ``<root>/LOCK``, holder details written inside.

Why flock: the kernel drops it when the holder dies (even by SIGKILL), so a crashed writer never leaves a stale
lock behind; the pid/host/command written into the file are only for the error message of the next contender.
The lock is re-entrant within one thread of one process (a retraining run holds it for its whole run and its
``publish`` re-enters it); another process, or another thread, is refused with :class:`StoreLockedError`.
flock is advisory and works on local filesystems; NFS needs ``local_lock=none`` / lockd (documented limit).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

LOCK_FILE = "LOCK"


class StoreLockedError(RuntimeError):
    """Another writer holds the store lock. ``holder`` has its pid, host, command and start time."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


@dataclass
class _Held:
    fd: int
    pid: int
    thread: int
    depth: int = 1
    info: dict = field(default_factory=dict)


# realpath of the lock file -> the lock this process holds on it
_HELD: dict[str, _Held] = {}
_GUARD = threading.Lock()


def holder_info(purpose: str = "") -> dict:
    """Who we are, as written into the lock file."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
        "purpose": purpose,
    }


def read_holder(lock_path: Path) -> dict:
    """Best-effort read of the holder details (may be empty while a holder is starting up)."""
    try:
        text = lock_path.read_text(encoding="utf-8").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "an unknown holder (it has not written its details yet)"
    parts = [f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"]
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    if holder.get("purpose"):
        parts.append(f"for {holder['purpose']!r}")
    if holder.get("command"):
        parts.append(f"(command: {holder['command']})")
    return " ".join(parts)


@contextmanager
def store_lock(lock_path: Path, *, timeout: float = 0.0, purpose: str = "",
               poll_interval: float = 0.05) -> Iterator[dict]:
    """Hold the exclusive writer lock on ``lock_path`` for the body of the ``with``.

    Args:
        lock_path: the lock file (created when missing).
        timeout: seconds to wait for a busy lock; 0 refuses at once.
        purpose: free text shown to contenders ("publish", "retrain", ...).
        poll_interval: seconds between attempts while waiting.
    Yields:
        the holder details written into the lock file.
    Raises:
        StoreLockedError: the lock is held by another process (or thread) after ``timeout``.
    """
    key = os.path.realpath(lock_path)
    me = (os.getpid(), threading.get_ident())
    with _GUARD:
        held = _HELD.get(key)
        if held is not None and held.pid == me[0]:
            if held.thread == me[1]:
                held.depth += 1
                reentered = held
            else:
                reentered = None
                other_thread = held.info
        else:
            reentered = None
            other_thread = None
            if held is not None:  # inherited over fork: not ours
                _HELD.pop(key, None)
    if reentered is not None:
        try:
            yield reentered.info
        finally:
            with _GUARD:
                reentered.depth -= 1
        return
    if other_thread is not None:
        raise StoreLockedError(f"feature store lock {lock_path} is held by another thread of this process: "
                               f"{describe_holder(other_thread)}", other_thread)

    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + max(timeout, 0.0)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = read_holder(lock_path)
                    waited = f" after waiting {timeout:g}s" if timeout > 0 else ""
                    raise StoreLockedError(
                        f"feature store is locked{waited}: {lock_path} is held by {describe_holder(holder)}; "
                        "another writer is publishing or retraining. Retry when it finishes (the lock is released "
                        "automatically if that process dies).", holder) from None
                time.sleep(poll_interval)
    except BaseException:
        os.close(fd)
        raise
    info = holder_info(purpose)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    held = _Held(fd=fd, pid=me[0], thread=me[1], info=info)
    with _GUARD:
        _HELD[key] = held
    try:
        yield info
    finally:
        with _GUARD:
            _HELD.pop(key, None)
        try:
            os.ftruncate(fd, 0)  # no stale holder details once released
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
