"""The synthetic source: deterministic, cold-start over time, and the cluster really drives clicks and content."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.data import DataSpec, load_dataset
from pipelines.data.images import load_image
from feature_store.split import time_split
from pipelines.data.synthetic_images import render_item_image

SMALL = dict(n_items=400, n_users=150, n_events=12000, n_clusters=8, image_size=24)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return load_dataset(DataSpec(dataset="synthetic", data=tmp_path_factory.mktemp("synth"), seed=3, **SMALL))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Rank-based AUC (ties averaged)."""
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auc_helper_by_hand():
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75


def test_contract_and_sizes(synth):
    assert len(synth.items) == 400 and synth.items["item_id"].is_unique
    assert len(synth.interactions) == 12000 and synth.interactions["ts"].is_monotonic_increasing
    assert set(synth.interactions["label"].unique()) == {0.0, 1.0}
    assert synth.reject_counts == {} and synth.items["image_uri"].notna().all()
    assert synth.items["cluster"].nunique() == 8
    img = load_image(synth.items["image_uri"].iloc[0], synth.image_root)
    assert img.size == (24, 24) and img.mode == "RGB"


def test_deterministic_from_seed_and_cached(synth, tmp_path):
    again = load_dataset(DataSpec(dataset="synthetic", data=synth.image_root.parent, seed=3, **SMALL))
    pd.testing.assert_frame_equal(again.items, synth.items)
    pd.testing.assert_frame_equal(again.interactions, synth.interactions)
    assert again.image_root == synth.image_root  # images reused, not regenerated elsewhere
    tiny = dict(n_items=30, n_users=10, n_events=300, n_clusters=3, image_size=8)
    a = load_dataset(DataSpec(dataset="synthetic", data=tmp_path, seed=3, **tiny))
    b = load_dataset(DataSpec(dataset="synthetic", data=tmp_path, seed=4, **tiny))
    assert a.image_root != b.image_root  # the cache is keyed by the config
    assert not a.interactions["item_id"].equals(b.interactions["item_id"])
    assert not a.items["title"].equals(b.items["title"])


def test_images_are_a_pure_function_of_seed_and_item(synth):
    from pipelines.data.synthetic import _make_items
    items, styles = _make_items(DataSpec(dataset="synthetic", seed=3, **SMALL), np.random.default_rng(3))
    row = items.iloc[7]
    img = render_item_image(styles[int(row["cluster"])], np.random.default_rng([3, int(row["item_id"])]), 24)
    assert np.array_equal(np.asarray(img), np.asarray(load_image(row["image_uri"], synth.image_root)))


def test_new_items_keep_arriving(synth):
    train, _, test = time_split(synth.interactions, "global", valid_frac=0.0, test_frac=0.2)
    unseen = ~test["item_id"].isin(train["item_id"])
    assert unseen.mean() > 0.1  # a real cold-start share in the last period
    first_seen = synth.interactions.groupby("item_id")["ts"].min()
    assert first_seen.quantile(0.9) > first_seen.quantile(0.1) + 30 * 86400


def test_cluster_predictor_beats_item_popularity_on_held_out_clicks(synth):
    """The structure downstream models must find: user x cluster CTR beats per-item CTR on future clicks."""
    inter = synth.interactions.merge(synth.items[["item_id", "cluster"]], on="item_id")
    train, _, test = time_split(inter, "global", valid_frac=0.0, test_frac=0.2)
    prior = train["label"].mean()
    smooth = 5.0

    def smoothed(keys):
        g = train.groupby(keys)["label"].agg(["sum", "count"])
        return (g["sum"] + smooth * prior) / (g["count"] + smooth)

    item_ctr = smoothed("item_id")
    uc_ctr = smoothed(["user_id", "cluster"])
    item_score = test["item_id"].map(item_ctr).fillna(prior).to_numpy()
    uc_score = pd.Series(list(zip(test["user_id"], test["cluster"]))).map(uc_ctr).fillna(prior).to_numpy()
    y = test["label"].to_numpy()
    auc_item, auc_cluster = auc(y, item_score), auc(y, uc_score)
    print(f"held-out AUC: user x cluster {auc_cluster:.3f}, item popularity {auc_item:.3f}")
    assert auc_cluster > auc_item + 0.1, (auc_cluster, auc_item)
    assert auc_cluster > 0.75


def test_cluster_is_visible_in_text_and_image(synth):
    items = synth.items
    rng = np.random.default_rng(0)
    fit = rng.random(len(items)) < 0.5
    # Text: vote by the words seen with each cluster in the fitting half.
    words = items["title"].str.lower() + " " + items["text"].fillna("").str.lower().str.rstrip(".")
    votes: dict = {}
    for w, c in zip(words[fit], items["cluster"][fit]):
        for tok in w.split():
            votes.setdefault(tok, np.zeros(8))[c] += 1
    def guess(text):
        total = sum((votes.get(t, np.zeros(8)) / max(1, votes.get(t, np.ones(1)).sum()) for t in text.split()),
                    np.zeros(8))
        return int(np.argmax(total))
    text_acc = np.mean([guess(w) == c for w, c in zip(words[~fit], items["cluster"][~fit])])
    # Image: nearest centroid on a 6x6 colour thumbnail.
    feats = np.stack([np.asarray(load_image(u, synth.image_root).resize((6, 6))).ravel() / 255.0
                      for u in items["image_uri"]])
    cl = items["cluster"].to_numpy()
    centroids = np.stack([feats[fit & (cl == c)].mean(0) for c in range(8)])
    pred = np.argmin(((feats[~fit][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    img_acc = (pred == cl[~fit]).mean()
    print(f"cluster recovery: text {text_acc:.3f}, image {img_acc:.3f} (chance 0.125)")
    assert text_acc > 0.7 and img_acc > 0.5, (text_acc, img_acc)  # chance is 1/8


def test_sizes_are_options_and_validated():
    with pytest.raises(ValueError, match="n_clusters"):
        DataSpec(dataset="synthetic", n_items=4, n_clusters=8)
    with pytest.raises(ValueError, match="n_events"):
        DataSpec(dataset="synthetic", n_events=0)


def _kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 25, restarts: int = 4) -> np.ndarray:
    """Plain Lloyd k-means (k-means++ init, best of a few restarts): cluster ids (N,)."""
    best, best_cost = None, np.inf
    for r in range(restarts):
        rng = np.random.default_rng(seed + r)
        centres = [x[rng.integers(len(x))]]
        for _ in range(k - 1):
            d = np.min(((x[:, None] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
            centres.append(x[rng.choice(len(x), p=d / d.sum())])
        c = np.array(centres)
        for _ in range(iters):
            assign = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            c = np.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
        cost = ((x - c[assign]) ** 2).sum()
        if cost < best_cost:
            best, best_cost = assign, cost
    return best


def test_content_codes_beat_item_ids_without_the_latent_label(synth):
    """Codes learned from content alone (k-means over image thumbnails + title/text words), never the `cluster`
    column, carry the click signal better than item ids: the effect QARM's codes are meant to capture."""
    items = synth.items
    thumbs = np.stack([np.asarray(load_image(u, synth.image_root).resize((6, 6))).ravel() / 255.0
                       for u in items["image_uri"]])
    words = (items["title"].str.lower() + " " + items["text"].fillna("").str.lower().str.rstrip(".")).str.split()
    vocab = {w: j for j, w in enumerate(sorted({w for ws in words for w in ws}))}
    bow = np.zeros((len(items), len(vocab)))
    for i, ws in enumerate(words):
        bow[i, [vocab[w] for w in ws]] = 1.0
    feats = np.hstack([thumbs / np.linalg.norm(thumbs, axis=1, keepdims=True),
                       bow / np.linalg.norm(bow, axis=1, keepdims=True)])
    code = pd.Series(_kmeans(feats, 8), index=items["item_id"])
    inter = synth.interactions.assign(code=lambda d: d["item_id"].map(code))
    train, _, test = time_split(inter, "global", valid_frac=0.0, test_frac=0.2)
    prior = train["label"].mean()

    def smoothed(keys):
        g = train.groupby(keys)["label"].agg(["sum", "count"])
        return (g["sum"] + 5.0 * prior) / (g["count"] + 5.0)

    y = test["label"].to_numpy()
    auc_item = auc(y, test["item_id"].map(smoothed("item_id")).fillna(prior).to_numpy())
    uc = pd.Series(list(zip(test["user_id"], test["code"]))).map(smoothed(["user_id", "code"]))
    auc_code = auc(y, uc.fillna(prior).to_numpy())
    print(f"held-out AUC: user x content code {auc_code:.3f}, item popularity {auc_item:.3f}")
    assert auc_code > auc_item + 0.1, (auc_code, auc_item)


def test_lookalike_clusters_look_alike_but_are_liked_independently(synth):
    """SMALL has 8 clusters at lookalike_share 0.5: pairs (0, 1) and (2, 3) share shape, colour and most words."""
    items = synth.items
    thumbs = np.stack([np.asarray(load_image(u, synth.image_root).resize((6, 6))).ravel() / 255.0
                       for u in items["image_uri"]])
    centroid = np.stack([thumbs[items["cluster"].to_numpy() == c].mean(0) for c in range(8)])
    dist = np.linalg.norm(centroid[:, None] - centroid[None], axis=-1)
    for a, b in ((0, 1), (2, 3)):
        others = [c for c in range(8) if c not in (a, b)]
        assert dist[a, b] < dist[a, others].min(), (a, dist[a])
    # Behaviour: a user's click rate on one twin says little about the other (independent likes).
    inter = synth.interactions.merge(items[["item_id", "cluster"]], on="item_id")
    rate = inter.groupby(["user_id", "cluster"])["label"].mean().unstack()
    twin_corr = rate[0].corr(rate[1])
    print(f"per-user click-rate correlation between look-alike clusters 0 and 1: {twin_corr:.3f}")
    assert twin_corr < 0.35


def test_sparse_preset_is_shaped_like_a_small_purchase_log(tmp_path):
    from feature_store.split import SplitConfig, split_labels

    ds = load_dataset(DataSpec(dataset="synthetic", preset="sparse", n_items=4000, n_users=1000, n_events=4500,
                               data=tmp_path))
    x = ds.interactions
    assert set(x["label"].unique()) == {1.0}                               # implicit positives only
    per_user = x.groupby("user_id").size()
    assert 2 <= per_user.median() <= 5                                      # ~4 events per user
    per_item = x.groupby("item_id").size()
    assert (per_item <= 2).mean() > 0.6                                     # a long tail bought once or twice
    assert 0.05 < x.duplicated(["user_id", "item_id"]).mean() < 0.2         # repeat purchases
    part = split_labels(x, SplitConfig())
    unseen = ~x.loc[part == 2, "item_id"].isin(set(x.loc[part == 0, "item_id"]))
    assert unseen.mean() > 0.4                                              # new items dominate later windows
    default = load_dataset(DataSpec(dataset="synthetic", n_items=400, n_users=100, n_events=4000, data=tmp_path))
    assert default.interactions["label"].nunique() == 2


def test_preset_is_a_data_flag_with_its_own_sizes():
    import argparse

    from pipelines.beam.data_flags import add_data_arguments, data_spec_from_args

    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    spec = data_spec_from_args(parser.parse_args(["--preset", "sparse"]))
    assert (spec.preset, spec.n_items, spec.n_users, spec.n_events) == ("sparse", 4000, 1000, 4500)
    spec = data_spec_from_args(parser.parse_args(["--preset", "sparse", "--n-items", "300"]))
    assert spec.n_items == 300
    assert data_spec_from_args(parser.parse_args([])).n_events == 60000
    with pytest.raises(ValueError, match="synthetic data only"):
        DataSpec(dataset="movielens", data="x", preset="sparse")
