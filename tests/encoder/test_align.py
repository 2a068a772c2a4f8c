import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.encoder import EncoderConfig, build_encoder, load_encoder
from pipelines.encoder.adapters import AdaptedAttention
from pipelines.encoder.alignment import AlignConfig, embed_with_cache, prepare_pairs, train_alignment
from pipelines.encoder.cache import build_cache, load_cache
from pipelines.encoder.embed_catalog import embed_catalog
from pipelines.encoder.retrieval_eval import pair_retrieval
from pipelines.encoder.items import ItemCatalog
from pipelines.encoder.model_io import build_for_mode
from pipelines.encoder.side import SideConfig

TINY = EncoderConfig.named("tiny")
SIDE = SideConfig(width=32, dropout=0.0)
LR = {"full": 1e-3, "adapters": 3e-3, "side": 3e-3, "side-towers": 3e-3}


def _cfg(mode, **kw):
    base = dict(mode=mode, epochs=4, batch_size=32, lr=LR[mode], progress=False, side=SIDE, seed=0)
    base.update(kw)
    return AlignConfig(**base)


@pytest.mark.parametrize("mode", ["full", "adapters", "side", "side-towers"])
def test_each_mode_trains_and_loss_falls(tiny_data, mode):
    ds, train, _ = tiny_data
    epochs = 3
    result = train_alignment(TINY, ds, train, _cfg(mode, epochs=epochs))
    per_epoch = np.array(result.losses).reshape(epochs, -1).mean(axis=1)
    assert result.steps == epochs * int(np.ceil(len(train) / 32))
    assert per_epoch[-1] < per_epoch[0] - 0.1, per_epoch
    assert 0 < result.trainable_params <= result.total_params
    if mode != "full":
        assert result.trainable_params < result.total_params


def _backbone_state(encoder):
    state = {}
    for name, tensor in encoder.state_dict().items():
        if ".adapter." in name or name.startswith(("projector", "head")):
            continue
        state[name.replace(".inner.", ".")] = tensor.clone()
    return state


def test_adapters_leave_every_backbone_weight_bit_identical(tiny_data):
    ds, train, _ = tiny_data
    reference = build_encoder(TINY)
    before = {k: v.clone() for k, v in reference.state_dict().items()
              if k.startswith(("text.", "vision.")) and "LayerNorm" not in k and ".ln_" not in k}
    result = train_alignment(TINY, ds, train, _cfg("adapters", epochs=1, adapter={"reduction": 8,
                                                                                   "train_norms": False}))
    after = _backbone_state(result.encoder)
    assert set(before) <= set(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]
    adapters = [m for m in result.encoder.modules() if isinstance(m, AdaptedAttention)]
    assert len(adapters) == 2 * TINY.tiny_layers  # LM + ViT attention blocks
    assert any(m.adapter.up.weight.abs().sum() > 0 for m in adapters)  # the adapters did train


def test_adapter_norms_train_but_other_backbone_weights_do_not(tiny_data):
    ds, train, _ = tiny_data
    reference = build_encoder(TINY).state_dict()
    result = train_alignment(TINY, ds, train, _cfg("adapters", epochs=1))
    after = _backbone_state(result.encoder)
    moved = {k for k, v in reference.items() if k in after and not torch.equal(v, after[k])}
    assert moved and all(("LayerNorm" in k or ".ln_" in k) for k in moved), sorted(moved)[:5]


def test_side_cache_round_trips_and_is_rebuilt_when_stale(tiny_data, tmp_path):
    ds, _, _ = tiny_data
    encoder = build_for_mode("side", TINY, side=SIDE)
    catalog = ItemCatalog.from_dataset(ds, TINY)
    built = build_cache(encoder, catalog, catalog.item_ids, tmp_path / "c", batch_size=16, shard_size=20,
                        progress=False)
    assert built.built and len(list((tmp_path / "c").glob("shard-*.safetensors"))) == 5  # 96 items / 20
    assert [len(ids) for ids, _ in built.iter_shards()] == [20, 20, 20, 20, 16]
    loaded = load_cache(tmp_path / "c")
    assert np.array_equal(loaded.item_ids, built.item_ids) and set(loaded.states) == set(built.states)
    for key in built.states:
        assert torch.equal(loaded.states[key], built.states[key]), key
    again = build_cache(encoder, catalog, catalog.item_ids, tmp_path / "c", progress=False)
    assert not again.built  # reused
    other = build_for_mode("side", EncoderConfig.named("tiny", seed=3), side=SIDE)
    rebuilt = build_cache(other, catalog, catalog.item_ids, tmp_path / "c", progress=False)
    assert rebuilt.built and not torch.equal(rebuilt.states["lm.pool"], built.states["lm.pool"])
    # dropping a shard is an error, not a silently smaller cache
    assert len(list((tmp_path / "c").glob("shard-*.safetensors"))) == 1  # stale shards removed
    (tmp_path / "c" / "shard-00000.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00000"):
        load_cache(tmp_path / "c")


def test_side_checkpoint_reproduces_training_time_embeddings(tiny_data, tmp_path):
    ds, train, _ = tiny_data
    result = train_alignment(TINY, ds, train, _cfg("side", epochs=2), out_dir=tmp_path / "run")
    _, from_cache = embed_with_cache(result.encoder, result.cache)
    restored = load_encoder(tmp_path / "run")
    ids, from_images, _ = embed_catalog(restored, ds, progress=False)
    assert np.array_equal(ids, result.cache.item_ids)
    assert np.allclose(from_cache, from_images, atol=1e-5)
    # the unaligned baseline computed from the cache equals running it on the items
    unaligned = build_for_mode("unaligned", TINY)
    _, u_cache = embed_with_cache(unaligned, result.cache)
    _, u_items, _ = embed_catalog(unaligned, ds, progress=False)
    assert np.allclose(u_cache, u_items, atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "adapters"])
def test_checkpoint_round_trip(tiny_data, tmp_path, mode):
    ds, train, _ = tiny_data
    result = train_alignment(TINY, ds, train, _cfg(mode, epochs=1), out_dir=tmp_path)
    _, before, _ = embed_catalog(result.encoder, ds, progress=False)
    _, after, _ = embed_catalog(load_encoder(tmp_path), ds, progress=False)
    assert np.allclose(before, after, atol=1e-5)


def test_aligned_beats_unaligned_on_validation_pairs(tiny_data):
    ds, train, valid = tiny_data
    # the residual starts at zero (the unaligned embedding): on 278 pairs it needs a higher rate than a head
    # trained from scratch to move as far in 3 epochs
    result = train_alignment(TINY, ds, train, _cfg("side", epochs=3, lr=1e-2))
    ids, aligned = embed_with_cache(result.encoder, result.cache)
    _, unaligned = embed_with_cache(build_for_mode("unaligned", TINY), result.cache)
    r_al, r_un = pair_retrieval(ids, aligned, valid), pair_retrieval(ids, unaligned, valid)
    # the latent cluster as the embedding: the best content alone can do on these behaviour pairs
    cluster = ds.items.set_index("item_id").loc[ids, "cluster"].to_numpy()
    oracle = np.eye(cluster.max() + 1)[cluster] + 1e-3 * np.random.default_rng(0).normal(size=(len(ids), 4))
    r_or = pair_retrieval(ids, oracle / np.linalg.norm(oracle, axis=1, keepdims=True), valid)
    assert r_al["recall@10"] > r_un["recall@10"] + 0.05, (r_al, r_un)
    assert r_al["recall@10"] > 0.8 * r_or["recall@10"], (r_al, r_or)
    assert r_al["mrr"] > r_un["mrr"]


def test_resume_continues_exactly_where_it_stopped(tiny_data, tmp_path):
    ds, train, _ = tiny_data
    straight = train_alignment(TINY, ds, train, _cfg("side", epochs=2, max_steps=10))
    train_alignment(TINY, ds, train, _cfg("side", epochs=2, max_steps=4, save_every=2), out_dir=tmp_path)
    resumed = train_alignment(TINY, ds, train, _cfg("side", epochs=2, max_steps=10), out_dir=tmp_path)
    assert resumed.resumed_from_step == 4 and resumed.steps == 10
    assert np.allclose(resumed.losses, straight.losses, atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        train_alignment(TINY, ds, train, _cfg("adapters"), out_dir=tmp_path)


def test_warm_start_from_checkpoint(tiny_data, tmp_path):
    ds, train, _ = tiny_data
    train_alignment(TINY, ds, train, _cfg("side", epochs=3), out_dir=tmp_path / "old")
    _, old, _ = embed_catalog(load_encoder(tmp_path / "old"), ds, progress=False)
    # an almost-zero learning rate keeps the warm-started weights: embeddings equal the old checkpoint's
    warm = train_alignment(TINY, ds, train.iloc[:64], _cfg("side", lr=1e-12, max_steps=1),
                           init_checkpoint=tmp_path / "old")
    _, new, _ = embed_catalog(warm.encoder, ds, progress=False)
    assert np.allclose(old, new, atol=1e-4)
    with pytest.raises(ValueError, match="trained in mode"):
        train_alignment(TINY, ds, train, _cfg("full"), init_checkpoint=tmp_path / "old")


def test_prepare_pairs_counts_every_dropped_pair():
    pairs = pd.DataFrame({"left": [1, 1, 2, 9, 3], "right": [2, 1, 3, 1, 4],
                          "source": ["swing", "u2i", "u2i", "swing", "other"]})
    kept, stats = prepare_pairs(pairs, {1, 2, 3, 4}, ("swing", "u2i"))
    assert kept[["left", "right"]].values.tolist() == [[1, 2], [2, 3]]
    assert stats == {"given": 5, "used": 2, "dropped_source": 1, "dropped_self_pair": 1,
                     "dropped_unknown_item": 1, "used_swing": 1, "used_u2i": 1}
    with pytest.raises(ValueError, match="right"):
        prepare_pairs(pairs.drop(columns="right"), {1}, ("swing",))


def test_align_config_validation():
    with pytest.raises(ValueError, match="mode"):
        AlignConfig(mode="lora")
    with pytest.raises(ValueError, match="temperature"):
        AlignConfig(temperature=0)
    cfg = AlignConfig(mode="adapters", side={"width": 16})
    assert AlignConfig.from_dict(cfg.to_dict()) == cfg
