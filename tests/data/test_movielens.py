"""MovieLens from ../shared (skipped with a reason when absent)."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.data import DataSpec, load_dataset
from pipelines.data.images import load_image


def test_full_movielens_matches_the_release(movielens_dir):
    ds = load_dataset(DataSpec(dataset="movielens", data=movielens_dir, validate_images="exists"))
    stats = ds.stats()
    assert stats["users"] == 610
    assert stats["interactions"] == 100_836
    assert stats["items"] == 9_742 and stats["items_with_interactions"] == 9_724
    assert stats["items_with_image"] == 2_947
    assert stats["rejected"] == {}
    inter = ds.interactions
    assert list(inter.columns[:4]) == ["user_id", "item_id", "ts", "label"]
    assert str(inter["label"].dtype) == "float32" and str(inter["ts"].dtype) == "int64"
    assert np.all(np.diff(inter["ts"].to_numpy()) >= 0)
    # label is rating >= 4, checked against the raw column
    assert np.array_equal(inter["label"].to_numpy() == 1.0, inter["rating"].to_numpy() >= 4.0)
    toy = ds.items.set_index("item_id").loc[1]
    assert toy["title"] == "Toy Story (1995)"
    assert "Animation" in toy["text"] and "pixar" in toy["text"]  # genres and user tags
    assert toy["image_uri"] == "1.jpg" and toy["year"] == 1995
    img = load_image(toy["image_uri"], ds.image_root)
    assert img.mode == "RGB" and min(img.size) > 50


@pytest.fixture(scope="module")
def posters(movielens_dir):
    """The poster subset, with every poster header-checked (the default validation level)."""
    return load_dataset(DataSpec(dataset="movielens", data=movielens_dir, require_image=True))


def test_poster_subset(posters):
    ds = posters
    stats = ds.stats()
    assert stats["items_with_interactions"] == 2_943
    assert stats["interactions"] == 58_498
    assert ds.items["image_uri"].notna().all()
    assert stats["filtered"]["interactions_on_items_without_image"] == 100_836 - 58_498


def test_splits_reproduce_the_reference_baselines(posters):
    """../shared/data/movielens/SOURCE.md: poster subset, label rating >= 4, smoothed user + item mean rates."""
    import pandas as pd

    from feature_store.split import time_split

    inter = posters.interactions

    def baseline_auc(train, test, smooth=5.0):
        prior = train["label"].mean()
        def rate(key):
            g = train.groupby(key)["label"].agg(["sum", "count"])
            return test[key].map((g["sum"] + smooth * prior) / (g["count"] + smooth)).fillna(prior)
        score = (rate("user_id") + rate("item_id")).to_numpy()
        ranks = pd.Series(score).rank().to_numpy()
        pos = test["label"].to_numpy() == 1
        return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())

    train, _, test = time_split(inter, "global", valid_frac=0.0, test_frac=0.1)
    assert len(test) == 5_850
    assert abs(baseline_auc(train, test) - 0.7255) < 5e-4
    assert test["user_id"].isin(train["user_id"]).mean() < 0.1   # "only 9% of test users appear in training"
    train, _, test = time_split(inter, "user_last_frac", valid_frac=0.0, test_frac=0.1)
    assert len(test) == 5_860
    assert abs(test["item_id"].isin(train["item_id"]).mean() - 0.98) < 0.005
