"""Side mode over the MLLM: one backbone pass, every embedding from the same cache, graph masking, validation."""
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.encoder import EncoderConfig, load_encoder
from pipelines.encoder.alignment import AlignConfig, split_valid_pairs, train_alignment, train_side
from pipelines.encoder.cache import load_cache
from pipelines.encoder.embed_catalog import embed_catalog
from pipelines.encoder.retrieval_eval import pair_retrieval
from pipelines.encoder.items import ItemCatalog
from pipelines.encoder.losses import PositiveGraph, false_negative_mask, symmetric_info_nce
from pipelines.encoder.model_io import build_for_mode
from pipelines.encoder.onepass import build_mllm_cache, embed_from_cache, write_embedding_tables
from pipelines.encoder.side import SideConfig
from pipelines.encoder.base_map import BaseMap
from pipelines.encoder.side_mllm import cache_bytes_per_item

TINY = EncoderConfig.named("tiny")
SIDE = SideConfig(width=32, dropout=0.0)


def _cfg(**kw):
    base = dict(mode="side", epochs=3, batch_size=32, lr=3e-3, progress=False, side=SIDE, seed=0)
    base.update(kw)
    return AlignConfig(**base)


# ------------------------------------------------------------------------------------------ graph masking
def test_graph_mask_masks_a_known_positive_outside_the_batch():
    graph = PositiveGraph(np.array([1, 1, 4, 7]), np.array([2, 3, 5, 8]))
    left, right = torch.tensor([1, 4, 7]), torch.tensor([2, 3, 9])  # (1, 3) is a known pair, not in the batch
    l2r, r2l = graph.masks(left, right)
    assert l2r.tolist() == [[False, True, False],   # query 1: candidate 3 is its partner
                            [False, False, False],
                            [False, False, False]]
    assert r2l.tolist() == [[False, False, False],
                            [True, False, False],   # query 3: candidate 1 is its partner
                            [False, False, False]]
    assert not false_negative_mask(left, right)[0, 1]  # the batch-only mask cannot know it
    # and the loss changes because of it: the false negative no longer competes with the positive
    emb = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    a, b = emb[:3], emb[3:]
    assert symmetric_info_nce(a, b, 0.1, l2r, mask_r2l=r2l) != symmetric_info_nce(a, b, 0.1, false_negative_mask(
        left, right))


def test_graph_mask_contains_the_batch_mask():
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 30, size=(200, 2))
    graph = PositiveGraph(pairs[:, 0], pairs[:, 1])
    sel = torch.from_numpy(pairs[:64])
    l2r, r2l = graph.masks(sel[:, 0], sel[:, 1])
    batch = false_negative_mask(sel[:, 0], sel[:, 1])
    assert bool((l2r | ~batch).all()) and bool((r2l | ~batch.T).all())
    assert int(l2r.sum()) > int(batch.sum())  # strictly more known positives than the batch shows
    assert not l2r.diagonal().any() and not r2l.diagonal().any()


def test_split_valid_pairs_is_later_in_time_and_unseen():
    pairs = pd.DataFrame({"left": [1, 2, 3, 4, 2, 5], "right": [9, 8, 7, 6, 1, 8], "source": "swing",
                          "ts": [10, 20, 30, 40, 40, 50], "weight": 1.0})
    pairs.loc[5, ["left", "right"]] = [8, 2]  # repeats train pair (2, 8) in the other order
    train, valid = split_valid_pairs(pairs, valid_frac=0.4)
    assert train["ts"].max() < valid["ts"].min()  # ts 40 is the cut: both ts-40 pairs go to validation
    assert valid[["left", "right"]].values.tolist() == [[4, 6], [2, 1]]  # (8, 2) dropped: seen in training
    with pytest.raises(ValueError, match="ts"):
        split_valid_pairs(pairs.drop(columns="ts"))


# ---------------------------------------------------------------------------------------- one backbone pass
class _Counter:
    def __init__(self, *modules):
        self.calls = 0
        for m in modules:
            m.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def test_one_backbone_pass_yields_every_embedding(tiny_data, tmp_path):
    ds, train, valid = tiny_data
    encoder = build_for_mode("side", TINY, side=SIDE)
    lm, vision = _Counter(encoder.text.lm), _Counter(encoder.vision)
    catalog = ItemCatalog.from_dataset(ds, TINY)
    cache = build_mllm_cache(encoder, catalog, cache_dir=tmp_path / "cache", batch_size=32, progress=False)
    assert lm.calls == 3 and vision.calls == 3  # 96 items / 32 per batch, each item through each backbone once
    result = train_side(cache, train, valid, _cfg(), out_dir=tmp_path / "run")
    out = embed_from_cache(result.encoder, cache, progress=False)
    assert lm.calls == 3 and vision.calls == 3  # training and every embedding read the cache only
    assert set(out) == {"aligned", "unaligned", "text", "image"}
    for kind, (ids, emb) in out.items():
        assert np.array_equal(ids, catalog.item_ids) and emb.shape == (96, TINY.embed_dim), kind
    paths = write_embedding_tables(out, tmp_path / "tables")
    assert sorted(p.name for p in paths.values()) == ["item_embeddings.parquet", "item_embeddings_image.parquet",
                                                       "item_embeddings_text.parquet",
                                                       "item_embeddings_unaligned.parquet"]


def test_cache_embeddings_equal_the_ones_from_running_the_mllm(tiny_data, tmp_path):
    ds, train, valid = tiny_data
    catalog = ItemCatalog.from_dataset(ds, TINY)
    cache = build_mllm_cache(TINY, catalog, SIDE, cache_dir=tmp_path / "cache", shard_size=40, progress=False)
    result = train_side(load_cache(tmp_path / "cache"), train, valid, _cfg(epochs=2), out_dir=tmp_path / "run")
    out = embed_from_cache(result.encoder, cache, progress=False)
    # aligned: the checkpoint restored with its backbones (the RunInference path) gives the same vectors
    ids, direct, _ = embed_catalog(load_encoder(tmp_path / "run"), ds, progress=False)
    assert np.allclose(out["aligned"][1], direct, atol=1e-5)
    # unaligned: the frozen MLLM's pooled output through the fixed map, as build_for_mode("unaligned") computes
    _, unaligned, _ = embed_catalog(build_for_mode("unaligned", TINY), ds, progress=False)
    assert np.allclose(out["unaligned"][1], unaligned, atol=1e-5)
    # image: the vision tower's top layer alone, through its own fixed map
    mllm = build_for_mode("full", TINY).eval()
    batch = mllm.collate(catalog.inputs(ids[:8]))
    with torch.no_grad():
        _, layers = mllm.vision(batch.pixels, grid=1)
        image = BaseMap.gaussian(layers[-1].shape[1], TINY.embed_dim, seed=2)(layers[-1])
    assert torch.allclose(torch.from_numpy(out["image"][1][:8]), image, atol=1e-5)
    # text differs from image and unaligned (another view of the same pass)
    assert not np.allclose(out["text"][1], out["unaligned"][1], atol=1e-3)


def test_missing_modalities_give_zero_rows_and_stay_finite(tmp_path):
    from PIL import Image
    from types import SimpleNamespace

    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "ok.png")
    items = pd.DataFrame({"item_id": [1, 2, 3], "title": ["both", "text only", ""],
                          "text": [None, None, None], "image_uri": ["ok.png", None, "ok.png"]})
    catalog = ItemCatalog.from_dataset(SimpleNamespace(items=items, image_root=tmp_path), TINY)
    cache = build_mllm_cache(TINY, catalog, SIDE, progress=False)
    side = build_for_mode("side", TINY, side=SIDE)
    out = embed_from_cache(side, cache, progress=False)
    norms = {k: np.linalg.norm(v[1], axis=1).round(4).tolist() for k, v in out.items()}
    assert norms["text"] == [1.0, 1.0, 0.0] and norms["image"] == [1.0, 0.0, 1.0]
    assert norms["aligned"] == [1.0, 1.0, 1.0] and norms["unaligned"] == [1.0, 1.0, 1.0]


def test_cache_bytes_match_the_documented_formula(tiny_data):
    ds, _, _ = tiny_data
    catalog = ItemCatalog.from_dataset(ds, TINY)
    pooled = build_mllm_cache(TINY, catalog, SIDE, progress=False)
    tokens = build_mllm_cache(TINY, catalog, SideConfig(width=32, token_states=True), progress=False)
    sizes = cache_bytes_per_item(pooled.layout)
    assert pooled.bytes_per_item() == sizes["pooled"]
    assert tokens.bytes_per_item() == sizes["pooled"] + sizes["tokens"]
    assert pooled.layout["lm_layers"] == [1] and TINY.tiny_layers == 2  # stride 2 keeps the top of 2 layers


@pytest.mark.parametrize("side", [SIDE, SideConfig(width=32, dropout=0.0, token_states=True, layer_stride=1)],
                         ids=["pooled", "tokens"])
def test_side_over_the_mllm_trains_and_loss_falls(tiny_data, side):
    ds, train, _ = tiny_data
    result = train_alignment(TINY, ds, train, _cfg(side=side))
    per_epoch = np.array(result.losses).reshape(3, -1).mean(axis=1)
    assert per_epoch[-1] < per_epoch[0] - 0.1, per_epoch
    assert result.cache.layout["kind"] == "mllm" and result.cache.layout["token_states"] == side.token_states


# ------------------------------------------------------------------------------------------- validation
def test_validation_stops_early_and_restores_the_best_epoch(tiny_data):
    ds, train, valid = tiny_data
    result = train_alignment(TINY, ds, train, _cfg(epochs=12, patience=1, lr=1e-2), valid_pairs=valid)
    history = [h["recall@10"] for h in result.valid]
    assert len(history) == result.epochs_run
    assert result.best_epoch == int(np.argmax(history))
    if result.stopped_early:
        assert history[-1] <= history[-2]
    ids, emb = embed_from_cache(result.encoder, result.cache, progress=False)["aligned"]
    assert pair_retrieval(ids, emb, valid, ks=(10,))["recall@10"] == pytest.approx(max(history))


def test_learned_temperature_moves_and_fixed_one_does_not(tiny_data):
    ds, train, _ = tiny_data
    fixed = train_alignment(TINY, ds, train, _cfg(epochs=1))
    learned = train_alignment(TINY, ds, train, _cfg(epochs=1, learn_temperature=True, lr=3e-2))
    assert fixed.temperature == pytest.approx(0.1)
    assert abs(learned.temperature - 0.1) > 1e-3


def test_progress_is_one_line_per_stage_off_a_terminal(tiny_data, caplog):
    ds, _, _ = tiny_data
    with caplog.at_level(logging.INFO, logger="pipelines.encoder"):
        cache = build_mllm_cache(TINY, ItemCatalog.from_dataset(ds, TINY), SIDE, progress=True)
        embed_from_cache(None, cache, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("pipelines.encoder")]
    assert sum(m.startswith("side cache: 96 items") for m in lines) == 1
    assert sum(m.startswith("embed from cache: 96 items") for m in lines) == 1
