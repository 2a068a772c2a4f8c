"""End-to-end runs of the cascade job on a tiny synthetic dataset with the tiny encoder (DirectRunner)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from feature_store import FeatureStore

pytestmark = pytest.mark.slow

TINY = ["--n-items", "48", "--n-users", "40", "--n-events", "1600", "--n-clusters", "4", "--image-size", "16",
        "--encoder", "tiny", "--align-epochs", "1", "--align-batch-size", "32", "--rq-levels", "2", "--vq-k", "4",
        "--torch-threads", "1", "--embed-batch-size", "32", "--seed", "0"]


def _run(argv):
    from pipelines.jobs.cascade import run

    return run(list(argv), save_main_session=False)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cascade")
    argv = TINY + ["--data", str(base / "img"), "--store", str(base / "store")]
    return base, argv, _run(argv)


def test_publishes_a_contract_version(first_run):
    from pipelines.encoder.checkpoint import load_encoder
    from quant import load_quantizer

    base, _, summary = first_run
    store = FeatureStore(base / "store")
    assert store.current_id() == summary["version"]
    v = store.read()  # verifies every checksum and the manifest
    ids, emb = v.embeddings()
    assert ids.dtype == np.int64 and emb.dtype == np.float32 and emb.shape == (48, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    codes = v.codes()
    assert codes.item_ids.tolist() == ids.tolist()
    books = v.codebooks()
    sizes = [books[f"rq.level{lvl}"].shape[0] for lvl in range(2)]
    assert codes.rq.shape == (48, 2) and (codes.rq >= 0).all() and (codes.rq < np.array(sizes)).all()
    assert codes.vq.shape == (48, 4)
    assert np.isin(codes.vq, ids).all() and not (codes.vq == ids[:, None]).any()
    # the unaligned twin (ablation row f) has the same items
    ids_u, emb_u = v.embeddings("item_embeddings_unaligned")
    assert ids_u.tolist() == ids.tolist()
    # the aligned table is what the never-worse gate recorded: trained weights, or step 0 (= unaligned) bit for bit
    kept = v.metrics["alignment"]["kept"]
    assert kept in (True, False) and np.array_equal(emb_u, emb) == (not kept)
    assert v.codes("item_codes_unaligned").rq.shape == (48, 2)
    # the version carries what the retraining job warm-starts from
    q = load_quantizer(v.path / "quantizer")
    assert np.array_equal(q.encode(emb), codes.rq)
    enc = load_encoder(v.path / "encoder")
    assert enc.embed_dim == 16
    m = v.manifest
    assert m["extra"]["watermark"] > 1_500_000_000
    assert m["config"]["pairs"]["history"] == 50 and m["config"]["quantizer"]["vq_k"] == 4
    assert m["metrics"]["codes_aligned"]["items"] == 48
    assert 0.0 <= m["metrics"]["codes_aligned"]["collision_rate"] <= 1.0
    for key in ("next_item_valid", "next_item_test", "coconsumption_test", "align_valid"):
        assert "recall@10" in m["metrics"][f"{key}_aligned"] and "recall@10" in m["metrics"][f"{key}_unaligned"]
    assert m["metrics"]["next_item_test_aligned"]["n_queries"] > 0
    # the protocol: recorded, and only its train portion reached pair mining
    protocol = m["protocol"]
    assert protocol["split"]["method"] == "global" and protocol["train_max_ts"] < protocol["valid_start_ts"]
    assert st_in(summary, "mine_pairs") == protocol["train_events"] < protocol["events"]
    # summary: per-stage counts line up
    st = summary["stages"]
    assert st["validate_items"]["in"] == st["validate_items"]["out"] == 48
    assert st["embed"]["out"] == 48 and st["quantize"]["out"] == 48
    assert st["mine_pairs"]["out"] == m["metrics"]["pairs"]["train"] + m["metrics"]["pairs"]["align_valid"] > 0
    assert summary["dead_letter_total"] == 0
    # every train-portion target got its trigger from a counted source; the default is the collaborative model
    trig = m["metrics"]["triggers"]
    assert trig["similarity"] == "collab" and trig["by_source"]["collab"] > 0
    # side mode has the frozen MLLM's unaligned vectors before pair mining: they are the fallback
    assert trig["fallback"] == "encoder"
    assert sum(trig["by_source"].values()) == trig["targets"] > 0 and summary["metrics"]["triggers"] == trig
    json.dumps(summary)  # JSON-able for `--json`


def st_in(summary, stage):
    return summary["stages"][stage]["in"]


def test_rerun_is_idempotent(first_run):
    base, argv, summary = first_run
    again = _run(argv)
    store = FeatureStore(base / "store")
    assert again["version"] != summary["version"] and store.current_id() == again["version"]
    assert again["config_sha256"] == summary["config_sha256"]
    a, b = store.read(summary["version"]), store.read(again["version"])
    for name in ("item_codes", "item_codes_unaligned"):
        ca, cb = a.codes(name), b.codes(name)
        assert np.array_equal(ca.rq, cb.rq) and np.array_equal(ca.vq, cb.vq)
    assert np.array_equal(a.embeddings()[1], b.embeddings()[1])


def test_failed_run_leaves_current(first_run, monkeypatch, tmp_path):
    import pipelines.beam.quantize_items as Q

    base, argv, _ = first_run
    store = FeatureStore(base / "store")
    before, versions = store.current_id(), [v.id for v in store.list()]

    def broken_fit(*args, **kwargs):
        raise RuntimeError("injected failure in the RQ fit")

    monkeypatch.setattr(Q, "fit_rq", broken_fit)
    reuse = ["--align-checkpoint", str(store.read().path / "encoder"), "--skip-unaligned"]
    with pytest.raises(Exception, match="injected failure"):
        _run(argv + reuse)
    assert store.current_id() == before
    assert [v.id for v in store.list()] == versions
    assert not any((base / "store" / ".staging").glob("*/item_codes.parquet"))


def _bad_dataset(base: Path, first_base: Path):
    """A generic dataset from the tiny synthetic one with one of each bad record injected."""
    from pipelines.data import DataSpec, load_dataset

    ds = load_dataset(DataSpec(n_items=48, n_users=40, n_events=1600, n_clusters=4, image_size=16,
                               data=first_base / "img"))
    folder = base / "generic"
    shutil.copytree(ds.image_root, folder)
    items = ds.items[["item_id", "title", "text", "image_uri"]].copy()
    (folder / items.loc[3, "image_uri"]).write_bytes(b"\x89PNG broken")       # corrupt image -> text-only
    items = pd.concat([items, items.iloc[[5]].assign(title="a duplicate")])  # duplicate id -> dropped
    inter = ds.interactions[["user_id", "item_id", "ts", "label"]].copy()
    inter = pd.concat([inter, pd.DataFrame({"user_id": [1], "item_id": [9999], "ts": [int(inter.ts.max())],
                                            "label": [1.0]})])               # unknown item -> dropped
    items.to_csv(folder / "items.csv", index=False)
    inter.to_csv(folder / "interactions.csv", index=False)
    return folder, int(ds.items.loc[7, "item_id"]), len(ds.items), len(ds.interactions)


def test_bad_records_go_to_dead_letter(first_run, tmp_path, monkeypatch):
    from pipelines.beam.model_handler import ItemEncoderModelHandler

    first_base, argv, _ = first_run
    folder, nan_item, n_items, n_inter = _bad_dataset(tmp_path, first_base)
    original = ItemEncoderModelHandler.run_inference

    def nan_for_one(self, batch, model, inference_args=None):  # a model output gone bad for one item
        return [(i, np.full_like(e, np.nan) if i == nan_item else e) for i, e in original(self, batch, model)]

    monkeypatch.setattr(ItemEncoderModelHandler, "run_inference", nan_for_one)
    store = FeatureStore(first_base / "store")
    args = [a for a in TINY if a not in ("--n-items", "48")]
    summary = _run(args + ["--dataset", "generic", "--items", str(folder / "items.csv"), "--interactions",
                           str(folder / "interactions.csv"), "--store", str(tmp_path / "store"),
                           "--align-checkpoint", str(store.read().path / "encoder"), "--skip-unaligned"])
    assert summary["dead_letter"] == {"corrupt_image": 1, "duplicate_item": 1, "nan_embedding": 1,
                                      "unknown_item": 1}
    v = FeatureStore(tmp_path / "store").read()
    ids, _ = v.embeddings()
    assert len(ids) == n_items - 1 and nan_item not in ids.tolist()    # every other item arrives
    assert len(v.codes()) == n_items - 1
    assert summary["stages"]["validate_interactions"]["out"] == n_inter
    dead = pd.read_parquet(v.path / "dead_letter.parquet")
    assert set(dead.loc[dead.reason == "corrupt_image", "action"]) == {"kept_text_only"}


def test_demo_report_from_published_version(first_run, tmp_path):
    from pipelines.jobs.demo_report import markdown, write_plots

    base, _, summary = first_run
    version = FeatureStore(base / "store").read(summary["version"])
    plots = write_plots(version, summary["metrics"], tmp_path)
    assert set(plots) == {"utilization", "items_per_code", "next_item_recall"}
    for path in plots.values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = markdown(summary, None, "Skipped (--skip-ablation).", plots)
    assert summary["version"] in md and "| aligned | 48 |" in md and "| unaligned | 48 |" in md
    assert "| aligned | next item |" in md and "![utilization](utilization.png)" in md


def test_command_line_job_log_is_for_people(tmp_path):
    """`qarm pipeline` from a shell: no Beam INFO / Prism download attempt / loader chatter, our stage lines only."""
    import os
    import subprocess
    import sys

    argv = [sys.executable, "-m", "pipelines.cli", "pipeline", *TINY, "--skip-unaligned", "--data", str(tmp_path / "i"),
            "--store", str(tmp_path / "store"), "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2],
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    err = out.stderr
    for noise in ("prism", "Prism", "apitools", "apache_beam", "INFO root", "faiss.loader", "Loading faiss"):
        assert noise not in err, noise
    assert "INFO pipelines.jobs.cascade" in err and "published:" in err
    assert json.loads(out.stdout.strip().splitlines()[-1])["ok"] is True


def test_string_id_source_with_a_repeat_purchase_runs(first_run, tmp_path):
    """Issue 10 bug 1 end to end: `qarm pipeline --dataset generic` with `ids: string` crashed on the first loader
    reject (int('cust-…')); the repeat row now reaches the dead letter under its raw string ids."""
    from pipelines.data import DataSpec, load_dataset

    first_base, _, _ = first_run
    ds = load_dataset(DataSpec(n_items=48, n_users=40, n_events=1600, n_clusters=4, image_size=16,
                               data=first_base / "img"))
    folder = tmp_path / "shop"
    shutil.copytree(ds.image_root, folder)
    items = ds.items[["item_id", "title", "text", "image_uri"]].assign(item_id=lambda f: "art-" + f.item_id.astype(str))
    inter = ds.interactions[["user_id", "item_id", "ts", "label"]].assign(
        user_id=lambda f: "cust-" + f.user_id.astype(str), item_id=lambda f: "art-" + f.item_id.astype(str))
    inter = pd.concat([inter, inter.iloc[[10]]])                              # a repeat purchase row
    items.to_csv(folder / "items.csv", index=False)
    inter.to_csv(folder / "interactions.csv", index=False)
    (folder / "m.json").write_text(json.dumps({"items": {"path": "items.csv"},
                                               "interactions": {"path": "interactions.csv"}, "ids": "string"}))
    store = FeatureStore(first_base / "store")
    args = [a for a in TINY if a not in ("--n-items", "48")]
    summary = _run(args + ["--dataset", "generic", "--mapping", str(folder / "m.json"), "--store",
                           str(tmp_path / "store"), "--align-checkpoint", str(store.read().path / "encoder"),
                           "--skip-unaligned"])
    assert summary["dead_letter"] == {"duplicate_interaction": 1}
    dead = pd.read_parquet(FeatureStore(tmp_path / "store").read().path / "dead_letter.parquet")
    row = inter.iloc[10]
    assert dead[["user_id", "item_id", "reason"]].values.tolist() == [[row.user_id, row.item_id,
                                                                       "duplicate_interaction"]]


def test_cascade_seeds_share_one_backbone_pass(first_run, tmp_path):
    """The frozen MLLM's cache does not depend on the cascade seed: a second seed reuses it, and its seeded
    stages (pairs, side network, quantizers) still give other codes."""
    base, argv, _ = first_run
    cache = tmp_path / "side_cache"
    runs = []
    for seed in (0, 1):
        store = tmp_path / f"store{seed}"
        args = [a for a in argv if a not in ("--store",)]
        args = args[:args.index(str(base / "store"))] + args[args.index(str(base / "store")) + 1:]
        runs.append(_run(args + ["--store", str(store), "--cascade-seed", str(seed), "--side-cache-dir", str(cache)]))
        if seed == 0:
            built = (cache / "manifest.json").stat().st_mtime_ns
    assert (cache / "manifest.json").stat().st_mtime_ns == built  # not rebuilt for seed 1
    a = FeatureStore(tmp_path / "store0").read()
    b = FeatureStore(tmp_path / "store1").read()
    assert a.config["encoder"] == b.config["encoder"]
    # the unaligned embedding's PCA map is fitted on the train portion, which the cascade seed does not change
    assert np.array_equal(a.embeddings("item_embeddings_unaligned")[1], b.embeddings("item_embeddings_unaligned")[1])
    # the seeded stages still differ: the quantizers' codes
    assert not np.array_equal(a.codes().rq, b.codes().rq)
