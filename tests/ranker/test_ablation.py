import json
from types import SimpleNamespace

import pandas as pd
import pytest

from pipelines.cli import main as qarm_main
from ranker.ablation import markdown_table, run_ablation, summarize_runs
from ranker.config import RankerConfig
from ranker.toy import publish_toy_version, toy_world, write_toy_files


def test_summary_is_paired_by_seed():
    runs = {"id": [{"test": {"auc": 0.70, "gauc": 0.6, "logloss": 0.5}, "best_epoch": 1},
                   {"test": {"auc": 0.72, "gauc": 0.62, "logloss": 0.5}, "best_epoch": 2}],
            "rq": [{"test": {"auc": 0.71, "gauc": 0.6, "logloss": 0.4}, "best_epoch": 1},
                   {"test": {"auc": 0.74, "gauc": 0.64, "logloss": 0.4}, "best_epoch": 1}]}
    rows = summarize_runs(runs)
    assert rows["id"]["auc_mean"] == pytest.approx(0.71)
    assert rows["id"]["auc_std"] == pytest.approx(0.0141421, rel=1e-4)  # sample std of (0.70, 0.72)
    assert rows["rq"]["delta_auc_pt_mean"] == pytest.approx(1.5)  # (1 + 2) / 2 points
    assert rows["rq"]["delta_auc_pt_std"] == pytest.approx(0.7071068, rel=1e-4)
    runs["id"][0]["test_by_popularity"] = {"<5": {"auc": 0.5, "n": 4}, ">=20": {"auc": 0.9, "n": 6}}
    runs["id"][1]["test_by_popularity"] = {"<5": {"auc": 0.7, "n": 4}, ">=20": {"auc": 0.8, "n": 6}}
    rows = summarize_runs(runs)
    assert rows["id"]["auc_by_popularity"]["<5"]["auc_mean"] == pytest.approx(0.6)
    assert "| id | 0.6000 | 0.8500 |" in markdown_table(rows)
    md = markdown_table(rows)
    assert "| rq |" in md and "+1.50 ± 0.71" in md and "+0.10" in md


@pytest.mark.slow
def test_run_ablation_on_a_toy_store(tmp_path):
    world = toy_world(n_items=400, n_users=100, n_events=5000, seed=2)
    publish_toy_version(world, tmp_path / "store")
    dataset = SimpleNamespace(items=pd.DataFrame({"item_id": world.item_ids}), interactions=world.interactions,
                              name="toy")
    cfg = RankerConfig(history_len=8, epochs=3, batch_size=256, patience=0)
    report = run_ablation(tmp_path / "store", dataset, seeds=2, out_dir=tmp_path / "out", base_cfg=cfg,
                          progress=False)
    rows = report["rows"]
    assert set(rows) == {"id", "frozen", "vq", "rq", "vq+rq", "vq+rq-unaligned"}
    for row in rows.values():
        assert {"auc_mean", "auc_std", "gauc_mean", "gauc_std"} <= set(row) and row["seeds"] == 2
    assert rows["vq+rq"]["auc_mean"] > rows["id"]["auc_mean"] + 0.05
    assert rows["vq+rq"]["auc_mean"] > rows["vq+rq-unaligned"]["auc_mean"] + 0.05
    assert set(rows["id"]["auc_by_popularity"]) <= {"<5", "5-19", ">=20"}
    saved = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert saved["rows"]["rq"]["auc_mean"] == pytest.approx(rows["rq"]["auc_mean"])
    assert (tmp_path / "out" / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert "vq+rq-unaligned" in (tmp_path / "out" / "ablation.md").read_text()


def test_train_ranker_cli_on_generic_data(tmp_path, capsys):
    world = toy_world(n_items=150, n_users=40, n_events=1500, seed=4)
    items, inter = write_toy_files(world, tmp_path / "data")
    publish_toy_version(world, tmp_path / "store")
    code = qarm_main(["train-ranker", "--dataset", "generic", "--items", str(items), "--interactions", str(inter),
                      "--store", str(tmp_path / "store"), "--features", "rq", "--history-len", "4", "--epochs", "1",
                      "--batch-size", "128", "--out", str(tmp_path / "run"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ok"] and result["features"] == "rq" and 0.0 <= result["test"]["auc"] <= 1.0
    assert (tmp_path / "run" / "ranker.pt").exists()
    # a store without the unaligned table: the row fails with a message naming the table
    code = qarm_main(["train-ranker", "--dataset", "generic", "--items", str(items), "--interactions", str(inter),
                      "--store", str(tmp_path / "nostore"), "--features", "rq", "--json"])
    assert code == 1


def test_eval_cli_reads_a_data_spec_and_reports_rows(tmp_path, capsys):
    world = toy_world(n_items=150, n_users=40, n_events=1500, seed=5)
    items, inter = write_toy_files(world, tmp_path / "data")
    publish_toy_version(world, tmp_path / "store")
    code = qarm_main(["eval", "--dataset", "generic", "--items", str(items), "--interactions", str(inter),
                      "--store", str(tmp_path / "store"), "--rows", "id,rq", "--seeds", "1", "--history-len", "4",
                      "--epochs", "1", "--batch-size", "256", "--out", str(tmp_path / "ev"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["rows"]) == {"id", "rq"} and result["rows"]["rq"]["seeds"] == 1
    assert (tmp_path / "ev" / "ablation.md").exists()
    code = qarm_main(["eval", "--dataset", "generic", "--items", str(items), "--interactions", str(inter),
                      "--store", str(tmp_path / "store"), "--rows", "id,bogus", "--json"])
    assert code == 1
