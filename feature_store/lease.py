"""The writer lock of an object-storage store: a lease object created by a conditional write.

Object stores have no flock, and a holder that dies cannot release anything, so the lock is a *lease*: the
object ``<store>/LOCK`` holds the holder's details and an expiry. It is taken by a create-if-absent write (S3
``If-None-Match: *``, GCS ``ifGenerationMatch=0``), renewed by a heartbeat thread every ``ttl / 4`` with a
replace-if-unchanged write, and deleted on release. A lease whose expiry has passed belongs to a dead holder: a
contender takes it over with one replace-if-unchanged write, so two contenders never both win.

What it guarantees, and what it does not: the lease keeps a second ``qarm retrain`` (or an admin command) from
starting while one runs, which saves hours of duplicate work; it is advisory. Correctness never rests on it: every
change of CURRENT is a compare-and-swap (feature_store.remote), so a holder that lost its lease (paused longer than
the TTL, clocks further apart than the TTL) can at worst be refused at publish (StoreConflictError), never
overwrite a version it did not see. Expiry compares the holder's wall clock with the contender's: keep hosts on
NTP (skew well under ``LEASE_TTL_S``). A SIGKILLed holder blocks others for at most ``LEASE_TTL_S``.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from feature_store.lock import StoreLockedError, describe_holder, holder_info
from feature_store.objects import ObjectClient, PreconditionFailed

log = logging.getLogger(__name__)

LEASE_TTL_S = 60.0

_HELD: dict[str, dict] = {}  # lease URL -> {"pid", "thread", "depth", "info"} held by this process
_GUARD = threading.Lock()


@contextmanager
def lease_lock(client: ObjectClient, key: str, *, timeout: float = 0.0, purpose: str = "",
               ttl_s: float = LEASE_TTL_S, poll_interval: float = 0.2) -> Iterator[dict]:
    """Hold the store's lease for the body of the ``with`` (re-entrant in the holding thread).

    Args:
        client, key: where the lease object lives.
        timeout: seconds to wait for a lease held by a live holder; 0 refuses at once.
        purpose: free text shown to contenders.
        ttl_s: lifetime of the lease without renewal (renewed every ttl_s / 4 while held).
    Yields:
        the holder details written into the lease.
    Raises:
        StoreLockedError: another holder's unexpired lease after ``timeout``.
    """
    url = client.url(key)
    me = (os.getpid(), threading.get_ident())
    with _GUARD:
        held = _HELD.get(url)
        if held is not None and held["pid"] != me[0]:
            _HELD.pop(url)  # inherited over fork: not ours
            held = None
        if held is not None and held["thread"] == me[1]:
            held["depth"] += 1
    if held is not None and held["thread"] != me[1]:
        raise StoreLockedError(f"feature store lease {url} is held by another thread of this process: "
                               f"{describe_holder(held['info'])}", held["info"])
    if held is not None:
        try:
            yield held["info"]
        finally:
            with _GUARD:
                held["depth"] -= 1
        return
    info, token = _acquire(client, key, timeout, purpose, ttl_s, poll_interval)
    state = {"pid": me[0], "thread": me[1], "depth": 1, "info": info, "token": token, "lost": False}
    with _GUARD:
        _HELD[url] = state
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(client, key, state, ttl_s, stop), daemon=True,
                            name="qarm-store-lease")
    beat.start()
    try:
        yield info
    finally:
        stop.set()
        beat.join()
        with _GUARD:
            _HELD.pop(url, None)
        _release(client, key, state)


def _acquire(client, key, timeout, purpose, ttl_s, poll_interval) -> tuple[dict, str]:
    deadline = time.monotonic() + max(timeout, 0.0)
    while True:
        info = {**holder_info(purpose), "lease": uuid.uuid4().hex, "ttl_s": ttl_s,
                "expires_unix": time.time() + ttl_s}
        body = json.dumps(info).encode("utf-8")
        try:
            return info, client.put(key, body, if_absent=True)
        except PreconditionFailed:
            pass
        got = client.get(key)
        if got is None:
            continue  # released between our two requests
        holder = _parse(got[0])
        if holder.get("expires_unix", 0) < time.time():  # its holder died (or stalled past the TTL)
            try:
                token = client.put(key, body, if_token=got[1])
            except PreconditionFailed:
                continue  # another contender took it over first, or its holder renewed it
            log.warning("took over the expired store lease %s of %s", client.url(key), describe_holder(holder))
            return info, token
        if time.monotonic() >= deadline:
            waited = f" after waiting {timeout:g}s" if timeout > 0 else ""
            left = max(0.0, holder.get("expires_unix", 0) - time.time())
            raise StoreLockedError(
                f"feature store is locked{waited}: the lease {client.url(key)} is held by {describe_holder(holder)} "
                f"(expires in {left:.0f}s unless renewed); another writer is retraining or running an admin "
                "command. Retry when it finishes (a dead holder's lease expires by itself).", holder)
        time.sleep(poll_interval)


def _heartbeat(client, key, state: dict, ttl_s: float, stop: threading.Event) -> None:
    """Renew the lease every ttl/4 while held; a failed renewal means another holder took it over."""
    while not stop.wait(ttl_s / 4):
        info = {**state["info"], "expires_unix": time.time() + ttl_s}
        try:
            state["token"] = client.put(key, json.dumps(info).encode("utf-8"), if_token=state["token"])
            state["info"] = info
        except PreconditionFailed:
            state["lost"] = True
            log.error("lost the store lease %s (held past its TTL without renewal?); publishing stays safe: "
                      "CURRENT changes only by compare-and-swap", client.url(key))
            return
        except Exception as exc:  # a transient network error: try again at the next beat
            log.warning("could not renew the store lease %s: %s", client.url(key), exc)


def _release(client, key, state: dict) -> None:
    if state["lost"]:
        return
    got = client.get(key)
    if got is not None and got[1] == state["token"]:  # still ours (a later holder's lease is left alone)
        client.delete(key)


def _parse(body: bytes) -> dict:
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
