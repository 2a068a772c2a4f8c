"""The retraining job end to end on a tiny synthetic log: gate rejection, lock, SIGKILL + resume, publish."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from feature_store import FeatureStore
from pipelines.cli import EXIT_LOCKED, EXIT_OK, EXIT_REJECTED, main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def world(copy_world, tmp_path_factory):
    """A store whose first version was built from the log up to the 80% point (the replay's bootstrap)."""
    return copy_world(tmp_path_factory.mktemp("retrain"))


def _retrain_args(world, *extra):
    return ["retrain", "--store", str(world["store"]), *world["data_flags"], "--json", *extra, *world["job_flags"]]


def test_second_concurrent_run_is_refused_by_the_lock(world, capsys):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from feature_store import FeatureStore\n"
        "with FeatureStore(%r).lock(purpose='test holder'):\n"
        "    print('held', flush=True); time.sleep(60)\n") % (str(REPO), str(world["store"]))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(_retrain_args(world))
        out = _last_json(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == EXIT_LOCKED
    assert out["status"] == "locked" and "lock" in out["error"]


def test_killed_run_then_gate_rejection_then_publish_resume_their_stages(world, capsys):
    """One scheduled run's life: SIGKILL mid-candidate, a rerun the gate refuses, a rerun that publishes."""
    store = FeatureStore(world["store"])
    work = world["root"] / "work"
    cmd = [sys.executable, "-m", "pipelines.cli", *_retrain_args(world, "--work-dir", str(work))]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and not list(work.glob("run-*/window/_DONE.json")):
        assert proc.poll() is None, "retrain ended before it could be killed"
        time.sleep(0.2)
    time.sleep(1.0)  # now inside the candidate stage
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.current_id() == world["first"]
    assert [v.id for v in store.list()] == [world["first"]]  # nothing partial is listed

    # rerun with a gate nothing passes: the window stage resumes, the candidate is computed, CURRENT stays
    code = main(_retrain_args(world, "--work-dir", str(work), "--max-collision-rate", "0.0"))
    out = _last_json(capsys)
    assert code == EXIT_REJECTED, out
    assert out["status"] == "rejected" and any("collision_rate" in r for r in out["gate"]["reasons"])
    assert {s["stage"]: s["resumed"] for s in out["stages"]}["window"] is True
    assert store.current_id() == world["first"]
    # warm-started codes move less than a cold refit of the same embeddings (level 0: the coarse cluster)
    assert out["churn_warm"]["rq_level_churn"][0] < out["churn_cold"]["rq_level_churn"][0]

    # rerun with the default gate: every computed stage is reused, then the version is published
    code = main(_retrain_args(world, "--work-dir", str(work)))
    out = _last_json(capsys)
    assert code == EXIT_OK, out
    assert out["status"] == "published"
    assert all(s["resumed"] for s in out["stages"]), out["stages"]
    new = store.read()
    assert new.id == out["version"] != world["first"]
    assert new.parent == world["first"]
    assert new.extra["watermark"] == world["bounds"][-1]
    assert new.manifest["config"]["retrain"]["parent"] == world["first"]
    codes = new.codes()
    assert len(codes.item_ids) == 240 and np.all(codes.rq >= 0)

    # the next scheduled run finds nothing new and leaves CURRENT alone
    assert main(_retrain_args(world)) == EXIT_OK
    assert _last_json(capsys)["status"] == "up-to-date"
    assert store.current_id() == new.id


def test_a_candidate_that_ranks_worse_than_its_parent_on_the_tail_is_refused(world, capsys, monkeypatch):
    """The ranking gate (issue 15 point 4): a cold rebuild whose carry-over loses what the ranker learned (its code
    rows scrambled) scores below the parent on the held-out tail; exit 3, CURRENT unchanged, the tail never
    exported. (A warm remap of the same cold rebuild keeps the rows' meaning and passes: scrambling is what makes
    the candidate worse, not the rebuild itself.)"""
    import pandas as pd
    import torch

    import ranker.checkpoint
    from ranker.model import embedding_tables

    original = ranker.checkpoint.remap_rq_tables

    def scrambled(*args, **kwargs):
        model = original(*args, **kwargs)
        g = torch.Generator().manual_seed(0)
        for name, table in embedding_tables(model).items():
            if name.startswith("rq_l"):
                table.data.copy_(table.data[torch.randperm(table.shape[0], generator=g)])
        return model

    monkeypatch.setattr(ranker.checkpoint, "remap_rq_tables", scrambled)
    store = FeatureStore(world["store"])
    before = store.current_id()
    work = world["root"] / "work-cold"
    # --since: the same new events whichever version is CURRENT when this test runs
    code = main(_retrain_args(world, "--work-dir", str(work), "--since", str(world["bounds"][0]), "--cold",
                              "--max-auc-drop", "0.005"))
    out = _last_json(capsys)
    assert code == EXIT_REJECTED, out
    assert any("AUC" in r and "remapped ranker" in r for r in out["gate"]["reasons"]), out["gate"]
    assert out["candidate"]["auc"] < out["parent_on_tail"]["auc"] - 0.005
    assert store.current_id() == before
    # both sides were measured on the same held-out events, which no learning stage saw
    cont = out["continuity"]
    assert cont["before"]["n"] == cont["remapped"]["n"] == cont["scratch"]["n"] == cont["test_events"] > 0
    assert out["tail_recall"]["parent"]["n_queries"] == out["tail_recall"]["candidate"]["n_queries"]
    exported = pd.read_parquet(next(work.glob("run-*/window/interactions.parquet")))
    assert exported["ts"].max() <= out["tail_start"] < out["until"]
    assert out["tail_interactions"] > 0


def test_an_encoder_refresh_that_does_not_beat_its_parent_keeps_the_parent_encoder(world, capsys):
    """The never-worse gate on a refresh (issue 18): the fine-tune starts at the parent's encoder (step 0) and is
    judged against it on the cascade's validation window; a learning rate that only degrades leaves the parent's
    weights in the candidate, and the version records it."""
    import torch
    from safetensors.torch import load_file

    store = FeatureStore(world["store"])
    parent = store.read()
    work = world["root"] / "work-refresh"
    code = main(_retrain_args(world, "--work-dir", str(work), "--since", str(world["bounds"][0]),
                              "--refresh-encoder-every", "1", "--align-lr", "3", "--no-ranker-gate"))
    out = _last_json(capsys)
    assert code == EXIT_OK, out
    assert out["encoder_refreshed"] is True
    new = store.read()
    record = new.metrics["alignment"]
    assert record["kept"] is False and record["judge"] == "valid_next_item"
    assert record["base_map"]["kind"] == "checkpoint"  # the warm start's own map, not a new fit
    before = load_file(str(parent.path / "encoder" / "model.safetensors"))
    after = load_file(str(new.path / "encoder" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
