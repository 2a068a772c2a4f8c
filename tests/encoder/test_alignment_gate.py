"""Alignment starts at the unaligned embedding and never ships below it (issue 18).

Every mode is the unaligned embedding plus a residual whose output layer starts at zero (step 0 reproduces it
bit for bit); training judges step 0 and every epoch on the same validation queries and ships step 0 when no
epoch beats it; the PCA base map is fitted on the items it is given (the cascade gives it the train portion's).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.encoder import EncoderConfig
from pipelines.encoder.alignment import AlignConfig, embed_with_cache, train_side
from pipelines.encoder.base_map import BaseMap, GramStats, load_base_map, pooled_top, save_base_map
from pipelines.encoder.retrieval_eval import next_item_recall
from pipelines.encoder.items import ItemCatalog, ItemInput
from pipelines.encoder.model_io import base_map_of, build_for_mode, set_base_map
from pipelines.encoder.onepass import build_mllm_cache, embed_from_cache
from pipelines.encoder.side import SideConfig

TINY = EncoderConfig.named("tiny")
SIDE = SideConfig(width=32, dropout=0.0)


def _items(n: int = 12) -> list[ItemInput]:
    gen = torch.Generator().manual_seed(0)
    return [ItemInput(i, f"title {i}", "some text" if i % 2 else None,
                      torch.randn(3, 32, 32, generator=gen) if i % 3 else None) for i in range(n)]


@pytest.mark.parametrize("mode", ["side", "side-towers", "adapters", "full"])
@pytest.mark.parametrize("base_kind", ["gaussian", "pca"])
def test_step_zero_of_every_mode_is_the_unaligned_embedding_bit_for_bit(mode, base_kind):
    items = _items()
    unaligned = build_for_mode("unaligned", TINY, unaligned_seed=3).eval()
    if base_kind == "pca":  # a fitted (non-zero mean) map: the residual must start from whatever base it is given
        with torch.no_grad():
            states = unaligned.extractor(unaligned.collate(items))
        set_base_map(unaligned, BaseMap.from_stats(GramStats.of(pooled_top(states)), TINY.embed_dim))
    aligned = build_for_mode(mode, TINY, side=SIDE, base=base_map_of(unaligned)).eval()
    with torch.no_grad():  # inference kernels on both sides (autograd-enabled attention differs in the last bit)
        want = unaligned(unaligned.collate(items))
        got = aligned(aligned.collate(items))
    assert torch.equal(got, want), (got - want).abs().max()
    # and it is a real embedding, not a constant: items differ
    assert torch.cdist(want, want).max() > 0.1


def test_base_maps_differ_by_seed_and_round_trip(tmp_path):
    a, b = BaseMap.gaussian(32, 16, 0), BaseMap.gaussian(32, 16, 1)
    assert not torch.equal(a.projection, b.projection)
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    pca = BaseMap.from_stats(GramStats.of(x[:25]).merge(GramStats.of(x[25:])), 16)
    whole = BaseMap.from_stats(GramStats.of(x), 16)
    assert torch.allclose(pca.projection, whole.projection, atol=1e-5)  # streaming merge = one pass
    save_base_map(tmp_path / "b.safetensors", pca, {"kind": "pca", "items": 50})
    loaded, info = load_base_map(tmp_path / "b.safetensors")
    assert info == {"kind": "pca", "items": 50} and torch.equal(loaded(x), pca(x))
    # a state narrower than the embedding keeps every direction, the other coordinates stay zero
    wide = BaseMap.from_stats(GramStats.of(x), 40)
    assert torch.equal(wide.projection[:, 32:], torch.zeros(32, 8)) and torch.allclose(
        wide.projection[:, :16].abs(), pca.projection.abs(), atol=1e-5)
    # the PCA directions are orthonormal and ordered by variance
    p = pca.projection.double()
    assert torch.allclose(p.T @ p, torch.eye(16, dtype=torch.float64), atol=1e-5)
    var = (((torch.nn.functional.normalize(x, dim=-1) - pca.mean) @ pca.projection) ** 2).mean(0)
    assert (var[:-1] >= var[1:] - 1e-6).all()


@pytest.fixture(scope="module")
def side_world(tiny_data):
    """The tiny world's side cache and next-item style validation queries (left -> right of later pairs)."""
    ds, train, valid = tiny_data
    cache = build_mllm_cache(TINY, ItemCatalog.from_dataset(ds, TINY), SIDE, progress=False)
    queries = pd.DataFrame({"query": valid["left"].to_numpy(np.int64), "target": valid["right"].to_numpy(np.int64)})
    return ds, train, valid, cache, queries


def _cfg(**kw):
    base = dict(mode="side", epochs=3, batch_size=32, lr=3e-3, progress=False, side=SIDE, seed=0, patience=None)
    base.update(kw)
    return AlignConfig(**base)


def test_the_gate_keeps_step_zero_when_training_only_degrades(side_world):
    ds, _, _, cache, queries = side_world
    # pairs that contradict the behaviour the queries follow: every item paired with items of *other* latent
    # clusters, learned at a high rate
    rng = np.random.default_rng(0)
    cluster = ds.items.set_index("item_id")["cluster"]
    left = rng.choice(cache.item_ids, 3000)
    right = np.array([rng.choice(cluster.index[cluster != cluster[i]]) for i in left])
    result = train_side(cache, pd.DataFrame({"left": left, "right": right}), None, _cfg(lr=0.03),
                        valid_queries=queries)
    record = result.alignment
    assert record["kept"] is False and result.best_epoch is None
    assert record["judge"] == "valid_next_item" and record["epochs_judged"] == 3
    assert record["valid_next_item"]["best"] == record["valid_next_item"]["step0"]
    # the trained epochs were worse (that is what the gate protected against) ...
    assert max(h["recall@10"] for h in result.valid) < record["valid_next_item"]["step0"]["recall@10"]
    # ... and the weights that ship embed exactly like the unaligned encoder
    tables = embed_from_cache(result.encoder, cache, progress=False)
    assert np.array_equal(tables["aligned"][1], tables["unaligned"][1])


def test_the_gate_keeps_an_epoch_that_beats_step_zero(side_world):
    _, train, valid, cache, queries = side_world
    result = train_side(cache, train, valid, _cfg(), valid_queries=queries)
    record = result.alignment
    assert record["kept"] is True and record["best_epoch"] is not None
    s0, best = record["valid_next_item"]["step0"], record["valid_next_item"]["best"]
    assert best["recall@10"] > s0["recall@10"] and record["vs_step0"]["lower"] > 0
    # step 0's figure is the unaligned embedding's, measured independently on the same queries
    tables = embed_from_cache(result.encoder, cache, progress=False)
    unaligned = next_item_recall(*tables["unaligned"], queries, k=10)
    assert s0["recall@10"] == pytest.approx(unaligned["recall@10"]) and s0["n_queries"] == unaligned["n_queries"]
    aligned = next_item_recall(*tables["aligned"], queries, k=10)
    assert aligned["recall@10"] == pytest.approx(best["recall@10"])  # the kept epoch's weights are what ships


def test_a_significance_margin_can_refuse_a_small_gain(side_world):
    _, train, valid, cache, queries = side_world
    kept = train_side(cache, train, valid, _cfg(epochs=1), valid_queries=queries)
    gain = kept.alignment["vs_step0"]
    assert gain["diff"] > 0
    # a margin of more standard errors than the gain has: the same training ships step 0
    z = gain["diff"] / gain["se"] + 1.0
    refused = train_side(cache, train, valid, _cfg(epochs=1, gate_z=z), valid_queries=queries)
    assert refused.alignment["kept"] is False
    _, emb = embed_with_cache(refused.encoder, cache)
    _, unaligned = embed_with_cache(build_for_mode("unaligned", TINY), cache)
    assert np.array_equal(emb, unaligned)


def test_without_queries_the_validation_pairs_judge(side_world):
    _, train, valid, cache, _ = side_world
    result = train_side(cache, train, valid, _cfg(epochs=2))
    assert result.alignment["judge"] == "valid_pairs" and "valid_pairs" in result.alignment
    unjudged = train_side(cache, train, None, _cfg(epochs=1))
    assert unjudged.alignment["kept"] is None and "unjudged" in unjudged.alignment["reason"]


def test_pca_base_map_is_fitted_on_the_training_items_only(side_world):
    _, train, _, cache, _ = side_world
    result = train_side(cache, train, None, _cfg(epochs=1, base_map="pca"))
    used = np.unique(np.concatenate([train["left"].to_numpy(), train["right"].to_numpy()]))
    assert 0 < len(used) < len(cache.item_ids)  # some items are in no training pair
    want = BaseMap.from_stats(GramStats.of(pooled_top(cache.gather(used.tolist()))), TINY.embed_dim)
    got = base_map_of(result.encoder)
    assert torch.allclose(got.mean, want.mean, atol=1e-6) and torch.allclose(got.projection, want.projection,
                                                                              atol=1e-5)
    every = BaseMap.from_stats(GramStats.of(pooled_top(cache.states)), TINY.embed_dim)
    assert not torch.allclose(got.mean, every.mean, atol=1e-4)


def test_weights_no_judge_saw_never_ship(side_world):
    """max_steps ends training inside the first epoch: nothing was judged, so step 0 ships (not the trained
    steps), and the record says so."""
    _, train, valid, cache, queries = side_world
    result = train_side(cache, train, valid, _cfg(epochs=2, max_steps=3, lr=0.05), valid_queries=queries)
    assert result.steps == 3 and result.alignment["kept"] is False and result.alignment["epochs_judged"] == 0
    _, emb = embed_with_cache(result.encoder, cache)
    _, unaligned = embed_with_cache(build_for_mode("unaligned", TINY), cache)
    assert np.array_equal(emb, unaligned)
