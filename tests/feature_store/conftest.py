"""Fixtures for the feature-store tests: tiny generated tables, nothing from disk or network."""
from __future__ import annotations

import numpy as np
import pytest

from feature_store import FeatureStore, write_codebooks, write_codes, write_embeddings


def fill_version(path, seed: int = 0, n: int = 20, dim: int = 4, levels: int = 2, k: int = 8) -> dict:
    """Write the three contract files of one version under ``path``; return the arrays written."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n).astype(np.int64) + 100  # not sorted: readers must sort
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    rq = rng.integers(0, k, size=(n, levels)).astype(np.int32)
    vq = rng.integers(100, 100 + n, size=(n, 3)).astype(np.int64)
    books = {f"rq.level{i}": rng.normal(size=(k, dim)).astype(np.float32) for i in range(levels)}
    write_embeddings(path / "item_embeddings.parquet", ids, emb)
    write_codes(path / "item_codes.parquet", ids, rq, vq)
    write_codebooks(path / "codebooks.safetensors", books)
    return {"ids": ids, "emb": emb, "rq": rq, "vq": vq, "books": books}


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return FeatureStore(tmp_path / "store")


@pytest.fixture
def publish(store):
    """publish(seed, **publish_kwargs) -> StoreVersion: stage the contract files and publish them."""

    def _publish(seed: int = 0, config: dict | None = None, **kwargs):
        with store.stage() as st:
            fill_version(st.path, seed=seed)
            return st.publish(config=config or {"seed": seed}, **kwargs)

    return _publish


@pytest.fixture
def fill():
    """The :func:`fill_version` helper, as a fixture (test modules cannot import conftest in importlib mode)."""
    return fill_version


@pytest.fixture
def race_writers(tmp_path):
    """race_writers(store_root, n, env=None) -> [result dict per writer]: n processes (cas_writer.py) record CURRENT,
    stage a version, wait until all are ready, then publish at once; each prints {"published"} or {"conflict"}."""
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    def _race(store_root: str, n: int, env: dict | None = None) -> list[dict]:
        barrier = tmp_path / "barrier"
        barrier.mkdir()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **(env or {})}
        procs = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("cas_writer.py")), store_root,
                                   str(barrier), str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for i in range(n)]
        try:
            deadline = time.time() + 120
            while len(list(barrier.glob("ready-*"))) < n:
                assert time.time() < deadline and all(p.poll() is None for p in procs), \
                    [p.stderr.read() for p in procs if p.poll() is not None]
                time.sleep(0.02)
            (barrier / "go").touch()
            outs = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                p.kill()
        return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]

    return _race


# ---------------------------------------------------------------------------------------------- object storage
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3 API (moto, one request at a time: tests/feature_store/s3_server.py) on a free 127.0.0.1 port,
    for one test module.

    Yields the environment a client needs (AWS_ENDPOINT_URL + dummy credentials), also set in os.environ until the
    module ends; skips without moto/boto3 (`pip install -r requirements-dev.txt`).
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("boto3", reason="the object-store tests need boto3 (requirements-dev.txt)")
    pytest.importorskip("moto", reason="the object-store tests need moto[server] (requirements-dev.txt)")
    log = open(os.environ.get("QARM_S3_SERVER_LOG", os.devnull), "w")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("s3_server.py"))],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            pytest.fail(f"local S3 server did not start: {line} (QARM_S3_SERVER_LOG=FILE keeps its log)")
        env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{int(line)}"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield env
    finally:
        proc.kill()
        proc.wait()
        log.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_url(s3_endpoint, request):
    """``s3://<fresh bucket>/stores/main``: a new, empty bucket per test on the local S3 API."""
    import re
    import uuid

    from feature_store.objects import s3_client

    bucket = (re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-"
              + uuid.uuid4().hex[:8])
    s3_client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/stores/main"


@pytest.fixture
def s3_store(s3_url, tmp_path) -> FeatureStore:
    return FeatureStore(s3_url, cache_dir=tmp_path / "cache")
