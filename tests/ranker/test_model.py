import numpy as np
import pytest
import torch

from ranker.batch import build_batch
from ranker.config import RankerConfig
from ranker.data import prepare_examples
from ranker.features import build_schema
from ranker.model import embedding_tables
from oracle_world import oracle_world
from ranker.train import attach_optimizers, build_train_model
from ranker.distributed import DistContext


@pytest.fixture(scope="module")
def world():
    w = oracle_world(n_items=60, n_users=20, n_events=600, seed=3)
    return w, prepare_examples(w.interactions, w.item_ids, history_len=5)


def test_gradients_reach_only_the_code_rows_used(world):
    w, data = world
    items = w.item_features()
    cfg = RankerConfig(features="vq+rq", history_len=5, seed=0)
    schema = build_schema(cfg, data.users.n_rows, items)
    model = build_train_model(cfg, schema, items)
    module, dense_opt = attach_optimizers(model, cfg, DistContext())
    ex = data.train.take(np.arange(4))
    batch = build_batch(ex, schema, items)
    tables = embedding_tables(module)
    before = {k: v.detach().clone() for k, v in tables.items()}
    loss, _ = module(batch)
    dense_opt.zero_grad()
    loss.backward()
    dense_opt.step()
    after = {k: v.detach() for k, v in tables.items()}
    used_rq0 = set(items.rq[ex.item, 0]) | set(items.rq[ex.hist[ex.hist >= 0], 0])
    changed_rq0 = set(np.flatnonzero((after["rq_l0"] != before["rq_l0"]).any(1).numpy()))
    assert changed_rq0 == used_rq0
    used_vq = set(items.vq[ex.item].reshape(-1))
    changed_vq = set(np.flatnonzero((after["vq"] != before["vq"]).any(1).numpy()))
    assert changed_vq == used_vq
    used_items = set(ex.item) | set(ex.hist[ex.hist >= 0])
    changed_items = set(np.flatnonzero((after["item"] != before["item"]).any(1).numpy()))
    assert changed_items == used_items
    assert len(changed_items) < items.n_rows  # unused rows exist and stayed put


def test_codebook_init_sets_rq_tables_and_keeps_unknown_row(world):
    w, data = world
    items = w.item_features()
    cfg = RankerConfig(features="rq", history_len=5, code_init="codebook")
    model = build_train_model(cfg, build_schema(cfg, data.users.n_rows, items), items)
    weight = embedding_tables(model)["rq_l0"].detach().numpy()
    # rows follow the centroid geometry: pairwise distances rank like the centroids' ones
    c = w.codebooks[0]
    d_c = np.linalg.norm(c[:, None] - c[None], axis=-1)[np.triu_indices(len(c), 1)]
    d_w = np.linalg.norm(weight[:-1, None] - weight[None, :-1], axis=-1)[np.triu_indices(len(c), 1)]
    assert np.corrcoef(d_c, d_w)[0, 1] > 0.95
    rand = build_train_model(RankerConfig(features="rq", history_len=5), build_schema(cfg, data.users.n_rows, items), items)
    assert torch.equal(embedding_tables(rand)["rq_l0"][-1], embedding_tables(model)["rq_l0"][-1])


def test_frozen_row_keeps_the_vector_frozen(world):
    w, data = world
    items = w.item_features(frozen=True)
    cfg = RankerConfig(features="frozen", history_len=5)
    schema = build_schema(cfg, data.users.n_rows, items)
    model = build_train_model(cfg, schema, items)
    module, opt = attach_optimizers(model, cfg, DistContext())
    frozen_before = items.frozen.copy()
    batch = build_batch(data.train.take(np.arange(8)), schema, items)
    assert batch.frozen_target.shape == (8, items.frozen.shape[1])
    loss, _ = module(batch)
    loss.backward()
    assert model.model.item_arch.frozen_proj.weight.grad is not None
    assert np.array_equal(items.frozen, frozen_before)
