import numpy as np
import pytest
import torch

from ranker.checkpoint import load_checkpoint
from ranker.config import RankerConfig
from ranker.data import prepare_examples
from ranker.features import build_schema
from pipelines.data.oracle import oracle_world
from ranker.train import evaluate, fit


@pytest.fixture(scope="module")
def world():
    w = oracle_world(n_items=500, n_users=60, n_events=12000, seed=0)
    return w, prepare_examples(w.interactions, w.item_ids, history_len=8)


def _cfg(**kw):
    base = dict(history_len=8, epochs=3, batch_size=256, patience=0, seed=0)
    base.update(kw)
    return RankerConfig(**base)


def test_codes_beat_ids_when_codes_carry_the_signal(world):
    w, data = world
    items = w.item_features()
    ids = fit(data, items, _cfg(features="id", epochs=6), progress=False)
    codes = fit(data, items, _cfg(features="vq+rq", epochs=6), progress=False)
    assert codes["test"]["auc"] > ids["test"]["auc"] + 0.1
    assert codes["test"]["auc"] > 0.75


def test_checkpoint_loads_weights_only_and_reproduces_test_metrics(world, tmp_path):
    w, data = world
    items = w.item_features()
    cfg = _cfg(features="rq", epochs=2)
    result = fit(data, items, cfg, out_dir=tmp_path, progress=False)
    raw = torch.load(tmp_path / "ranker.pt", weights_only=True)
    assert "model" in raw and "dense_optimizer" in raw
    model, cfg2, meta = load_checkpoint(tmp_path / "ranker.pt", items=items, n_users=data.users.n_rows)
    assert cfg2 == cfg and meta["restored_best"]
    schema = build_schema(cfg2, data.users.n_rows, items)
    again = evaluate(model, data.test, schema, items)
    assert again["auc"] == pytest.approx(result["test"]["auc"], abs=1e-6)
    assert (tmp_path / "result.json").exists()


def test_resume_continues_from_the_checkpoint(world, tmp_path):
    w, data = world
    items = w.item_features()
    first = fit(data, items, _cfg(features="id", epochs=1), out_dir=tmp_path, progress=False)
    assert [h["epoch"] for h in first["history"]] == [0]
    with pytest.raises(ValueError, match="different config.*lr_dense"):
        fit(data, items, _cfg(features="id", epochs=3, lr_dense=0.01), out_dir=tmp_path, resume=True, progress=False)
    cont = fit(data, items, _cfg(features="id", epochs=3), out_dir=tmp_path, resume=True, progress=False)
    assert [h["epoch"] for h in cont["history"]] == [0, 1, 2]
    assert cont["history"][0] == first["history"][0]
    assert cont["steps"] == 2 * first["steps"]  # only the two new epochs ran
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit(data, items, _cfg(features="id"), out_dir=tmp_path / "empty", resume=True, progress=False)


def test_early_stopping_restores_the_best_epoch(world):
    w, data = world
    items = w.item_features()
    result = fit(data, items, _cfg(features="id", epochs=6, patience=1, lr_dense=0.05, lr_sparse=0.5), progress=False)
    best = max(h["valid_auc"] for h in result["history"])
    assert result["valid"]["auc"] == pytest.approx(best, abs=1e-6)
    assert result["best_epoch"] == int(np.argmax([h["valid_auc"] for h in result["history"]]))


def test_items_without_codes_use_the_unknown_row_and_are_counted(world):
    w, data = world
    items = w.item_features(coded_fraction=0.8, seed=1)
    result = fit(data, items, _cfg(features="vq+rq", epochs=1, max_steps=3), progress=False)
    cov = result["coverage"]["test_targets"]
    expected = int((~items.has_codes[data.test.item]).sum())
    assert cov["without_codes"] == expected and expected > 0
    assert np.isfinite(result["test"]["auc"])


def test_remap_rq_tables_carries_learned_rows(world, tmp_path):
    from ranker.checkpoint import remap_rq_tables
    from ranker.features import ItemFeatures
    from ranker.model import embedding_tables

    w, data = world
    items = w.item_features()
    fit(data, items, _cfg(features="rq", epochs=1), out_dir=tmp_path, progress=False)
    model, cfg, _ = load_checkpoint(tmp_path / "ranker.pt", items=items, n_users=data.users.n_rows)
    # new version: level-0 codes relabelled by a permutation (same clusters, new ids), level 1 unchanged
    k0 = items.rq_sizes[0]
    perm = np.random.default_rng(0).permutation(k0)  # old code c -> new code perm[c]
    new_rq = w.rq.copy()
    new_rq[:, 0] = perm[w.rq[:, 0]]
    new_items = ItemFeatures.build(w.item_ids, code_item_ids=w.item_ids, rq=new_rq, vq=w.vq, rq_sizes=items.rq_sizes)
    old_for_new = np.argsort(perm)  # new code j came from old code old_for_new[j]
    new_model = remap_rq_tables(model, cfg, new_items, data.users.n_rows,
                                [old_for_new, np.arange(items.rq_sizes[1])])
    old_t, new_t = embedding_tables(model)["rq_l0"], embedding_tables(new_model)["rq_l0"]
    assert torch.equal(new_t[perm[3]], old_t[3]) and torch.equal(new_t[-1], old_t[-1])
    schema = build_schema(cfg, data.users.n_rows, items)
    before = evaluate(model, data.valid, schema, items)["auc"]
    after = evaluate(new_model, data.valid, build_schema(cfg, data.users.n_rows, new_items), new_items)["auc"]
    assert after == pytest.approx(before, abs=1e-6)  # a pure relabelling changes nothing
    with pytest.raises(ValueError, match="mappings"):
        remap_rq_tables(model, cfg, new_items, data.users.n_rows, [old_for_new])
