"""The `user_prompt` ranker feature (issue 22): row vq+rq+prompt = vq+rq plus the MLLM user encoder's vector and
its dot product with the target's aligned embedding, as dense inputs; users without a vector get zeros."""
import dataclasses

import numpy as np
import pytest

from ranker.batch import build_batch
from ranker.config import RankerConfig
from ranker.data import items_for, prepare_examples
from ranker.features import N_BASE_DENSE, build_schema
from oracle_world import oracle_world


@pytest.fixture(scope="module")
def world():
    w = oracle_world(n_items=60, n_users=20, n_events=600, seed=3)
    return w, prepare_examples(w.interactions, w.item_ids, history_len=5)


def _items_with_users(w, users):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((len(users), w.embeddings.shape[1])).astype(np.float32)
    base = w.item_features()
    items = base if base.frozen is not None else dataclasses.replace(
        base, frozen=np.vstack([np.zeros((1, w.embeddings.shape[1]), np.float32), w.embeddings]))
    return dataclasses.replace(items, user_ids=np.asarray(users, np.int64), user_vectors=vecs), vecs


def test_prompt_row_adds_the_user_vector_and_its_target_score(world):
    w, data = world
    users = np.sort(np.unique(w.interactions["user_id"]))[:-3]      # the last 3 users have no vector
    items, vecs = _items_with_users(w, users)
    cfg = RankerConfig(features="vq+rq+prompt", history_len=5)
    schema = build_schema(cfg, data.users.n_rows, items)
    d = vecs.shape[1]
    assert schema.dense_parts == ("prompt",) and schema.n_dense == N_BASE_DENSE + 1 + d
    ex = data.train.take(np.arange(len(data.train)))
    dense = build_batch(ex, schema, items).dense.numpy()
    block = dense[:, -(1 + d):]
    pos = np.searchsorted(users, ex.user_id)
    has = (pos < len(users)) & (users[np.minimum(pos, len(users) - 1)] == ex.user_id)
    assert has.any() and (~has).any()
    np.testing.assert_allclose(block[has, 1:], vecs[pos[has]])
    np.testing.assert_allclose(block[has, 0], (vecs[pos[has]] * items.frozen[ex.item[has]]).sum(1), rtol=1e-5)
    assert not block[~has].any()
    # vq+rq (the row it is compared with) differs only by that block
    plain = build_batch(ex, build_schema(RankerConfig(features="vq+rq", history_len=5), data.users.n_rows, items),
                        items).dense.numpy()
    np.testing.assert_array_equal(plain, dense[:, :N_BASE_DENSE])


def test_prompt_row_needs_user_embeddings(world):
    w, data = world
    with pytest.raises(ValueError, match="user_embeddings"):
        build_schema(RankerConfig(features="vq+rq+prompt"), data.users.n_rows, w.item_features())
    with pytest.raises(FileNotFoundError, match="item_codes\\+prompt"):
        items_for({"item_codes": w.item_features()}, "vq+rq+prompt")

