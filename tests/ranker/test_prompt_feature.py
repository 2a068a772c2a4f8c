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



# ------------------------------------------------------------------------ point-in-time vectors (issue 22, the leak)

def test_asof_lookup_picks_the_latest_cut_at_or_before_the_example():
    from ranker.features import asof_rows
    # hand-made table sorted by (user, cut): user 7 cut at 10 and 20, user 9 at 5
    users, cuts = np.array([7, 7, 9]), np.array([10, 20, 5])
    q_users = np.array([7, 7, 7, 7, 7, 9, 9, 8])
    q_ts = np.array([9, 10, 19, 20, 99, 4, 5, 30])
    assert asof_rows(users, cuts, q_users, q_ts).tolist() == [-1, 0, 0, 1, 1, -1, 2, -1]
    vecs = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], np.float32)
    w = oracle_world(n_items=10, n_users=3, n_events=30, seed=1)
    items = dataclasses.replace(w.item_features(), user_ids=users, user_vectors=vecs, user_cut_ts=cuts,
                                user_vectors_source="asof")
    got = items.user_vectors_of(q_users, q_ts)
    np.testing.assert_array_equal(got, [[0, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 0], [2, 2], [0, 0]])
    with pytest.raises(ValueError, match="ts"):
        items.user_vectors_of(q_users)


def _asof_items(w, data, user):
    """An as-of table where ``user`` has a vector at two cuts inside its train window (the second cut at one of
    its train example times), every other user one cut at its first train example."""
    ex = data.train
    base = w.item_features()
    items = dataclasses.replace(base, frozen=np.vstack([np.zeros((1, w.embeddings.shape[1]), np.float32),
                                                        w.embeddings]))
    times = np.unique(ex.ts[ex.user_id == user])
    c1, c2 = int(times[1]), int(times[len(times) // 2])
    others = [int(u) for u in np.unique(ex.user_id) if u != user]
    first = {u: int(ex.ts[ex.user_id == u].min()) for u in others}
    rows = sorted([(user, c1), (user, c2)] + [(u, first[u]) for u in others])
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((len(rows), w.embeddings.shape[1])).astype(np.float32)
    u_arr = np.array([r[0] for r in rows], np.int64)
    c_arr = np.array([r[1] for r in rows], np.int64)
    return dataclasses.replace(items, user_ids=u_arr, user_vectors=vecs, user_cut_ts=c_arr,
                               user_vectors_source="asof"), (c1, c2), vecs, rows


def test_two_examples_of_one_user_at_different_times_get_different_prompt_vectors(world):
    w, data = world
    user = int(np.bincount(data.train.user_id).argmax())
    items, (c1, c2), vecs, rows = _asof_items(w, data, user)
    cfg = RankerConfig(features="vq+rq+prompt", history_len=5)
    schema = build_schema(cfg, data.users.n_rows, items)
    d = vecs.shape[1]
    mine = np.flatnonzero(data.train.user_id == user)
    ex = data.train.take(mine)
    block = build_batch(ex, schema, items).dense.numpy()[:, -d:]
    r1, r2 = rows.index((user, c1)), rows.index((user, c2))
    for b, t in enumerate(ex.ts):
        want = vecs[r2] if t >= c2 else vecs[r1] if t >= c1 else np.zeros(d, np.float32)
        np.testing.assert_array_equal(block[b], want)
    assert (ex.ts < c1).any() and ((ex.ts >= c1) & (ex.ts < c2)).any() and (ex.ts >= c2).any()


def _publish_with_user_tables(w, root, asof: bool):
    """The oracle version, then a child with user_embeddings.parquet (and the as-of table when ``asof``) whose
    vectors are hand-made: the serving vector is all ones, the as-of rows are +-e_0 by cut."""
    from feature_store import FeatureStore
    from feature_store.tables import write_asof_embeddings, write_embeddings
    from oracle_world import publish_world_version

    parent = FeatureStore(root).read(publish_world_version(w, root))
    users = np.unique(w.interactions["user_id"]).astype(np.int64)
    d = w.embeddings.shape[1]
    with FeatureStore(root).stage(parent=parent.id) as st:
        for name in parent.files():
            if name != "manifest.json":
                (st.path / name).write_bytes(parent.file(name).read_bytes())
        write_embeddings(st.path / "user_embeddings.parquet", users, np.ones((len(users), d), np.float32),
                         id_column="user_id")
        if asof:
            mid = int(np.median(w.interactions["ts"]))
            u = np.repeat(users, 2)
            cuts = np.tile([mid, int(w.interactions["ts"].max()) + 1], len(users))
            v = np.zeros((len(u), d), np.float32)
            v[0::2, 0], v[1::2, 0] = 1.0, -1.0
            write_asof_embeddings(st.path / "user_embeddings_asof.parquet", u, cuts, v)
        return st.publish(config=parent.config, extra={"protocol": parent.manifest.get("protocol")})


@pytest.mark.parametrize("asof", [True, False])
def test_a_ranker_run_reads_the_asof_table_when_the_version_has_it(world, tmp_path, asof):
    from ranker.data import prompt_vectors_source, store_items
    from ranker.train import fit

    w, data = world
    version = _publish_with_user_tables(w, tmp_path / "store", asof)
    assert prompt_vectors_source(version) == ("asof" if asof else "serving")   # qarm eval's cascades record
    items = items_for(store_items(version, w.item_ids), "vq+rq+prompt")
    assert items.user_vectors_source == ("asof" if asof else "serving")
    cfg = RankerConfig(features="vq+rq+prompt", history_len=5, epochs=1, batch_size=256, patience=0, seed=0)
    result = fit(data, items, cfg, progress=False)
    rec = result["prompt_vectors"]
    assert rec["source"] == ("asof" if asof else "serving")
    ex = data.train
    dense = build_batch(ex.take(np.arange(len(ex))), build_schema(cfg, data.users.n_rows, items), items).dense.numpy()
    vec = dense[:, -w.embeddings.shape[1]:]
    if asof:   # before the median time: no cut yet (zeros); from it on: +e_0 (the -e_0 cut is after every event)
        mid = int(np.median(w.interactions["ts"]))
        early, late = ex.ts < mid, ex.ts >= mid
        assert early.any() and late.any()
        assert not vec[early].any() and (vec[late, 0] == 1.0).all() and not vec[late, 1:].any()
        assert 0 < rec["examples_with_vector"]["train"] < 1
    else:      # the old behaviour: every example of a user reads its one vector
        assert (vec == 1.0).all() and rec["examples_with_vector"]["train"] == 1.0
    assert RankerConfig(features="vq+rq").uses("prompt") is False
    assert fit(data, items, RankerConfig(features="vq+rq", history_len=5, epochs=1, batch_size=256, patience=0),
               progress=False)["prompt_vectors"] is None
