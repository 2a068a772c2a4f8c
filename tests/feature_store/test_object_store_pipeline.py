"""`qarm pipeline --store s3://bucket/prefix` end to end on tiny data (tiny encoder) against the local S3 API: two
jobs started 5 s apart on one store, as tests/pipelines/test_one_writer.py does on a directory: exactly one
publishes, the other is refused by the conditional write of CURRENT (exit 4, naming the winner); the store
verifies and reads back through `qarm store` and the library."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feature_store import FeatureStore
from pipelines.cli import EXIT_LOCKED, EXIT_OK, main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = ["--n-items", "48", "--n-users", "40", "--n-events", "1600", "--n-clusters", "4", "--image-size", "16",
        "--encoder", "tiny", "--align-epochs", "1", "--align-batch-size", "32", "--rq-levels", "2", "--vq-k", "4",
        "--torch-threads", "1", "--embed-batch-size", "32", "--seed", "0", "--skip-unaligned"]


def test_two_pipelines_on_an_s3_store_one_publishes_the_other_exits_4(s3_endpoint, s3_url, tmp_path, capsys,
                                                                      monkeypatch):
    args = [sys.executable, "-m", "pipelines.cli", "pipeline", *TINY, "--data", str(tmp_path / "img"),
            "--store", s3_url, "--json"]
    procs = []
    for i in range(2):  # the usual client settings only: AWS_ENDPOINT_URL + credentials (s3_endpoint)
        env = {**os.environ, **s3_endpoint, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "QARM_STORE_CACHE": str(tmp_path / f"cache-{i}")}
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        time.sleep(5)
    outs = [p.communicate(timeout=900) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [EXIT_OK, EXIT_LOCKED], [err[-3000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    won = next(r for r in results if r["ok"])
    refused = next(r for r in results if not r["ok"])
    assert won["store"] == s3_url
    assert refused["status"] == "conflict" and refused["current"] == won["version"] and refused["expected"] is None
    assert f"another writer changed CURRENT to {won['version']}" in refused["error"]
    assert "Traceback" not in "".join(err for _, err in outs)

    monkeypatch.setenv("QARM_STORE_CACHE", str(tmp_path / "reader-cache"))
    store = FeatureStore(s3_url)
    assert [v.id for v in store.list()] == [won["version"]] == [store.current_id()]
    assert [(h["version"], h["previous"]) for h in store.history()] == [(won["version"], None)]
    bucket, prefix = s3_url[5:].split("/", 1)
    keys = {o.key for o in store.client.list(prefix + "/versions/")}
    assert {k.split("/")[3] for k in keys} == {won["version"]}  # the refused job uploaded nothing
    version = store.read()
    assert len(version.codes()) == 48 and version.embeddings()[1].shape[0] == 48
    vdir = f"{prefix}/versions/{won['version']}/"
    assert keys == {vdir + rel for rel in version.files()} | {vdir + "manifest.json"}  # encoder/, quantizer/ too
    assert main(["store", "verify", "--store", s3_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checked"] == 1
