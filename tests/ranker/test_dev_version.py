import numpy as np
import pandas as pd

from ranker.dev_version import DevVersionConfig, align_linear, quantize


def test_linear_alignment_pulls_behaviour_pairs_together():
    rng = np.random.default_rng(0)
    n, d = 200, 16
    group = rng.integers(0, 10, n)  # behaviour groups, only weakly visible in the content vectors
    x = (0.4 * rng.standard_normal((10, d))[group] + rng.standard_normal((n, d))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64) + 100
    left, right = [], []
    for _ in range(3000):
        g = rng.integers(0, 10)
        members = np.flatnonzero(group == g)
        a, b = rng.choice(members, 2, replace=False)
        left.append(ids[a])
        right.append(ids[b])
    pairs = pd.DataFrame({"left": left, "right": right})
    aligned, stats = align_linear(x, ids, pairs, DevVersionConfig(align_dim=8, align_epochs=10, align_batch=128))
    assert aligned.shape == (n, 8) and stats["pairs"] == 3000
    same = group[:, None] == group[None, :]
    off = ~np.eye(n, dtype=bool)
    sim_before = x @ x.T
    sim_after = aligned @ aligned.T
    gap_before = sim_before[same & off].mean() - sim_before[~same].mean()
    gap_after = sim_after[same & off].mean() - sim_after[~same].mean()
    assert gap_after > gap_before + 0.15


def test_quantize_gives_codes_in_range_and_neighbour_item_ids():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((120, 8)).astype(np.float32)
    ids = np.arange(120, dtype=np.int64) * 7
    out = quantize(x, ids, DevVersionConfig(levels=2, codebook_size=8, vq_k=5))
    assert out["rq"].shape == (120, 2) and out["rq"].max() < 8 and out["rq"].min() >= 0
    assert out["vq"].shape == (120, 5) and np.isin(out["vq"], ids).all()
    assert (out["vq"] != ids[:, None]).all()  # self excluded
