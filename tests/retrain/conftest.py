"""The retraining tests' shared world: a tiny synthetic log and a store bootstrapped from its first 80%, built once
per session (about a minute) and copied for each module that changes it."""
from __future__ import annotations

import shutil

import pytest

DATA_FLAGS = ["--dataset", "synthetic", "--n-items", "240", "--n-users", "60", "--n-events", "5000",
              "--n-clusters", "6"]
JOB_FLAGS = ["--encoder", "tiny", "--rq-codebook-size", "12", "--align-epochs", "1", "--vq-k", "5"]


@pytest.fixture(scope="session")
def bootstrapped(tmp_path_factory):
    """{"root", "store", "first", "bounds", "data_flags", "job_flags"}: do not change its store; copy it
    (`copy_world`)."""
    from pipelines.data import DataSpec, load_dataset
    from pipelines.jobs.retrain.replay import bootstrap, day_boundaries

    root = tmp_path_factory.mktemp("retrain-world")
    ds = load_dataset(DataSpec(dataset="synthetic", data=root / "data", n_items=240, n_users=60, n_events=5000,
                               n_clusters=6))
    bounds = day_boundaries(ds.interactions["ts"].to_numpy(), days=1, tail=0.2)
    first = bootstrap(ds, root / "store", bounds[0], root / "boot", JOB_FLAGS)
    return {"root": root, "store": root / "store", "first": first["version"], "bounds": bounds,
            "data_flags": DATA_FLAGS + ["--data", str(root / "data")], "job_flags": JOB_FLAGS}


@pytest.fixture(scope="session")
def copy_world(bootstrapped):
    """copy_world(folder) -> the bootstrapped world with its own copy of the store under ``folder``."""

    def _copy(folder):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copytree(bootstrapped["store"], folder / "store", ignore=shutil.ignore_patterns(".retrain"))
        return {**bootstrapped, "root": folder, "store": folder / "store"}

    return _copy
