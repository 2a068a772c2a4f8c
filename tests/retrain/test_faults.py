"""Issue 19's fault suite for the retraining job: a watermark from the future, SIGKILL at random points of a run,
and a `qarm pipeline` started while a retrain holds the store. Each failed on main at 9ec9377."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feature_store import FeatureStore
from pipelines.cli import EXIT_LOCKED, EXIT_OK, main

REPO = Path(__file__).resolve().parents[2]
STAGES = ("window", "candidate", "stability")  # StageRunner's checkpoints, in order (no continuity: no ranker gate)
# a small cascade for the concurrent pipeline (its own data; only the store is shared)
PIPELINE = ["--n-items", "48", "--n-users", "40", "--n-events", "1600", "--n-clusters", "4", "--image-size", "16",
            "--encoder", "tiny", "--align-epochs", "1", "--rq-levels", "2", "--vq-k", "4", "--skip-unaligned",
            "--torch-threads", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _qarm(*args) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def _store_is_consistent(store: FeatureStore, allowed: set) -> None:
    """What every fault must leave: CURRENT and every listed version complete and verified, nothing else listed,
    and each publish in the history naming as previous the parent its manifest records."""
    listed = {v.id for v in store.list()}
    assert listed <= allowed and store.current_id() in listed, (listed, allowed)
    for version_id in listed:
        store.read(version_id, verify=True)
    for entry in store.history():
        if entry["action"] == "publish":
            assert store.read(entry["version"]).parent == entry["previous"], entry


def test_a_watermark_from_the_future_is_refused_with_how_to_recover(tmp_path, capsys):
    """Case 2: a version published with a year-3000 watermark made every later retrain answer "up-to-date: no
    interactions in (32503680000, 32503680000]", so new data was never used again."""
    from feature_store import write_codes, write_embeddings

    store = FeatureStore(tmp_path / "store")
    with store.stage() as st:
        write_embeddings(st.path / "item_embeddings.parquet", [0, 1], [[1.0, 0.0], [0.0, 1.0]])
        write_codes(st.path / "item_codes.parquet", [0, 1], [[0], [1]], [[1], [0]])
        future = st.publish(extra={"watermark": 32503680000})
    code = main(["retrain", "--store", str(store.root), "--n-items", "20", "--n-users", "5", "--n-events", "100",
                 "--n-clusters", "2", "--data", str(tmp_path / "data"), "--now", "2024-06-01", "--json"])
    out = _last_json(capsys.readouterr().out)
    assert code == 1 and out["error_type"] == "FutureWatermarkError", out
    assert f"watermark of CURRENT version {future.id} is 32503680000 (3000-01-01T00:00:00Z)" in out["error"]
    assert "later than the clock 1717200000" in out["error"] and "--since 1717113600" in out["error"]
    assert store.current_id() == future.id


@pytest.mark.slow
def test_sigkill_at_random_points_of_retrain_leaves_current_valid_and_the_rerun_resumes(copy_world, tmp_path):
    """The store's SIGKILL test (tests/feature_store/test_sigkill.py) for the whole retraining job: kill it at a
    random moment after a random stage checkpoint (or its start), check the store, rerun, until a run ends."""
    world = copy_world(tmp_path)
    store = FeatureStore(world["store"])
    work = tmp_path / "work"
    args = _qarm("retrain", "--store", str(store.root), *world["data_flags"], *world["job_flags"],
                 "--work-dir", str(work), "--no-ranker-gate", "--json")
    rnd = random.Random(19)
    allowed = {world["first"]}
    kills, points = 0, []
    for trial in range(8):
        proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        pending = [s for s in STAGES if not list(work.glob(f"run-*/{s}/_DONE.json"))]
        after = rnd.choice(pending[:2]) if pending else None  # the next checkpoint or the one after it
        deadline = time.time() + 600
        while after and proc.poll() is None and not list(work.glob(f"run-*/{after}/_DONE.json")):
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(rnd.uniform(0.0, 2.0 if after else 12.0))  # no checkpoint left: somewhere in gate / publish
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        points.append(after or "publish")
        allowed |= {store.current_id()}  # a kill after the flip of CURRENT leaves the new version, complete
        _store_is_consistent(store, allowed)
    if proc.returncode == -signal.SIGKILL:  # every trial was killed (a slow machine): one last run to its end
        proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out, _ = proc.communicate(timeout=600)
    assert kills >= 1 and points[0] != "publish", points  # the first kill lands mid-run (Random(19))
    result = _last_json(out)
    assert proc.returncode == EXIT_OK and result["status"] in ("published", "up-to-date"), result
    published = [e for e in store.history() if e["action"] == "publish"][1:]
    assert len(published) == 1, store.history()  # the killed runs and the last one published once in all
    new = store.read()
    assert new.id == published[0]["version"] and new.parent == world["first"]
    assert new.extra["watermark"] == world["bounds"][-1] <= new.extra["clock"]["now"]
    _store_is_consistent(store, allowed | {new.id})
    assert main(["store", "verify", "--store", str(store.root)]) == 0
    print(f"retrain SIGKILL: {kills} kills after {points}; then {result['status']}")


@pytest.mark.slow
def test_a_pipeline_started_while_retrain_runs_does_not_publish_over_it(copy_world, tmp_path):
    """Case 1: a pipeline started while `qarm retrain` held the store published over the retrain's version (its
    manifest naming a parent the history did not have). Now it is refused (exit 4) naming the retrain's."""
    world = copy_world(tmp_path)
    store = FeatureStore(world["store"])
    retrain = subprocess.Popen(_qarm("retrain", "--store", str(store.root), *world["data_flags"],
                                     *world["job_flags"], "--no-ranker-gate", "--work-dir", str(tmp_path / "w"),
                                     "--json"), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    pipeline = None
    try:
        deadline = time.time() + 300
        while "qarm retrain" not in (store.root / "LOCK").read_text(errors="replace"):
            assert retrain.poll() is None and time.time() < deadline, retrain.stderr.read()
            time.sleep(0.1)
        pipeline = subprocess.Popen(_qarm("pipeline", "--store", str(store.root), *PIPELINE, "--data",
                                          str(tmp_path / "img"), "--json"),
                                    cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not [p for p in (store.root / ".staging").iterdir() if p.is_dir()]:  # it has read CURRENT
            assert pipeline.poll() is None and time.time() < deadline, pipeline.stderr.read()
            time.sleep(0.1)
        assert store.current_id() == world["first"], "the retrain published before the pipeline started"
        r_out, r_err = retrain.communicate(timeout=600)
        p_out, p_err = pipeline.communicate(timeout=600)
    finally:
        for proc in (retrain, pipeline):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert retrain.returncode == EXIT_OK, r_err[-2000:]
    won = _last_json(r_out)["version"]
    result = _last_json(p_out)
    assert pipeline.returncode == EXIT_LOCKED and result["exit"] == EXIT_LOCKED, p_err[-2000:]
    assert "Traceback" not in p_err
    if result.get("status") == "conflict":  # the retrain had published: refused naming the version that won
        assert result["current"] == won and result["expected"] == world["first"] and won in result["error"]
    else:  # the retrain still held the store when the pipeline came to publish
        assert result["holder"]["purpose"] == "qarm retrain" and "is held by" in result["error"]
    assert store.current_id() == won and [v.id for v in store.list()] == [world["first"], won]
    _store_is_consistent(store, {world["first"], won})
