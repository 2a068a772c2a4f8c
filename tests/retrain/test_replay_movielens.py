"""Replay the MovieLens timeline as consecutive days and retrain after each (tiny encoder, poster subset)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from feature_store import FeatureStore

pytestmark = pytest.mark.slow


def test_day_boundaries_split_the_tail_by_count():
    from pipelines.jobs.retrain.replay import day_boundaries

    ts = np.arange(1000)
    bounds = day_boundaries(ts, days=4, tail=0.2)
    assert bounds[0] == 799 and bounds[-1] == 999
    counts = np.diff([np.searchsorted(ts, b, side="right") for b in bounds])
    assert counts.tolist() == [50, 50, 50, 50]
    with pytest.raises(ValueError, match="collapse"):
        day_boundaries(np.zeros(10), days=2, tail=0.5)


def test_movielens_daily_replay_command(movielens_dir, tmp_path, capsys):
    """`python -m pipelines.jobs.retrain.replay` on the 600 most-rated poster movies: JSON days, table, PNG."""
    from pipelines.jobs.retrain.replay import main

    out = tmp_path / "out"
    code = main(["--dataset", "movielens", "--data", str(movielens_dir), "--require-image", "--top-items", "600",
                 "--store", str(tmp_path / "store"), "--days", "2", "--tail", "0.04", "--skip-unaligned",
                 "--align-epochs", "1", "--out", str(out), "--json",
                 "--encoder", "tiny", "--encoder-image-size", "32", "--rq-codebook-size", "32", "--vq-k", "10"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    days = report["days"]
    assert code == 0, [d["reasons"] for d in days]
    assert [d["day"] for d in days] == [1, 2] and all(d["gate"] == "published" for d in days)
    assert days[0]["parent"] == report["bootstrap"]["version"] and days[1]["parent"] == days[0]["version"]
    for d in days:
        for key in ("churn_unchanged", "churn_touched", "churn_new", "auc_before", "auc_remapped", "auc_stale",
                    "auc_fresh", "auc_scratch", "gate"):
            assert key in d
        # the default keeps the encoder frozen between scheduled refreshes: nothing moves, every code stays,
        # the codebooks are the parent's, so remapping is the identity
        assert d["encoder_refreshed"] is False and d["codes_refit"] is False
        assert d["churn_unchanged"] == 0.0 and d["churn_touched"] == 0.0
        assert d["auc_remapped"] == d["auc_stale"]
        # warm-started codebooks keep the coarse code far more stable than a cold refit
        assert d["level_churn_warm"][0] < d["level_churn_cold"][0]
    assert json.loads((out / "replay.json").read_text())["days"][1]["version"] == days[1]["version"]
    assert (out / "replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| day |" in (out / "replay.md").read_text()
    store = FeatureStore(tmp_path / "store")
    assert store.current_id() == days[-1]["version"]
    assert store.read().extra["watermark"] == days[-1]["until"]
