"""`qarm align --target user-prompts` end to end on a tiny generic dataset and a store published here (issue 22):
user_embeddings.parquet in --out and in a child version with the parent's protocol; a wrong protocol is refused."""
import json

import numpy as np
import pytest

from feature_store import FeatureStore
from feature_store.split import SplitConfig, protocol_record
from feature_store.tables import read_embeddings, write_embeddings
from oracle_world import oracle_world, write_world_files
from pipelines.cli import main as qarm_main
from pipelines.encoder import EncoderConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("user_prompts")
    w = oracle_world(n_items=80, n_users=40, n_events=1600, seed=5)
    items, inter = write_world_files(w, tmp / "data")
    return w, items, inter


def _store(tmp_path, w, split):
    store = FeatureStore(tmp_path / "store")
    with store.stage() as st:
        write_embeddings(st.path / "item_embeddings.parquet", w.item_ids, w.embeddings)
        v = st.publish(config={"encoder": EncoderConfig.named("tiny", embed_dim=w.embeddings.shape[1]).to_dict()},
                       extra={"protocol": protocol_record(w.interactions, split)})
    return tmp_path / "store", v.id


def _args(items, inter, store, out, *extra):
    return ["align", "--target", "user-prompts", "--dataset", "generic", "--items", str(items),
            "--interactions", str(inter), "--store", str(store), "--split", "user_last_frac", "--out", str(out),
            "--user-prompt-epochs", "1", "--user-prompt-batch-size", "16", "--user-prompt-token-budget", "28",
            "--torch-threads", "1", *extra, "--json"]


@pytest.mark.slow
def test_user_prompts_job_publishes_user_embeddings(world, tmp_path, capsys):
    w, items, inter = world
    store, parent = _store(tmp_path, w, SplitConfig("user_last_frac"))
    code = qarm_main(_args(items, inter, store, tmp_path / "out"))
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, out
    v = FeatureStore(store).read()
    assert v.id == out["version"] and v.parent == parent
    assert v.manifest["protocol"] == FeatureStore(store).read(parent).manifest["protocol"]
    users, vecs = read_embeddings(v.file("user_embeddings.parquet"), id_column="user_id")
    assert len(users) == out["users_written"] > 0 and vecs.shape[1] == w.embeddings.shape[1]
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert v.has("item_embeddings.parquet")
    rows = out["retrieval"]
    assert set(rows) == {"prompt-user", "history-pool"}
    assert rows["prompt-user"]["n_users"] == rows["history-pool"]["n_users"] > 0
    assert out["alignment"]["judge"] == "valid_next_item" and out["encode_seconds_per_1k_users"] > 0
    if not out["alignment"]["kept"]:  # step 0 shipped: prompt-user is history pooling exactly
        assert rows["prompt-user"]["recall@20"] == rows["history-pool"]["recall@20"]
    _check_asof_table(w, v, tmp_path / "out", users, vecs, out)


def _check_asof_table(w, v, out_dir, users, vecs, report):
    """user_embeddings_asof.parquet: in --out and in the version (listed with sha256 / rows); per user, K cuts
    spread evenly over its distinct train-positive times that have an earlier one, then its end (last ts + 1);
    the end rows are user_embeddings.parquet's vectors."""
    from feature_store.io import sha256_file
    from feature_store.tables import read_asof_embeddings
    from pipelines.encoder.user_encoder import UserEncoderConfig, positive_windows

    k = UserEncoderConfig().asof_cuts
    train, _ = positive_windows(w.interactions, SplitConfig("user_last_frac"))
    want = []
    for u, ts in train.groupby("user_id")["ts"]:
        times = sorted(set(int(t) for t in ts))
        later = times[1:]
        spread = later if k >= len(later) else [later[i * len(later) // k] for i in range(k)]
        want += [(int(u), t) for t in spread] + [(int(u), times[-1] + 1)]
    a_users, a_cuts, a_vecs = read_asof_embeddings(v.file("user_embeddings_asof.parquet"))
    assert list(zip(a_users.tolist(), a_cuts.tolist())) == sorted(want)
    assert a_vecs.shape[1] == vecs.shape[1]
    last = np.r_[a_users[1:] != a_users[:-1], True]                  # each user's last (train-end) row
    assert a_users[last].tolist() == users.tolist()
    np.testing.assert_array_equal(a_vecs[last], vecs)
    m = v.manifest
    assert m["files"]["user_embeddings_asof.parquet"]["sha256"] == sha256_file(v.file("user_embeddings_asof.parquet"))
    assert m["rows"]["user_embeddings_asof.parquet"] == len(want) == report["asof"]["rows"]
    o_users, o_cuts, o_vecs = read_asof_embeddings(out_dir / "user_embeddings_asof.parquet")
    assert o_users.tolist() == a_users.tolist() and np.array_equal(o_vecs, a_vecs)


def test_user_prompts_job_refuses_another_protocol(world, tmp_path, capsys):
    w, items, inter = world
    store, _ = _store(tmp_path, w, SplitConfig("global"))
    code = qarm_main(_args(items, inter, store, tmp_path / "out", "--no-publish"))
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and "protocol" in out["error"]


def test_ablation_reports_the_prompt_row_against_vq_rq():
    from pipelines.jobs.ablation import _add_off_on
    from ranker.stats import BootstrapConfig, PairedEvaluation, summarize_runs

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40), 10)
    labels = (rng.random(len(users)) < 0.3).astype(np.float32)

    def run(scores):
        return {"test": {"auc": 0.5, "gauc": 0.5, "logloss": 0.7, "n": len(labels)}, "best_epoch": 1,
                "test_scores": scores}

    noisy = [rng.random(len(labels)) for _ in range(2)]
    runs = {"vq+rq": [run(s) for s in noisy],
            "vq+rq+prompt": [run(s + 2.0 * labels) for s in noisy]}   # the feature separates the classes better
    ev = PairedEvaluation(users, labels, BootstrapConfig(replicates=200))
    summary = summarize_runs(runs, baseline="id", evaluation=ev)
    _add_off_on(summary, runs, ev)
    off_on = summary["vq+rq+prompt"]["vs_vq+rq"]
    assert off_on["auc_diff"] > 0 and off_on["auc_diff_ci95"][0] > 0
    assert "vs_vq+rq" not in summary["vq+rq"]
