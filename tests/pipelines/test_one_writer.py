"""Issue 19 cases 1 and 2 end to end: two `qarm pipeline` processes started 5 s apart on one store, over a log
whose clock is skewed (a third of its events lie after the job's --now). On main at 9ec9377 both published
(v000002 naming parent v000001, the history saying otherwise) and the watermark passed the clock."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feature_store import FeatureStore
from feature_store.clock import DEFAULT_MAX_FUTURE_S
from pipelines.cli import EXIT_LOCKED, EXIT_OK, main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = ["--n-items", "48", "--n-users", "40", "--n-events", "1600", "--n-clusters", "4", "--image-size", "16",
        "--encoder", "tiny", "--align-epochs", "1", "--align-batch-size", "32", "--rq-levels", "2", "--vq-k", "4",
        "--torch-threads", "1", "--embed-batch-size", "32", "--seed", "0", "--skip-unaligned"]
NOW = 1_606_000_000  # 69 days into the synthetic log's 90 (it starts at 1_600_000_000)


def test_two_pipelines_on_one_store_one_publishes_the_other_is_refused(tmp_path):
    from pipelines.data import DataSpec, load_dataset

    store = FeatureStore(tmp_path / "store")
    args = [sys.executable, "-m", "pipelines.cli", "pipeline", *TINY, "--data", str(tmp_path / "img"),
            "--store", str(store.root), "--now", str(NOW), "--max-bad-fraction", "0.5", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        time.sleep(5)
    outs = [p.communicate(timeout=900) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [EXIT_OK, EXIT_LOCKED], [err[-3000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    won = next(r for r in results if r["ok"])
    refused = next(r for r in results if not r["ok"])
    assert refused["status"] == "conflict" and refused["current"] == won["version"] and refused["expected"] is None
    assert f"another writer changed CURRENT to {won['version']}" in refused["error"]
    assert "Traceback" not in "".join(err for _, err in outs)

    # one version, the history and the manifest agree, verify is clean
    assert [v.id for v in store.list()] == [won["version"]] == [store.current_id()]
    assert [(h["version"], h["previous"]) for h in store.history()] == [(won["version"], None)]
    version = store.read()
    assert version.parent is None
    assert main(["store", "verify", "--store", str(store.root), "--now", str(NOW)]) == 0

    # the clock: events after it (+ 1 day) are counted rejects, and the watermark stops at it
    log = load_dataset(DataSpec(n_items=48, n_users=40, n_events=1600, n_clusters=4, image_size=16,
                                data=tmp_path / "img", now=2 * NOW)).interactions
    late = int((log["ts"] > NOW + DEFAULT_MAX_FUTURE_S).sum())
    assert 0 < late < len(log) // 2 and log["ts"].max() > NOW
    assert won["dead_letter"] == {"bad_timestamp": late}
    assert version.extra["watermark"] == won["watermark"] == NOW
    assert version.extra["clock"] == {"now": NOW, "now_utc": "2020-11-21T23:06:40Z",
                                      "max_future": DEFAULT_MAX_FUTURE_S}
