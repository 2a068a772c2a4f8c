"""The cascade's user-prompt stage (issue 22, point 5; pipelines.beam.user_prompt_stage): behind --user-prompts the
job trains the MLLM user encoder after the aligned item embeddings and writes user_embeddings.parquet into the
version it publishes; off (the default) the job and its item outputs are as before."""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest

from feature_store import FeatureStore
from pipelines.encoder.user_encoder import USER_TABLE, UserEncoderConfig
from pipelines.config.cascade import CascadeConfig, UserPromptsSection

TINY = ["--n-items", "48", "--n-users", "40", "--n-events", "1600", "--n-clusters", "4", "--image-size", "16",
        "--encoder", "tiny", "--align-epochs", "1", "--align-batch-size", "32", "--rq-levels", "2", "--vq-k", "4",
        "--torch-threads", "1", "--embed-batch-size", "32", "--seed", "0", "--skip-unaligned"]
USER_PROMPTS = ["--user-prompts", "--user-prompt-epochs", "1", "--user-prompt-batch-size", "16",
                "--user-prompt-token-budget", "28", "--user-prompt-negatives", "64", "--user-prompt-gate-z", "0"]


def _run(argv):
    from pipelines.jobs.cascade import run

    return run(list(argv), save_main_session=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same job (same data and seeds) with the stage on and off, each into its own store."""
    base = tmp_path_factory.mktemp("user_prompt_stage")
    common = TINY + ["--data", str(base / "img")]
    on = _run(common + ["--store", str(base / "on")] + USER_PROMPTS)
    off = _run(common + ["--store", str(base / "off")])
    return FeatureStore(base / "on").read(on["version"]), FeatureStore(base / "off").read(off["version"]), common


def _train_users(argv) -> np.ndarray:
    """Users with a positive event in the protocol's train portion, from the same data flags."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from feature_store.split import split_from_args
    from pipelines.beam.options import CascadeOptions, data_spec
    from pipelines.data import load_dataset
    from pipelines.encoder.user_encoder import positive_windows

    options = PipelineOptions(list(argv))
    ds = load_dataset(data_spec(options))
    train, _ = positive_windows(ds.interactions, split_from_args(options.view_as(CascadeOptions)))
    return np.unique(train["user_id"].to_numpy())


@pytest.mark.slow
def test_the_stage_writes_user_embeddings_into_the_published_version(runs):
    from feature_store.io import sha256_file
    from feature_store.tables import read_embeddings

    v, _, argv = runs
    users, vectors = read_embeddings(v.file(USER_TABLE), id_column="user_id")
    item_ids, items = v.embeddings()
    assert users.dtype == np.int64 and vectors.dtype == np.float32
    assert users.tolist() == _train_users(argv).tolist()  # one row per user with train-portion positives
    assert vectors.shape == (len(users), items.shape[1])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    m = v.manifest  # the table is part of this version, checked like every other file
    assert m["files"][USER_TABLE]["sha256"] == sha256_file(v.file(USER_TABLE))
    assert m["rows"][USER_TABLE] == len(users)
    record = m["metrics"]["user_prompts"]
    assert record["shipped"] in ("step0", "trained") and record["users_written"] == len(users)
    assert record["shipped"] == ("trained" if record["alignment"]["kept"] else "step0")
    assert record["alignment"]["judge"] == "valid_next_item" and record["dim"] == items.shape[1]
    assert set(record["alignment"]["valid_next_item"]) == {"step0", "best"}
    assert m["config"]["user_prompts"]["user_encoder"]["epochs"] == 1
    if record["shipped"] == "step0":  # history pooling exactly: the mean aligned embedding of the user's events
        assert record["alignment"]["valid_next_item"]["best"] == record["alignment"]["valid_next_item"]["step0"]
    # the point-in-time table next to it (the ranker's prompt feature): same version, listed like every table
    from feature_store.tables import read_asof_embeddings
    from pipelines.encoder.user_encoder import ASOF_TABLE
    a_users, a_cuts, a_vecs = read_asof_embeddings(v.file(ASOF_TABLE))
    assert m["files"][ASOF_TABLE]["sha256"] == sha256_file(v.file(ASOF_TABLE))
    assert m["rows"][ASOF_TABLE] == len(a_users) == record["asof"]["rows"] > len(users)
    last = np.r_[a_users[1:] != a_users[:-1], True]
    assert a_users[last].tolist() == users.tolist()
    np.testing.assert_array_equal(a_vecs[last], vectors)   # its train-end rows are the serving vectors
    assert np.bincount(np.unique(a_users, return_inverse=True)[1]).max() <= UserEncoderConfig().asof_cuts + 1


@pytest.mark.slow
def test_the_stage_leaves_the_item_outputs_alone_and_is_off_by_default(runs):
    on, off, _ = runs
    for table in ("item_embeddings", "item_codes"):
        assert on.manifest["files"][f"{table}.parquet"]["sha256"] == off.manifest["files"][f"{table}.parquet"]["sha256"]
    ids_on, emb_on = on.embeddings()
    ids_off, emb_off = off.embeddings()
    assert ids_on.tolist() == ids_off.tolist() and np.array_equal(emb_on, emb_off)
    assert not off.has(USER_TABLE) and USER_TABLE not in off.manifest["files"]
    assert not off.has("user_embeddings_asof.parquet")
    assert "user_prompts" not in off.metrics and "user_prompts" not in off.config
    # everything else of the config is the same job: only the stage's entry is added
    assert {k: v for k, v in on.config.items() if k != "user_prompts"} == off.config


def test_every_knob_is_one_flag_with_the_user_encoders_default():
    from feature_store.config_tree import add_section_arguments, knob_fields, resolve_tree

    parser = argparse.ArgumentParser()
    add_section_arguments(parser, UserPromptsSection)
    flags = {f for a in parser._actions for f in a.option_strings if f.startswith("--user")}
    fields = [f for f, _ in knob_fields(UserPromptsSection)]
    assert flags >= {"--" + f.name.replace("_", "-") for f in fields}
    assert all(f.name.startswith("user_prompt") for f in fields)
    defaults = parser.parse_args([])
    assert defaults.user_prompts is False  # off by default
    enc = UserEncoderConfig()
    assert defaults.user_prompt_epochs == enc.epochs and defaults.user_prompt_max_train == enc.max_train_prompts
    assert defaults.user_prompt_adapters is enc.adapters and defaults.user_prompt_template == enc.template
    parser = argparse.ArgumentParser()
    add_section_arguments(parser, UserPromptsSection, with_defaults=False)
    got = resolve_tree(CascadeConfig, parser.parse_args(["--user-prompts", "--user-prompt-epochs", "2",
                                                         "--no-user-prompt-adapters", "--user-prompt-lr", "0.01"]))
    cfg = got.user_prompts.encoder_config(seed=7, num_threads=1)
    assert (cfg.epochs, cfg.adapters, cfg.lr, cfg.seed, cfg.num_threads) == (2, False, 0.01, 7, 1)
    assert defaults.user_prompt_asof_cuts == enc.asof_cuts
    got = resolve_tree(CascadeConfig, parser.parse_args(["--user-prompt-asof-cuts", "2"]))
    assert got.user_prompts.encoder_config().asof_cuts == 2
    assert {k: v for k, v in cfg.to_dict().items() if k not in ("epochs", "adapters", "lr", "seed", "num_threads")} \
        == {k: v for k, v in enc.to_dict().items() if k not in ("epochs", "adapters", "lr", "seed", "num_threads")}


def test_the_cascade_options_carry_the_flags():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.beam.options import CascadeOptions, cascade_config

    options = PipelineOptions(["--user-prompts", "--user-prompt-max-train", "50"])
    opts = options.view_as(CascadeOptions)
    assert opts.user_prompts is True and opts.user_prompt_max_train == 50
    assert cascade_config(options).user_prompts.user_prompt_max_train == 50
    assert PipelineOptions([]).view_as(CascadeOptions).user_prompts is False


@pytest.mark.parametrize("bad, flag", [({"user_prompt_epochs": 0}, "--user-prompt-epochs"),
                                       ({"user_prompt_asof_cuts": 0}, "--user-prompt-asof-cuts"),
                                       ({"user_prompt_template": "nope"}, "--user-prompt-template"),
                                       ({"user_prompt_lr": -1.0}, "--user-prompt-lr"),
                                       ({"user_prompt_max_train": 0}, "--user-prompt-max-train"),
                                       ({"user_prompt_negatives": -1}, "--user-prompt-negatives"),
                                       ({"user_prompt_batch_size": "8"}, "--user-prompt-batch-size"),
                                       ({"user_prompts": "yes"}, "--user-prompts")])
def test_a_bad_value_is_refused_naming_its_flag(bad, flag):
    with pytest.raises(ValueError, match=flag):
        UserPromptsSection(**bad)


def test_a_bad_flag_value_fails_before_the_job_runs(capsys):
    from pipelines.cli import main

    assert main(["pipeline", "--user-prompts", "--user-prompt-token-budget", "0", "--print-config", "--json"]) == 2
    assert "--user-prompt-token-budget must be >= 1" in capsys.readouterr().out


@pytest.mark.slow
def test_the_stage_and_the_align_job_share_one_path(tmp_path, capsys):
    """Same data, split, seed and knobs: the stage's user table equals `qarm align --target user-prompts`'s over
    the version the stage published (both call pipelines.encoder.user_encoder.fit_user_vectors)."""
    from feature_store.tables import read_embeddings
    from oracle_world import oracle_world, write_world_files
    from pipelines.cli import main as qarm_main

    items, inter = write_world_files(oracle_world(n_items=60, n_users=30, n_events=1200, seed=5), tmp_path / "data")
    data = ["--dataset", "generic", "--items", str(items), "--interactions", str(inter), "--split", "user_last_frac"]
    knobs = {"epochs": "2", "batch-size": "16", "token-budget": "28", "negatives": "32", "gate-z": "0", "lr": "0.01",
             "patience": "2"}
    summary = _run(data + ["--encoder", "tiny", "--align-epochs", "1", "--rq-levels", "2", "--vq-k", "4",
                           "--torch-threads", "1", "--skip-unaligned", "--store", str(tmp_path / "store"),
                           "--user-prompts"] + [x for k, v in knobs.items() for x in (f"--user-prompt-{k}", v)])
    job = {f"--user-prompt-{k}": v for k, v in knobs.items()}  # the same flags: one knob, one name
    code = qarm_main(["align", "--target", "user-prompts", *data, "--store", str(tmp_path / "store"),
                      "--out", str(tmp_path / "out"), "--torch-threads", "1", "--no-publish", "--json",
                      *[x for kv in job.items() for x in kv]])
    capsys.readouterr()
    assert code == 0
    v = FeatureStore(tmp_path / "store").read(summary["version"])
    users, vectors = read_embeddings(v.file(USER_TABLE), id_column="user_id")
    job_users, job_vectors = read_embeddings(tmp_path / "out" / USER_TABLE, id_column="user_id")
    assert users.tolist() == job_users.tolist()
    np.testing.assert_allclose(vectors, job_vectors, atol=1e-6)
    from feature_store.tables import read_asof_embeddings
    from pipelines.encoder.user_encoder import ASOF_TABLE
    stage_asof, job_asof = read_asof_embeddings(v.file(ASOF_TABLE)), read_asof_embeddings(tmp_path / "out" / ASOF_TABLE)
    assert stage_asof[0].tolist() == job_asof[0].tolist() and stage_asof[1].tolist() == job_asof[1].tolist()
    np.testing.assert_allclose(stage_asof[2], job_asof[2], atol=1e-6)
    # the same training too, whichever weights shipped: every epoch's validation figures and the gate's choice
    report = json.loads((tmp_path / "out" / "user_prompts.json").read_text())
    record = v.metrics["user_prompts"]
    assert record["shipped"] == report["shipped"] and len(record["valid"]) == len(report["valid"]) == 2
    for ours, theirs in zip(record["valid"], report["valid"]):
        assert ours["mrr"] == pytest.approx(theirs["mrr"], abs=1e-9) and ours["recall@10"] == theirs["recall@10"]
    assert record["loss_last"] == pytest.approx(report["loss_last"], rel=1e-6)
