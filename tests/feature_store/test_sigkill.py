"""THE SIGKILL TEST: kill a publishing writer at random moments; the store must never show a partial version."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from feature_store import FeatureStore, write_codes, write_embeddings

REPO = Path(__file__).resolve().parents[2]
TRIALS = 40


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_sigkill_at_random_moments_never_exposes_a_partial_version(tmp_path):
    publish_seed = 1234
    root = tmp_path / "store"
    store = FeatureStore(root)
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("chaos_writer.py")), str(root)],
                              env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def seed_publish() -> float:
        t0 = time.perf_counter()
        with store.stage() as st:  # CURRENT exists from the start, so every check below applies to every trial
            n = 40
            write_embeddings(st.path / "item_embeddings.parquet", np.arange(n), np.ones((n, 16)))
            write_codes(st.path / "item_codes.parquet", np.arange(n), np.zeros((n, 3), int), np.zeros((n, 4), int))
            st.publish(config={"n": n})
        return time.perf_counter() - t0

    seed_publish()  # the first one pays for lazy imports
    # Kill anywhere in the first few publishes of each writer; scaled to this disk's fsync speed, which varies
    # a lot on a shared machine, so that kills land both mid-publish and after completed ones.
    window = min(0.6, max(0.2, 3 * seed_publish()))
    rnd = random.Random(publish_seed)
    seen_versions: set[str] = set()
    trials_with_abandoned_staging = 0
    try:
        for trial in range(TRIALS):
            server.stdin.write(f"spawn {trial}\n")
            server.stdin.flush()
            line = server.stdout.readline()
            assert line, f"chaos writer died: {server.stderr.read()}"
            pid = int(line)
            time.sleep(rnd.uniform(0.0, window))
            assert _alive(pid), "writer exited on its own (an error in the loop?)"
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.002)

            listed = store.list()
            # every listed version is complete and checksum-valid: no partial version is ever visible
            for info in listed:
                version = store.read(info.id, verify=True)
                assert version.manifest["rows"]["item_embeddings.parquet"] == version.config["n"]
            current = store.current_id()
            assert current in {v.id for v in listed}, f"trial {trial}: CURRENT {current} is not a listed version"
            version = store.read()  # verifies every sha256
            item_ids, emb = version.embeddings()
            codes = version.codes()
            assert len(item_ids) == len(codes) == version.config["n"]
            assert emb.shape == (version.config["n"], 16) and codes.rq.shape[1] == 3
            seen_versions.update(v.id for v in listed)
            staging = root / ".staging"
            if staging.is_dir() and any(p.is_dir() for p in staging.iterdir()):
                trials_with_abandoned_staging += 1
    finally:
        server.stdin.close()
        server.kill()
        server.wait()

    published = sum(1 for entry in store.history() if entry["action"] == "publish") - 2
    print(f"sigkill: {TRIALS} kills (window {window:.2f}s), {published} publishes by the killed writers, "
          f"{len(seen_versions)} versions seen, {trials_with_abandoned_staging} kills left a half-written staging")
    # the kills really landed mid-write some of the time, and the writers still made progress between kills
    assert trials_with_abandoned_staging > 0
    assert published >= 3
    # a new writer sweeps earlier dead writers' folders, so what is left now is only the last kill's, if any
    left_behind = [p for p in (root / ".staging").iterdir() if p.is_dir()]
    swept = store.cleanup()
    assert not any((root / ".staging").iterdir())
    assert swept["staging"] == len(left_behind)
    with store.lock():  # no stale lock survives the killed holders
        pass
