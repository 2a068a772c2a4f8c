"""Checkpointed stages resume after a crash; the gate rejects what it should."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pipelines.jobs.retrain.gate import GateConfig, check_gate
from pipelines.jobs.retrain.stages import DONE_MARKER, StageRunner


def test_completed_stage_is_resumed_not_rerun(tmp_path):
    calls = []

    def stage(out):
        calls.append(out)
        (out / "table.txt").write_text("rows")
        return {"rows": 1}

    assert StageRunner(tmp_path).run("pairs", {"since": 5}, stage) == {"rows": 1}
    runner = StageRunner(tmp_path)
    assert runner.run("pairs", {"since": 5}, stage) == {"rows": 1}
    assert len(calls) == 1
    assert runner.summary()[0]["resumed"] is True
    assert (tmp_path / "pairs" / "table.txt").read_text() == "rows"


def test_changed_inputs_recompute(tmp_path):
    calls = []
    StageRunner(tmp_path).run("embed", {"v": 1}, lambda out: calls.append(1) or {"v": 1})
    StageRunner(tmp_path).run("embed", {"v": 2}, lambda out: calls.append(2) or {"v": 2})
    assert calls == [1, 2]


def test_crash_mid_stage_leaves_nothing_trusted(tmp_path):
    # A child process dies (SIGKILL-like os._exit) inside the stage: no marker, partial folder swept on restart.
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(os.getcwd())!r})
        from pipelines.jobs.retrain.stages import StageRunner
        def stage(out):
            (out / "half.txt").write_text("half")
            os._exit(9)
        StageRunner({str(tmp_path)!r}).run("align", {{}}, stage)
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == 9
    assert not (tmp_path / "align" / DONE_MARKER).exists()
    assert list(tmp_path.glob("align.partial-*"))
    runner = StageRunner(tmp_path)
    assert not list(tmp_path.glob("align.partial-*"))
    assert runner.run("align", {}, lambda out: {"ok": True}) == {"ok": True}
    assert runner.summary()[0]["resumed"] is False


def test_gate_passes_a_healthy_candidate():
    cand = {"collision_rate": 0.1, "utilization": [0.9, 0.5], "recall@10_aligned": 0.30}
    assert check_gate(cand, {"recall@10_aligned": 0.32}, GateConfig()) == []


def test_gate_names_every_failed_threshold():
    cand = {"collision_rate": 0.9, "utilization": [0.9, 0.01], "recall@10_aligned": 0.10, "churn": 0.8}
    reasons = check_gate(cand, {"recall@10_aligned": 0.30}, GateConfig(max_churn=0.5))
    assert len(reasons) == 4
    assert any("collision_rate" in r for r in reasons)
    assert any("level 1" in r for r in reasons)
    assert any("recall@10" in r for r in reasons)
    assert any("churn" in r for r in reasons)


def test_gate_config_validates():
    with pytest.raises(ValueError, match="max_collision_rate"):
        GateConfig(max_collision_rate=2.0)


def test_gate_refuses_a_ranking_drop_beyond_the_tolerance_on_the_same_events():
    parent = {"auc": 0.800, "gauc": 0.700}
    within = {"auc": 0.796, "gauc": 0.695}
    assert check_gate(within, parent, GateConfig(max_auc_drop=0.005, max_gauc_drop=0.01)) == []
    beyond = {"auc": 0.790, "gauc": 0.695}
    reasons = check_gate(beyond, parent, GateConfig(max_auc_drop=0.005, max_gauc_drop=0.01))
    assert len(reasons) == 1 and "AUC 0.7900" in reasons[0] and "0.8000" in reasons[0]
    assert check_gate(beyond, parent, GateConfig(max_auc_drop=None, max_gauc_drop=None)) == []
    with pytest.raises(ValueError, match="max_auc_drop"):
        GateConfig(max_auc_drop=-0.1)


def test_encoder_refresh_is_counted_in_the_store_history():
    from types import SimpleNamespace

    from pipelines.jobs.retrain.job import RetrainConfig, refresh_due, versions_since_refresh

    chain = {"v0": SimpleNamespace(id="v0", parent=None, config={}),  # the cascade's first version
             "v1": SimpleNamespace(id="v1", parent="v0", config={"retrain": {"encoder_refreshed": False}}),
             "v2": SimpleNamespace(id="v2", parent="v1", config={"retrain": {"encoder_refreshed": False}})}
    store = SimpleNamespace(read=lambda vid, verify=False: chain[vid])
    assert versions_since_refresh(store, chain["v0"]) == 1
    assert versions_since_refresh(store, chain["v2"]) == 3
    assert refresh_due(RetrainConfig(refresh_encoder_every=3), 3)
    assert not refresh_due(RetrainConfig(refresh_encoder_every=3), 2)
    assert not refresh_due(RetrainConfig(refresh_encoder_every=0), 99)
    assert refresh_due(RetrainConfig(refresh_encoder_every=1), 1)
    assert refresh_due(RetrainConfig(refresh_encoder_every=0, warm_start=False), 1)


def test_ci_rule_refuses_only_when_the_whole_interval_is_below_the_tolerance():
    parent = {"auc": 0.80}
    noisy = {"auc": 0.78, "auc_diff_ci": [-0.06, 0.02]}  # observed drop 0.02, interval straddles zero
    assert check_gate(noisy, parent, GateConfig(max_auc_drop=0.005, max_gauc_drop=None, ranking_rule="ci")) == []
    assert len(check_gate(noisy, parent, GateConfig(max_auc_drop=0.005, max_gauc_drop=None))) == 1
    clear = {"auc": 0.78, "auc_diff_ci": [-0.03, -0.01]}
    reasons = check_gate(clear, parent, GateConfig(max_auc_drop=0.005, max_gauc_drop=None, ranking_rule="ci"))
    assert len(reasons) == 1 and "[-0.0300, -0.0100]" in reasons[0]


def test_replay_seeds_combine_into_mean_std_and_t_interval():
    from pipelines.jobs.retrain.replay import combine_seeds

    def run(auc, published):
        return {"days": [{"day": 1, "published": published, "reasons": [], "auc_remapped": auc,
                          "churn_unchanged": 0.0}]}

    out = combine_seeds([run(0.70, True), run(0.80, False)], [0, 1])
    day = out["days"][0]
    assert day["auc_remapped"] == pytest.approx(0.75)
    assert day["auc_remapped_std"] == pytest.approx(0.0707107, rel=1e-5)
    # t(0.975, 1) = 12.7062: half width 12.7062 * 0.0707107 / sqrt(2) = 0.63531
    assert day["auc_remapped_ci95"] == pytest.approx([0.75 - 0.63531, 0.75 + 0.63531], rel=1e-4)
    assert day["gate"] == "refused 1/2" and out["refused_days"] == [1]
    assert day["auc_fresh"] is None and day["churn_unchanged_std"] == 0.0
