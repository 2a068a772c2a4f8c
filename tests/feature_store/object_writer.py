"""A publisher for the object-store crash tests, killed by the test at a chosen point of its publish.

    python object_writer.py STORE_URL CACHE_DIR MODE MARKER

MODE ``mid-upload``: the version has 30 files; after the 3rd upload the writer touches MARKER and slows every
further upload, so the test's SIGKILL lands while files are still going up (no manifest yet).
MODE ``before-swap``: every file and the manifest are up; the writer touches MARKER where it would
compare-and-swap CURRENT and waits there to be killed.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from feature_store import FeatureStore, write_codes, write_embeddings


def main() -> None:
    url, cache, mode, marker = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    store = FeatureStore(url, cache_dir=cache)
    started_from = store.current_id()
    if mode == "mid-upload":
        upload, done = store.client.upload, []

        def slow_upload(key, path):
            token = upload(key, path)
            done.append(key)
            if len(done) == 3:
                marker.touch()
            if len(done) >= 3:
                time.sleep(0.5)
            return token

        store.client.upload = slow_upload
    else:
        def hang(*args, **kwargs):
            marker.touch()
            time.sleep(600)

        store._swap_current = hang
    with store.stage(parent=started_from, require_parent_current=True) as st:
        n = 30
        write_embeddings(st.path / "item_embeddings.parquet", np.arange(n), np.full((n, 4), 7, np.float32))
        write_codes(st.path / "item_codes.parquet", np.arange(n), np.zeros((n, 2), int), np.zeros((n, 3), int))
        (st.path / "extra").mkdir()
        for i in range(28):
            (st.path / "extra" / f"part-{i:02d}.json").write_text(f'{{"part": {i}}}\n')
        st.publish(config={"writer": mode})
    print("published (the test should have killed this writer)", flush=True)


if __name__ == "__main__":
    main()
