"""One writer process of the one-writer test: starts from CURRENT as a job does, waits at a barrier, publishes.

    python cas_writer.py STORE BARRIER_DIR INDEX

Prints one JSON line: {"published": id} or {"conflict": message, "current": the version that won}.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from feature_store import FeatureStore, StoreConflictError, write_codes, write_embeddings


def main() -> None:
    root, barrier, index = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    store = FeatureStore(root)
    started_from = store.current_id()  # what a job records when it starts (pipelines.jobs.cascade.driver.run_job)
    with store.stage(parent=started_from, require_parent_current=True) as st:
        n = 10 + index
        write_embeddings(st.path / "item_embeddings.parquet", np.arange(n), np.full((n, 4), index, np.float32))
        write_codes(st.path / "item_codes.parquet", np.arange(n), np.zeros((n, 2), int), np.zeros((n, 3), int))
        (barrier / f"ready-{index}").touch()
        while not (barrier / "go").exists():  # every writer has started before any publishes
            time.sleep(0.005)
        try:
            version = st.publish(config={"writer": index})
        except StoreConflictError as exc:
            print(json.dumps({"conflict": str(exc), "current": exc.current, "expected": exc.expected}), flush=True)
            return
    print(json.dumps({"published": version.id, "parent": version.parent}), flush=True)


if __name__ == "__main__":
    main()
