"""Negatives of implicit logs that no model can exploit: each window's negatives come from its own items."""
import numpy as np
import pandas as pd
import pytest

from feature_store.split import SplitConfig
from ranker.config import NegativeConfig, RankerConfig
from ranker.data import prepare_examples
from ranker.examples import sample_negatives
from ranker.features import ItemFeatures
from ranker.train import fit


def _new_items_dominate_the_test_window(seed=0):
    """Implicit log: users click items at random; in later periods most clicked items are new."""
    rng = np.random.default_rng(seed)
    rows = []
    n_days = 30
    for day in range(n_days):
        fresh = np.arange(day * 40, day * 40 + 40)       # 40 new items a day
        old = np.arange(0, max(1, day * 40))
        for _ in range(120):
            item = rng.choice(fresh) if rng.random() < 0.8 else rng.choice(old)
            rows.append((int(rng.integers(0, 200)), int(item), 1_600_000_000 + day * 86400 + int(rng.integers(0, 86400)), 1.0))
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "label"]).sort_values("ts").reset_index(drop=True)
    return log, np.arange(n_days * 40)


def test_window_sampler_draws_only_from_the_counts_it_is_given():
    from ranker.examples import Examples

    log, catalog = _new_items_dominate_the_test_window()
    data = prepare_examples(log.iloc[:200], catalog, 2, SplitConfig("global", 0.1, 0.1),
                            NegativeConfig(per_positive=0), implicit=False)
    counts = np.zeros(len(catalog) + 1)
    counts[[3, 7]] = [1, 3]
    neg = sample_negatives(data.train, len(catalog) + 1, NegativeConfig(per_positive=5, sampler="window"), counts)
    assert set(np.unique(neg.item)) <= {3, 7} and (neg.label == 0).all()
    live = sample_negatives(data.train, len(catalog) + 1, NegativeConfig(per_positive=50, sampler="live"), counts)
    share7 = np.mean(live.item[live.item != data.train.item.repeat(50)] == 7)
    assert 0.35 < share7 < 0.65  # uniform over the live items, not weighted by their counts
    assert isinstance(neg, Examples)


@pytest.mark.parametrize("sampler", ["window", "live"])
def test_ids_only_scores_chance_when_negatives_share_the_windows_item_mix(sampler):
    log, catalog = _new_items_dominate_the_test_window()
    split = SplitConfig("global", 0.1, 0.2)
    cfg = RankerConfig(features="id", history_len=4, epochs=3, batch_size=256, patience=0, seed=0,
                       negatives=NegativeConfig(per_positive=4, sampler=sampler))
    data = prepare_examples(log, catalog, 4, split, cfg.negatives)
    assert data.info["test_items_seen_in_train"] < 0.5  # new items dominate the test window
    honest = fit(data, ItemFeatures.build(catalog), cfg, progress=False)["test"]["auc"]
    # the exploitable protocol: test negatives by *training* popularity are never new items, so "untrained id
    # => positive" wins far above chance
    leaky_cfg = RankerConfig.from_dict({**cfg.to_dict(), "negatives": NegativeConfig(per_positive=4,
                                                                                     sampler="popularity")})
    leaky = prepare_examples(log, catalog, 4, split, leaky_cfg.negatives)
    gamed = fit(leaky, ItemFeatures.build(catalog), leaky_cfg, progress=False)["test"]["auc"]
    assert abs(honest - 0.5) < 0.07
    assert gamed > honest + 0.1
