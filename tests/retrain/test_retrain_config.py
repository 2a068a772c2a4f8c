"""Retraining = the parent's resolved config plus the documented overrides, on the user's Beam runner."""
from __future__ import annotations

import json

import pytest

from feature_store import FeatureStore
from pipelines.cli import EXIT_OK, main
from pipelines.config.cascade import CascadeConfig
from feature_store.config_tree import diff, tree_from_dict

pytestmark = pytest.mark.slow

# a parent built away from the defaults in every section the old flag rebuild dropped
PARENT_FLAGS = ["--swing-top-n", "7", "--min-support", "1", "--trigger-similarity", "swing", "--collab-dim", "8",
                "--side-layer-stride", "1", "--side-dropout", "0.2", "--vq-index", "ivf", "--split", "user_last_frac",
                "--valid-frac", "0.15", "--test-frac", "0.05", "--align-batch-size", "64", "--torch-threads", "1"]
# the gate is not under test here: loose thresholds so the candidate publishes
LOOSE_GATE = ["--no-ranker-gate", "--max-recall-drop", "1", "--max-collision-rate", "1", "--min-utilization", "0"]
ALLOWED = {"dataset", "data", "mapping", "now", "store", "work_dir", "align_epochs", "align_checkpoint",
           "init_encoder", "init_quantizer", "unaligned_map", "n_items", "n_users", "n_events", "n_clusters",
           "image_size", "items", "interactions", "column_map", "id_map_dir", "preset", "lookalike_share"}


@pytest.fixture(scope="module")
def parent_world(bootstrapped, tmp_path_factory):
    """The bootstrap's export, published by a parent job with non-default settings into a fresh store."""
    from pipelines.jobs import cascade

    root = tmp_path_factory.mktemp("retrain-config")
    mapping = bootstrapped["root"] / "boot" / "bootstrap" / "mapping.json"
    summary = cascade.run(["--dataset", "generic", "--mapping", str(mapping), "--store", str(root / "store"),
                           "--runner", "DirectRunner", *bootstrapped["job_flags"], *PARENT_FLAGS],
                          save_main_session=False)
    return {**bootstrapped, "root": root, "store": root / "store", "first": summary["version"]}


def _resolved(store, version=None) -> dict:
    return FeatureStore(store).read(version).extra["resolved_config"]


def _retrain(world, capsys, *extra) -> dict:
    code = main(["retrain", "--store", str(world["store"]), *world["data_flags"], "--json", *LOOSE_GATE,
                 "--work-dir", str(world["root"] / f"work{len(extra)}"), *extra])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == EXIT_OK, out
    return out


def test_parent_manifest_records_the_whole_resolved_config(parent_world):
    resolved = _resolved(parent_world["store"])
    cfg = tree_from_dict(CascadeConfig, resolved["cascade"])
    assert (cfg.pairs.swing_top_n, cfg.pairs.trigger_similarity, cfg.align.side_layer_stride, cfg.quant.vq_index,
            cfg.split.split, cfg.split.valid_frac) == (7, "swing", 1, "ivf", "user_last_frac", 0.15)
    assert resolved["beam"]["runner"] == "DirectRunner"


def test_candidate_inherits_everything_but_the_documented_overrides_on_the_users_runner(parent_world, capsys):
    """One retraining run (multi-process FnApiRunner, as a user would pass Flink's options): its candidate is the
    parent's recipe plus the documented overrides, and it ran on the runner the user gave."""
    parent = _resolved(parent_world["store"])
    out = _retrain(parent_world, capsys, "--runner", "FnApiRunner", "--direct_num_workers", "2",
                   "--direct_running_mode", "multi_processing")
    assert out["published"] is True
    child = _resolved(parent_world["store"])
    a = tree_from_dict(CascadeConfig, parent["cascade"])
    b = tree_from_dict(CascadeConfig, child["cascade"])
    changed = diff(a, b)
    assert set(changed) <= ALLOWED, f"not a documented override: {sorted(set(changed) - ALLOWED)}"
    assert b.align.align_epochs == 1 and b.align.align_checkpoint and b.quant.init_quantizer  # warm start
    assert b.split == a.split and b.pairs == a.pairs  # the parent's split and pair recipe, whole
    assert b.align.side_layer_stride == 1 and b.quant.vq_index == "ivf"
    beam = child["beam"]
    assert beam["runner"] == "FnApiRunner"
    assert beam["direct_num_workers"] == 2 and beam["direct_running_mode"] == "multi_processing"
