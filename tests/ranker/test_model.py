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
    rand = build_train_model(RankerConfig(features="rq", history_len=5, code_init="random"),
                             build_schema(cfg, data.users.n_rows, items), items)
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


def test_interaction_arch_is_the_pairwise_dot_products():
    from ranker.model import InteractionArch

    arch = InteractionArch(3)
    x = torch.tensor([[[1.0, 0.0], [2.0, 3.0], [-1.0, 4.0]]])  # B=1, F=3, D=2
    # pairs (0,1), (0,2), (1,2): 1*2 + 0*3 = 2, 1*-1 + 0*4 = -1, 2*-1 + 3*4 = 10
    assert arch(x).tolist() == [[2.0, -1.0, 10.0]]
    assert arch.out_features == 3 and arch(torch.randn(5, 3, 7)).shape == (5, 3)
    with pytest.raises(ValueError, match=">= 2 features"):
        InteractionArch(1)


def test_interaction_feeds_the_over_arch_the_dots_of_target_history_and_bags(world):
    w, data = world
    items = w.item_features(frozen=True)
    cfg = RankerConfig(features="vq+rq+frozen", history_len=5, interaction=True, embedding_dim=4)
    schema = build_schema(cfg, data.users.n_rows, items)
    model = build_train_model(cfg, schema, items).model
    # per item: id, 2 RQ levels, frozen projection = 4 vectors; target + attended history + user + VQ bag = 10
    assert model.interaction_arch.num_features == 10
    plain = build_train_model(RankerConfig.from_dict({**cfg.to_dict(), "interaction": False}), schema, items).model
    assert model.over_arch.mlp[0].in_features == plain.over_arch.mlp[0].in_features + 45
    batch = build_batch(data.train.take(np.arange(6)), schema, items)
    seq_out, bag_out = model.sparse_arch(batch.seq, batch.bag)
    target, history = model.item_arch(seq_out, batch.frozen_target, batch.frozen_hist)
    attended = model.attention_arch(target, history, batch.hist_len)
    stack = model._interaction_inputs(target, attended, [bag_out["user_id"], bag_out["vq"]])
    assert stack.shape == (6, 10, 4)
    assert torch.equal(stack[:, 1], seq_out["rq_l0"][:, 0])  # the target's RQ level-0 vector
    assert torch.equal(stack[:, 9], bag_out["vq"])
    dots = model.interaction_arch(stack)
    assert dots[:, 0].detach().numpy() == pytest.approx((stack[:, 0] * stack[:, 1]).sum(-1).detach().numpy())
    assert model(batch).shape == (6,)


def test_content_init_starts_rq_rows_from_centroids_and_vq_rows_from_item_vectors(world):
    from ranker.content_init import ContentMap

    w, data = world
    items = w.item_features(frozen=True)
    cfg = RankerConfig(features="vq+rq", history_len=5, code_init="content", seed=3)
    schema = build_schema(cfg, data.users.n_rows, items)
    tables = embedding_tables(build_train_model(cfg, schema, items))
    cmap = ContentMap.fit(items.frozen[items.has_frozen], cfg.embedding_dim, cfg.content_std, seed=cfg.seed)
    # VQ row r = M(frozen vector of item r): the neighbour bag of an item averages its neighbours' mapped vectors
    assert tables["vq"][1:].detach().numpy() == pytest.approx(cmap(items.frozen[1:]), abs=1e-6)
    # RQ level 0 = M(centroid); level 1 is a residual: the same projection and scale, no centre
    assert tables["rq_l0"][:-1].detach().numpy() == pytest.approx(cmap(w.codebooks[0]), abs=1e-6)
    assert tables["rq_l1"][:-1].detach().numpy() == pytest.approx(
        w.codebooks[1] @ cmap.proj * cmap.scale, abs=1e-6)
    # the map is a scaled isometry: distances between mapped vectors are the content's, times the scale
    a, b = items.frozen[1], items.frozen[2]
    assert np.linalg.norm(cmap(a[None]) - cmap(b[None])) == pytest.approx(cmap.scale * np.linalg.norm(a - b), rel=1e-4)
    assert float(cmap(items.frozen[1:]).std()) == pytest.approx(cfg.content_std, rel=1e-3)
    # the reserved unknown rows keep the random init of code_init="random"
    rand = embedding_tables(build_train_model(RankerConfig.from_dict({**cfg.to_dict(), "code_init": "random"}),
                                              schema, items))
    assert torch.equal(rand["rq_l0"][-1], tables["rq_l0"][-1]) and torch.equal(rand["vq"][0], tables["vq"][0])
    assert torch.equal(rand["item"], tables["item"])  # ids are not a code table
    # the frozen row's projection starts as the same map: frozen and codes start equally informed
    frozen_cfg = RankerConfig(features="vq+rq+frozen", history_len=5, code_init="content", seed=3)
    model = build_train_model(frozen_cfg, build_schema(frozen_cfg, data.users.n_rows, items), items).model
    x = items.frozen[1:6]
    assert model.item_arch.frozen_proj(torch.from_numpy(x)).detach().numpy() == pytest.approx(cmap(x), abs=1e-6)
    assert embedding_tables(model)["vq"][1:].detach().numpy() == pytest.approx(cmap(items.frozen[1:]), abs=1e-6)


def test_vq_rq_at_step_0_sees_content_and_random_init_does_not(world):
    w, data = world
    items = w.item_features(frozen=True)
    unit = items.frozen[1:] / np.linalg.norm(items.frozen[1:], axis=1, keepdims=True)
    cos = (unit @ unit.T)[np.triu_indices(len(unit), 1)]

    def item_vector_similarity(code_init):
        cfg = RankerConfig(features="vq+rq", history_len=5, code_init=code_init, seed=0)
        tables = embedding_tables(build_train_model(cfg, build_schema(cfg, data.users.n_rows, items), items))
        rq = sum(tables[f"rq_l{l}"].detach().numpy()[items.rq[1:, l]] for l in range(2))  # (N, D) per item
        vq = tables["vq"].detach().numpy()[items.vq[1:]].mean(1)  # the VQ bag, mean-pooled
        out = []
        for v in (rq, vq):
            v = v / np.linalg.norm(v, axis=1, keepdims=True)
            out.append(np.corrcoef((v @ v.T)[np.triu_indices(len(v), 1)], cos)[0, 1])
        return out

    # before any training step, content-initialised codes already rank item pairs like the frozen vectors do
    assert min(item_vector_similarity("content")) > 0.8
    assert max(np.abs(item_vector_similarity("random"))) < 0.5  # only items sharing whole codes agree


def test_content_init_without_codebooks_keeps_random_rows_and_says_so(world):
    from ranker.features import ItemFeatures

    w, data = world
    items = ItemFeatures.build(w.item_ids, code_item_ids=w.item_ids, rq=w.rq, vq=w.vq,
                               rq_sizes=[len(b) for b in w.codebooks])  # codes without codebooks or vectors
    cfg = RankerConfig(features="vq+rq", history_len=5, code_init="content")
    model = build_train_model(cfg, build_schema(cfg, data.users.n_rows, items), items)
    assert set(model.content_init["random"]) == {"rq_l0", "rq_l1", "vq"} and model.content_init["content"] == {}
    assert "no codebooks" in model.content_init["random"]["rq_l0"]
    rand = build_train_model(RankerConfig.from_dict({**cfg.to_dict(), "code_init": "random"}),
                             build_schema(cfg, data.users.n_rows, items), items)
    assert rand.content_init is None
    assert torch.equal(embedding_tables(rand)["rq_l0"], embedding_tables(model)["rq_l0"])
