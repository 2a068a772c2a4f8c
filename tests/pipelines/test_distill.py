"""`qarm distill` and `qarm retrieve` end to end on a tiny generic dataset and a store published here, and the
torchrun-able `python -m ranker.retrieval.train` entry on contract Parquet tables."""
import json

import numpy as np
import pandas as pd
import pytest

from feature_store import FeatureStore
from feature_store.tables import write_codes, write_embeddings
from pipelines.cli import main as qarm_main
from feature_store.split import SplitConfig, behaviour_free_protocol, protocol_record
from oracle_world import oracle_world, write_world_files

FAST = ["--epochs", "2", "--dim", "16", "--tower-hidden", "16", "--negatives", "32", "--batch-size", "256",
        "--kd-topk", "10", "--kd-samples", "10", "--bootstrap", "200"]


def _store(tmp_path, world, protocol=None):
    rng = np.random.default_rng(0)
    ids, emb = world.item_ids, world.embeddings
    store = FeatureStore(tmp_path / "store")
    with store.stage() as st:
        write_embeddings(st.path / "item_embeddings.parquet", ids, emb)
        write_embeddings(st.path / "item_embeddings_text.parquet", ids, emb @ rng.standard_normal((emb.shape[1], 12)).astype(np.float32))
        write_embeddings(st.path / "item_embeddings_image.parquet", ids[::2], rng.standard_normal((len(ids[::2]), 6)).astype(np.float32))
        write_codes(st.path / "item_codes.parquet", ids, world.rq.astype(np.int32))
        # oracle tables learned nothing from interactions unless a test says which split they came from
        record = protocol_record(world.interactions, protocol) if protocol else behaviour_free_protocol("oracle")
        v = st.publish(config={"test": True}, extra={"protocol": record})
    return tmp_path / "store", v.id


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    world = oracle_world(n_items=200, n_users=60, n_events=4000, seed=3)
    items, inter = write_world_files(world, tmp / "data")
    return tmp, world, items, inter


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_distill_cli_writes_report(world_files, tmp_path, capsys):
    _, world, items, inter = world_files
    store, vid = _store(tmp_path, world, protocol=SplitConfig("global", 0.1, 0.1))
    code = qarm_main(["distill", "--dataset", "generic", "--items", str(items), "--interactions", str(inter),
                      "--store", str(store), "--seeds", "2", "--out", str(tmp_path / "out"), *FAST, "--json"])
    out = _last_json(capsys)
    assert code == 0, out
    rows = out["rows"]
    assert list(rows) == ["student", "student+codes", "student+listwise", "student+modality", "student+prompt",
                          "student+all", "teacher"]
    for name, r in rows.items():
        for key in ("recall@20_mean", "recall@20_std", "ndcg@20_mean", "ndcg@20_std", "params",
                    "serve_ms_per_1k_users", "recall@20_diff_ci95", "ndcg@20_diff_ci95"):
            assert key in r, (name, key)
        assert len(r["recall@20_per_seed"]) == 2
        lo, hi = r["recall@20_diff_ci95"]
        assert lo <= r["recall@20_diff_mean"] <= hi
    assert rows["student"]["recall@20_diff_ci95"] == [0.0, 0.0]
    # the student reads only its own tables: fewer parameters than the teacher, no multimodal input
    assert rows["student"]["params"] == (out["data"]["users"] + out["data"]["items"]) * 16
    assert rows["teacher"]["params"] > rows["student"]["params"]
    assert rows["student"]["multimodal_input_bytes"] == 0 < rows["teacher"]["multimodal_input_bytes"]
    assert out["modalities"] == {"aligned": 8, "text": 12, "image": 6}
    for f in ("json", "md", "png"):
        assert (tmp_path / "out" / f"distill.{f}").stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert saved["rows"]["teacher"]["recall@20_mean"] == rows["teacher"]["recall@20_mean"]
    assert "| student+all |" in (tmp_path / "out" / "distill.md").read_text()


def test_distill_refuses_another_protocol(world_files, tmp_path, capsys):
    _, world, items, inter = world_files
    store, _ = _store(tmp_path, world, protocol=SplitConfig("user_last_n", n_valid=1, n_test=1))
    args = ["distill", "--dataset", "generic", "--items", str(items), "--interactions", str(inter),
            "--store", str(store), "--seeds", "1", "--rows", "student", "--out", str(tmp_path / "out"), *FAST, "--json"]
    assert qarm_main(args) == 1
    err = _last_json(capsys)["error"]
    assert "user_last_n" in err and "global" in err
    assert qarm_main(args + ["--allow-protocol-mismatch"]) == 0


def test_retrieve_cli_writes_candidates(world_files, tmp_path, capsys):
    _, world, items, inter = world_files
    store, vid = _store(tmp_path, world)
    out_file = tmp_path / "cands" / "test.parquet"
    code = qarm_main(["retrieve", "--dataset", "generic", "--items", str(items), "--interactions", str(inter),
                      "--store", str(store), "--k", "15", "--kd", "listwise", "--out", str(out_file),
                      "--save-model", str(tmp_path / "model"), *[a for a in FAST if a != "--bootstrap" and a != "200"],
                      "--json"])
    res = _last_json(capsys)
    assert code == 0, res
    df = pd.read_parquet(out_file)
    assert list(df.columns) == ["user_id", "item_id", "rank", "score"]
    per_user = df.groupby("user_id").size()
    assert (per_user == 15).all() and res["users"] == len(per_user)
    assert df.groupby("user_id")["rank"].apply(lambda r: list(r) == list(range(1, 16))).all()
    assert (df.groupby("user_id")["score"].apply(lambda s: s.is_monotonic_decreasing)).all()
    # training positives are never candidates
    from feature_store.split import SplitConfig, split_labels

    it = world.interactions
    train = it[(split_labels(it, SplitConfig()) == 0) & (it["label"] > 0.5)]
    seen = set(zip(train["user_id"], train["item_id"]))
    assert not any((u, i) in seen for u, i in zip(df["user_id"], df["item_id"]))
    assert not [p for p in out_file.parent.iterdir() if p.name not in ("test.parquet", "test.parquet.json")]
    meta = json.loads(out_file.with_suffix(".parquet.json").read_text())
    assert meta["store_version"] == vid and meta["config"]["distill"]["listwise"] is True
    assert (tmp_path / "model" / "student.safetensors").exists()


def test_train_entry_on_contract_parquet(world_files, tmp_path):
    from ranker.retrieval.train import main

    _, world, _, _ = world_files
    store, _ = _store(tmp_path, world)
    world.interactions.to_parquet(tmp_path / "inter.parquet")
    args = ["--interactions", str(tmp_path / "inter.parquet"), "--store", str(store), "--kd", "modality",
            "--out", str(tmp_path / "run"), "--epochs", "2", "--dim", "8", "--tower-hidden", "8",
            "--negatives", "16", "--kd-topk", "5", "--kd-samples", "5"]
    assert main(args) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["config"]["distill"]["modality"] is True and result["data"]["items"] == len(world.item_ids)
    bad = world.interactions.drop(columns=["ts"])
    bad.to_parquet(tmp_path / "bad.parquet")
    assert main(["--interactions", str(tmp_path / "bad.parquet"), *args[2:]]) == 1


@pytest.mark.slow
def test_train_entry_under_torchrun(world_files, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, world, _, _ = world_files
    store, _ = _store(tmp_path, world)
    world.interactions.to_parquet(tmp_path / "inter.parquet")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "ranker.retrieval.train",
           "--interactions", str(tmp_path / "inter.parquet"), "--store", str(store), "--kd", "listwise",
           "--epochs", "2", "--dim", "8", "--tower-hidden", "8", "--negatives", "16", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["world_size"] == 2 and result["test"]["recall@20"] is not None
