import json

import numpy as np
import pytest

from pipelines.cli import main as qarm_main
from oracle_world import oracle_world, publish_world_version, write_world_files
from ranker.data import random_codes_like
from ranker.metrics import auc, gauc
from ranker.report import markdown_table
from ranker.stats import BootstrapConfig, PairedEvaluation, summarize_runs


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
    assert rows["rq"]["delta_gauc_pt_mean"] == pytest.approx(1.0)  # (0 + 2) / 2
    runs["id"][0]["test_by_popularity"] = {"<5": {"auc": 0.5, "n": 4}, ">=20": {"auc": 0.9, "n": 6}}
    runs["id"][1]["test_by_popularity"] = {"<5": {"auc": 0.7, "n": 4}, ">=20": {"auc": 0.8, "n": 6}}
    rows = summarize_runs(runs)
    assert rows["id"]["auc_by_popularity"]["<5"]["auc_mean"] == pytest.approx(0.6)
    md = markdown_table(rows)
    assert "| id | 0.6000 | 0.8500 |" in md and "| rq |" in md and "+0.10" in md


def test_pairs_map_every_run_to_its_baseline_seed():
    base = [{"test": {"auc": a, "gauc": a, "logloss": 0.5}, "best_epoch": 0} for a in (0.60, 0.70)]
    row = [{"test": {"auc": a, "gauc": a, "logloss": 0.5}, "best_epoch": 0} for a in (0.61, 0.72, 0.63, 0.74)]
    rows = summarize_runs({"id": base, "vq": row}, pairs={"vq": [0, 1, 0, 1]})  # 2 cascades x 2 model seeds
    assert rows["vq"]["delta_auc_pt_mean"] == pytest.approx(np.mean([1, 2, 3, 4]))


def test_weighted_auc_with_unit_weights_is_the_plain_auc_and_gauc():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, 600)
    labels = (rng.random(600) < 0.4).astype(float)
    scores = labels * 0.5 + rng.standard_normal(600)
    scores[:50] = np.round(scores[:50])  # ties count one half in both
    ev = PairedEvaluation(users, labels, BootstrapConfig(replicates=50))
    ones = np.ones(len(ev.unique_users))
    from ranker.stats import _metric_at

    assert _metric_at(ev, scores, "auc", ones) == pytest.approx(auc(labels, scores), abs=1e-12)
    assert _metric_at(ev, scores, "gauc", ones) == pytest.approx(gauc(users, labels, scores), abs=1e-12)
    # doubling one user's weight = duplicating its events
    w = ones.copy()
    w[3] = 2.0
    dup = users == ev.unique_users[3]
    assert _metric_at(ev, scores, "auc", w) == pytest.approx(
        auc(np.r_[labels, labels[dup]], np.r_[scores, scores[dup]]), abs=1e-12)


def test_bootstrap_interval_separates_a_real_gain_from_none():
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(200), 10)
    labels = (rng.random(2000) < 0.5).astype(float)
    noise = [rng.standard_normal(2000) for _ in range(3)]
    weak = [labels * 0.3 + n for n in noise]
    strong = [labels * 1.0 + n for n in noise]
    ev = PairedEvaluation(users, labels, BootstrapConfig(replicates=300, seed=0))
    gain = ev.diff_ci(strong, weak, "gauc")
    assert gain["ci95"][0] > 0 and gain["ci95"][0] <= gain["mean"] <= gain["ci95"][1]
    same = ev.diff_ci(weak, weak, "auc")
    assert same["mean"] == 0.0 and same["ci95"] == [0.0, 0.0]
    reverse = ev.diff_ci(weak, strong, "auc")
    assert reverse["ci95"][1] < 0


def test_random_codes_keep_the_shapes_and_lose_the_content():
    world = oracle_world(n_items=120, n_users=30, n_events=600, seed=3)
    real = world.item_features()
    rand = random_codes_like(real, world.item_ids, seed=0)
    assert rand.rq_sizes == real.rq_sizes and rand.vq.shape == real.vq.shape
    assert np.array_equal(rand.has_codes, real.has_codes)
    assert (rand.rq[1:, 0] == real.rq[1:, 0]).mean() < 0.5  # level 0 of the real codes is the cluster
    assert np.array_equal(random_codes_like(real, world.item_ids, seed=0).rq, rand.rq)
    # --code-init codebook starts the random control's rows from the same centroids (only the assignment is random)
    assert all(np.array_equal(a, b) for a, b in zip(rand.codebooks, real.codebooks))


@pytest.mark.slow
def test_eval_on_an_oracle_store_reports_every_row_with_intervals(tmp_path, capsys):
    world = oracle_world(n_items=400, n_users=100, n_events=6000, seed=2)
    items, inter = write_world_files(world, tmp_path / "data")
    publish_world_version(world, tmp_path / "store")
    code = qarm_main(["eval", "--dataset", "generic", "--items", str(items), "--interactions", str(inter),
                      "--store", str(tmp_path / "store"), "--seeds", "2", "--history-len", "8", "--epochs", "3",
                      "--batch-size", "256", "--patience", "0", "--bootstrap", "200", "--out", str(tmp_path / "ev"),
                      "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = result["rows"]
    assert set(rows) == {"id", "frozen", "frozen+sim", "vq", "rq", "vq+rq", "vq+rq+cross", "vq+rq+frozen", "random",
                         "vq+rq-unaligned"}
    assert rows["vq+rq"]["runs"] == 2
    # oracle codes carry the clusters: their gain over ids is real, random codes of the same shapes gain less
    assert rows["vq+rq"]["gauc_diff_ci95"][0] > 0
    assert rows["vq+rq"]["gauc_mean"] > rows["random"]["gauc_mean"] + 0.02
    assert rows["vq+rq"]["auc_mean"] > rows["vq+rq-unaligned"]["auc_mean"] + 0.02
    saved = json.loads((tmp_path / "ev" / "ablation.json").read_text())
    assert saved["rows"]["rq"]["auc_diff_ci95"] == rows["rq"]["auc_diff_ci95"]
    assert (tmp_path / "ev" / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "ev" / "ablation.md").read_text()
    assert "ΔGAUC vs ids [95% CI]" in md and "**↑**" in md


def test_train_ranker_cli_on_generic_data(tmp_path, capsys):
    world = oracle_world(n_items=150, n_users=40, n_events=1500, seed=4)
    items, inter = write_world_files(world, tmp_path / "data")
    publish_world_version(world, tmp_path / "store")
    code = qarm_main(["train-ranker", "--dataset", "generic", "--items", str(items), "--interactions", str(inter),
                      "--store", str(tmp_path / "store"), "--features", "rq", "--history-len", "4", "--epochs", "1",
                      "--batch-size", "128", "--out", str(tmp_path / "run"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ok"] and result["features"] == "rq" and result["protocol_problems"] == []
    assert (tmp_path / "run" / "ranker.pt").exists()
    code = qarm_main(["train-ranker", "--dataset", "generic", "--items", str(items), "--interactions", str(inter),
                      "--store", str(tmp_path / "nostore"), "--features", "rq", "--json"])
    assert code == 1


def test_eval_cli_rejects_unknown_rows(tmp_path, capsys):
    world = oracle_world(n_items=150, n_users=40, n_events=1500, seed=5)
    items, inter = write_world_files(world, tmp_path / "data")
    publish_world_version(world, tmp_path / "store")
    code = qarm_main(["eval", "--dataset", "generic", "--items", str(items), "--interactions", str(inter),
                      "--store", str(tmp_path / "store"), "--rows", "id,bogus", "--json"])
    assert code == 1
    assert "bogus" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]


@pytest.mark.slow
def test_eval_re_ranks_retrieved_candidates_into_the_cascade(tmp_path, capsys):
    world = oracle_world(n_items=300, n_users=80, n_events=8000, seed=6)
    items, inter = write_world_files(world, tmp_path / "data")
    publish_world_version(world, tmp_path / "store")
    data = ["--dataset", "generic", "--items", str(items), "--interactions", str(inter)]
    code = qarm_main(["retrieve", *data, "--store", str(tmp_path / "store"), "--k", "50", "--kd", "none",
                      "--epochs", "2", "--out", str(tmp_path / "cands.parquet"), "--json"])
    assert code == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    code = qarm_main(["eval", *data, "--store", str(tmp_path / "store"), "--rows", "id,vq+rq", "--seeds", "1",
                      "--history-len", "8", "--epochs", "3", "--batch-size", "256", "--bootstrap", "50",
                      "--rerank-candidates", str(tmp_path / "cands.parquet"), "--rerank-k", "10",
                      "--out", str(tmp_path / "ev"), "--json"])
    assert code == 0
    cascade = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cascade"]
    assert cascade["k"] == 10 and cascade["candidates_per_user"] == 50 and cascade["users"] > 10
    assert set(cascade["rows"]) == {"id", "vq+rq"} and "recall@10" in cascade["retrieval"]
    # the ranker whose codes carry the clusters orders the same candidates better than the ids-only one
    assert cascade["rows"]["vq+rq"]["ndcg@10_mean"] > cascade["rows"]["id"]["ndcg@10_mean"]
    assert "retrieval alone" in (tmp_path / "ev" / "ablation.md").read_text()


def test_undefined_gauc_is_null_in_json_and_na_in_markdown():
    from feature_store.io import dumps_strict
    from ranker.metrics import ranking_metrics

    rng = np.random.default_rng(0)
    users = np.arange(40)  # one test event per user (user_last_n on an explicit log): GAUC has no user to average
    labels = (np.arange(40) % 2).astype(float)
    runs = {}
    for row, signal in (("id", 0.2), ("vq+rq", 1.0)):
        runs[row] = []
        for seed in range(2):
            scores = labels * signal + rng.standard_normal(40)
            runs[row].append({"test": ranking_metrics(users, labels, scores), "best_epoch": 0, "test_scores": scores})
    ev = PairedEvaluation(users, labels, BootstrapConfig(replicates=50))
    rows = summarize_runs(runs, evaluation=ev)
    row = rows["vq+rq"]
    assert row["gauc_mean"] is None and row["gauc_std"] is None and row["gauc_diff_ci95"] is None
    assert row["gauc_diff"] is None and row["delta_gauc_pt_mean"] is None
    assert "no user has both" in row["undefined"]["gauc"] and "no user has both" in row["undefined"]["gauc_diff_ci95"]
    assert row["auc_mean"] is not None and len(row["auc_diff_ci95"]) == 2  # AUC is defined and keeps its interval
    saved = json.loads(dumps_strict(rows))
    assert saved["vq+rq"]["gauc_diff_ci95"] is None and saved["id"]["gauc_mean"] is None
    md = markdown_table(rows)
    assert "nan" not in md and "[+0.0000, +0.0000]" not in md
    line = next(l for l in md.splitlines() if l.startswith("| vq+rq |"))
    cells = [c.strip() for c in line.split("|")]
    assert cells[4] == "n/a" and cells[7] == "n/a" and cells[3] != "n/a"  # GAUC, ΔGAUC n/a; AUC a number
    assert "n/a: gauc is undefined here: no user has both" in md


def test_bootstrap_of_a_one_class_window_is_undefined_not_zero():
    users = np.repeat(np.arange(10), 3)
    labels = np.ones(30)
    ev = PairedEvaluation(users, labels, BootstrapConfig(replicates=20))
    out = ev.diff_ci([np.arange(30.0)], [np.zeros(30)], "auc")
    assert out["ci95"] is None and out["mean"] is None and "only one class" in out["undefined"]
    empty = PairedEvaluation(users[:0], labels[:0], BootstrapConfig(replicates=20))
    assert empty.diff_ci([np.zeros(0)], [np.zeros(0)], "gauc")["undefined"] == "no test users to resample"
