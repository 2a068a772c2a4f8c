"""Replay the MovieLens timeline as consecutive days and retrain after each (tiny encoder, poster subset)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from feature_store import FeatureStore

pytestmark = pytest.mark.slow


def test_day_boundaries_split_the_tail_by_count():
    from pipelines.retrain.replay import day_boundaries

    ts = np.arange(1000)
    bounds = day_boundaries(ts, days=4, tail=0.2)
    assert bounds[0] == 799 and bounds[-1] == 999
    counts = np.diff([np.searchsorted(ts, b, side="right") for b in bounds])
    assert counts.tolist() == [50, 50, 50, 50]
    with pytest.raises(ValueError, match="collapse"):
        day_boundaries(np.zeros(10), days=2, tail=0.5)


def test_movielens_daily_replay(movielens_dir, tmp_path):
    from pipelines.data import DataSpec, load_dataset
    from pipelines.retrain.replay import replay

    ds = load_dataset(DataSpec(dataset="movielens", data=movielens_dir, require_image=True))
    # The 600 most-rated poster movies and their ratings: the real timeline at a size CI can replay.
    top = ds.interactions["item_id"].value_counts().index[:600]
    ds = dataclasses.replace(ds, items=ds.items[ds.items["item_id"].isin(top)].reset_index(drop=True),
                             interactions=ds.interactions[ds.interactions["item_id"].isin(top)].reset_index(drop=True))
    flags = ["--encoder", "tiny", "--encoder-image-size", "32", "--rq-codebook-size", "32", "--vq-k", "10",
             "--align-epochs", "1", "--skip-unaligned"]
    report = replay(ds, tmp_path / "store", days=2, tail=0.04, flags=flags,
                    cfg_kwargs={"align_epochs": 1, "skip_unaligned": True})
    days = report["days"]
    assert [d["day"] for d in days] == [1, 2]
    assert all(d["published"] for d in days), [d["reasons"] for d in days]
    assert days[0]["parent"] == report["bootstrap"]["version"] and days[1]["parent"] == days[0]["version"]
    assert all(d["new_interactions"] > 0 for d in days)
    # warm-started codebooks keep the coarse code far more stable than a cold refit
    for d in days:
        assert d["level_churn_warm"][0] < d["level_churn_cold"][0]
    store = FeatureStore(tmp_path / "store")
    assert store.current_id() == days[-1]["version"]
    assert store.read().extra["watermark"] == days[-1]["until"] == int(ds.interactions["ts"].max())
