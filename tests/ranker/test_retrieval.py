"""Retrieval models and distillation: data on the protocol split, the protocol guard, soft prompts, and the
distilled student beating the plain student on the synthetic default."""
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from feature_store import FeatureStore
from feature_store.split import SplitConfig
from feature_store.tables import write_codes, write_embeddings
from ranker.retrieval.config import DistillConfig, RetrievalConfig
from feature_store.split import ProtocolMismatchError, check_protocol, protocol_record
from ranker.retrieval.data import load_item_features, prepare_retrieval_data
from ranker.retrieval.fit import evaluate, fit_student, fit_teacher, student_item_vectors
from ranker.retrieval.models import TeacherArch


def content_features(items: pd.DataFrame, image_path=None, dim: int = 128) -> dict:
    """Per-modality content features a test can build in a second: hashed bag of words of title + text, and a
    4x4 colour thumbnail of the image (no latent cluster id anywhere)."""
    n = len(items)
    text = np.zeros((n, dim), np.float32)
    for r, (title, body) in enumerate(zip(items["title"].fillna(""), items["text"].fillna(""))):
        for w in f"{title} {body}".lower().replace(".", " ").split():
            text[r, zlib.crc32(w.encode()) % dim] += 1.0
    text /= np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-6)
    out = {"text": text}
    if image_path is not None:
        from PIL import Image

        thumbs = [np.asarray(Image.open(image_path(u)).convert("RGB").resize((4, 4)), np.float32).ravel() / 255.0
                  for u in items["image_uri"]]
        out["image"] = np.stack(thumbs)
    return out


def publish(store_root, item_ids, feats: dict, protocol=None, codes=None) -> str:
    store = FeatureStore(store_root)
    with store.stage() as st:
        names = {"aligned": "item_embeddings", "text": "item_embeddings_text", "image": "item_embeddings_image"}
        for m, x in feats.items():
            write_embeddings(st.path / f"{names[m]}.parquet", item_ids, x)
        if codes is not None:
            write_codes(st.path / "item_codes.parquet", item_ids, codes.astype(np.int32))
        v = st.publish(config={"test": True}, extra={"protocol": protocol} if protocol else None)
    return v.id


def tiny_world(n_users=80, n_items=120, n_clusters=4, events=40, seed=0):
    """Users like one cluster; positives are items of it. Content = noisy cluster centroid."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, n_clusters, n_items)
    liked = rng.integers(0, n_clusters, n_users)
    rows = []
    for u in range(n_users):
        pool = np.flatnonzero(cluster == liked[u])
        for t, i in enumerate(rng.choice(pool, min(events, len(pool)), replace=False)):
            rows.append((u + 10, i + 500, 1_600_000_000 + int(rng.integers(0, 10**6)), 1.0))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "label"])
    centroids = rng.standard_normal((n_clusters, 16)).astype(np.float32)
    feats = {"aligned": centroids[cluster] + 0.3 * rng.standard_normal((n_items, 16)).astype(np.float32),
             "text": centroids[cluster] @ rng.standard_normal((16, 24)).astype(np.float32)}
    return inter, np.arange(n_items, dtype=np.int64) + 500, feats


def test_data_follows_the_protocol_split():
    inter, items, _ = tiny_world()
    split = SplitConfig("global", valid_frac=0.1, test_frac=0.2)
    data = prepare_retrieval_data(inter, items, split)
    assert sum(len(p) for p in data.pairs.values()) == len(inter)
    ts = inter.set_index(["user_id", "item_id"])["ts"]
    max_train = max(ts[(data.user_ids[u], data.item_ids[i])] for u, i in data.pairs["train"])
    min_test = min(ts[(data.user_ids[u], data.item_ids[i])] for u, i in data.pairs["test"])
    assert max_train <= min_test
    users, targets = data.eval_users("test")
    train = data.positives("train")
    assert all(train[u] and not (t & train[u]) for u, t in zip(users, targets))


def test_protocol_guard(tmp_path):
    inter, items, feats = tiny_world()
    vid = publish(tmp_path / "s", items, feats, protocol=protocol_record(inter, SplitConfig("user_last_n")))
    version = FeatureStore(tmp_path / "s").read(vid)
    with pytest.raises(ProtocolMismatchError, match="user_last_n") as exc:
        check_protocol(version.manifest["protocol"], inter, SplitConfig("global"), version.id)
    assert "global(" in str(exc.value) and "--allow-protocol-mismatch" in str(exc.value)
    assert check_protocol(version.manifest["protocol"], inter, SplitConfig("user_last_n"), version.id) == []
    assert load_item_features(version, items).names == ["aligned", "text"]


def test_features_align_to_catalog_and_missing_rows_are_zero(tmp_path):
    inter, items, feats = tiny_world()
    half = {"aligned": feats["aligned"]}
    store = FeatureStore(tmp_path / "s")
    with store.stage() as st:
        write_embeddings(st.path / "item_embeddings.parquet", items, half["aligned"])
        write_embeddings(st.path / "item_embeddings_image.parquet", items[::-2], feats["text"][::-2])
        v = st.publish()
    f = load_item_features(v, items)
    assert f.present["image"].sum() == len(items[::-2])
    assert np.array_equal(f.modalities["image"][-1], feats["text"][-1])       # reversed table order mapped back
    assert not f.modalities["image"][~f.present["image"]].any()
    assert f.codes is None


def _teacher(seed=0):
    inter, items, feats = tiny_world(seed=seed)
    data = prepare_retrieval_data(inter, items, SplitConfig("global", 0.1, 0.2))
    cfg = RetrievalConfig(dim=16, epochs=4, eval_every=2, tower_hidden=32, batch_size=256, negatives=32, seed=seed)
    fake = type("F", (), {"modalities": feats})()
    return data, cfg, fit_teacher(data, fake, cfg)


def test_prompts_change_teacher_output_while_frozen_weights_stay_bit_identical():
    data, cfg, teacher = _teacher()
    t = teacher.model
    before = {n: p.detach().clone() for n, p in t.frozen_parameters()}
    users, items = torch.arange(5), torch.randint(0, data.n_items, (5, 7))
    with torch.no_grad():
        base = t.score(users, items)
    res = fit_student(data, cfg, DistillConfig(prompt=True, topk=10, samples=10, prompt_lr=0.05), teacher=teacher)
    tuned = res.teacher
    assert all(torch.equal(p, before[n]) for n, p in tuned.frozen_parameters())          # frozen: bit-identical
    assert all(torch.equal(p, before[n]) for n, p in t.frozen_parameters())              # original untouched
    assert all(float(p.detach().abs().sum()) == 0.0 for p in t.prompt.parameters())             # original prompts zero
    assert any(float(p.detach().abs().sum()) > 0.0 for p in tuned.prompt.parameters())          # tuned prompts moved
    with torch.no_grad():
        after = tuned.score(users, items)
    assert not torch.allclose(after, base)                                               # and change the output
    # the student trains; the prompt's optimiser group never held a frozen teacher weight
    assert sum(p.requires_grad for _, p in tuned.frozen_parameters()) == 0


def test_prompt_changes_output_directly():
    t = TeacherArch(3, 4, {"text": np.eye(4, 6, dtype=np.float32)}, dim=5, hidden=7)
    u, i = torch.arange(3), torch.arange(4).repeat(3, 1)
    with torch.no_grad():
        s0 = t.score(u, i)
        t.prompt.prompts["text"].add_(0.5)
        s1 = t.score(u, i)
    assert not torch.allclose(s0, s1)


def test_student_item_similarity():
    data, cfg, teacher = _teacher()
    res = fit_student(data, cfg)
    ids, vec = student_item_vectors(res, data.item_ids)
    assert np.array_equal(ids, data.item_ids) and vec.shape == (data.n_items, cfg.dim)
    assert np.allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    # the serving path reads only the student's own tables: no buffer of multimodal input exists on it
    assert not any(n.startswith("x_") for n, _ in res.model.named_buffers())


def test_codes_student_needs_codes():
    inter, items, feats = tiny_world()
    data = prepare_retrieval_data(inter, items, SplitConfig("global", 0.1, 0.2))
    with pytest.raises(ValueError, match="item_codes"):
        fit_student(data, RetrievalConfig(use_codes=True, epochs=1))


@pytest.mark.slow
def test_distilled_student_beats_plain_student_on_synthetic_default(tmp_path):
    from pipelines.data import DataSpec, load_dataset

    ds = load_dataset(DataSpec())                                        # the synthetic default
    items = ds.items.sort_values("item_id")
    feats = content_features(items, lambda u: ds.image_path(u))
    split = SplitConfig("global")
    vid = publish(tmp_path / "s", items["item_id"].to_numpy(), feats, protocol=protocol_record(ds.interactions, split))
    data = prepare_retrieval_data(ds.interactions, items["item_id"].to_numpy(), split)
    f = load_item_features(FeatureStore(tmp_path / "s").read(vid), data.item_ids)
    plain, distilled = [], []
    for seed in (0, 1):
        cfg = RetrievalConfig(seed=seed)
        teacher = fit_teacher(data, f, cfg)
        plain.append(evaluate(fit_student(data, cfg).model, data, "test")["recall@20"])
        d = fit_student(data, cfg, DistillConfig(listwise=True, modality=True), teacher=teacher)
        distilled.append(evaluate(d.model, data, "test")["recall@20"])
    assert np.mean(distilled) > np.mean(plain), (plain, distilled)


def test_bpr_student_with_every_kd_part():
    data, cfg, teacher = _teacher()
    cfg = cfg.replace(loss="bpr", epochs=2)
    res = fit_student(data, cfg, DistillConfig(listwise=True, modality=True, prompt=True, topk=8, samples=8,
                                               kd_rows=16), teacher=teacher)
    assert res.config["loss"] == "bpr" and res.config["distill"]["prompt"] is True
    assert res.valid["recall@20"] is not None
