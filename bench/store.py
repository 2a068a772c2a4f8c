"""Feature-store benchmark: the price of crash safety and verification, and the speed of code remapping.

Each figure is a ratio against a baseline measured in the same run:
- publish: stage + atomic writes + sha256 + fsync + validation + manifest + rename + CURRENT flip,
  vs plain ``pq.write_table`` / ``safetensors.save_file`` of the same tables into a folder;
- read: ``store.read()`` (manifest + every sha256) + typed readers, vs the typed readers alone;
- remap: greedy one-to-one matching vs nearest-centroid matching at a production codebook size;
- churn: code churn over the catalog (absolute seconds; its baseline is a plain ``np.intersect1d`` join).

    .venv/bin/python bench/store.py --items 100000 --dim 64 --codebook-size 4096 [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # shared 2-core machines: keep BLAS to one thread
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from feature_store import FeatureStore  # noqa: E402
from feature_store.remap import RemapConfig, code_churn, remap_code_tables  # noqa: E402
from feature_store.tables import (CodeTable, codes_table, embeddings_table, read_codes, read_embeddings,  # noqa: E402
                                  write_codebooks, write_codes, write_embeddings)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codebook-size", type=int, default=4096)
    parser.add_argument("--vq-k", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    n, d, k = args.items, args.dim, args.codebook_size
    ids = rng.permutation(n).astype(np.int64)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    rq = rng.integers(0, k, size=(n, args.levels)).astype(np.int32)
    vq = rng.integers(0, n, size=(n, args.vq_k)).astype(np.int64)
    books = {f"rq.level{i}": rng.normal(size=(k, d)).astype(np.float32) for i in range(args.levels)}
    work = Path(tempfile.mkdtemp(prefix="qarm-bench-store-"))
    result: dict = {"items": n, "dim": d, "levels": args.levels, "codebook_size": k, "vq_k": args.vq_k}
    try:
        from safetensors.numpy import save_file

        plain_dir = work / "plain"
        plain_dir.mkdir()

        def plain_write():
            pq.write_table(embeddings_table(ids, emb), plain_dir / "item_embeddings.parquet")
            pq.write_table(codes_table(ids, rq, vq), plain_dir / "item_codes.parquet")
            save_file(books, str(plain_dir / "codebooks.safetensors"))

        store = FeatureStore(work / "store")

        def store_publish():
            with store.stage() as st:
                write_embeddings(st.path / "item_embeddings.parquet", ids, emb)
                write_codes(st.path / "item_codes.parquet", ids, rq, vq)
                write_codebooks(st.path / "codebooks.safetensors", books)
                st.publish(config={"bench": True})

        t_plain = _best(plain_write, args.repeats)
        t_publish = _best(store_publish, args.repeats)
        result["publish"] = {"plain_write_s": round(t_plain, 4), "store_publish_s": round(t_publish, 4),
                             "ratio": round(t_publish / t_plain, 3)}

        def plain_read():
            read_embeddings(plain_dir / "item_embeddings.parquet")
            read_codes(plain_dir / "item_codes.parquet")

        def store_read():
            v = store.read()
            v.embeddings()
            v.codes()

        t_read = _best(plain_read, args.repeats)
        t_vread = _best(store_read, args.repeats)
        result["read"] = {"tables_only_s": round(t_read, 4), "verified_read_s": round(t_vread, 4),
                          "ratio": round(t_vread / t_read, 3)}

        old_c = books["rq.level0"]
        new_c = (old_c[rng.permutation(k)] + 0.05 * rng.normal(size=(k, d))).astype(np.float32)
        table = rng.normal(size=(k + 1, 32)).astype(np.float32)
        t_near = _best(lambda: remap_code_tables([old_c], [new_c], [table], RemapConfig(method="nearest")),
                       args.repeats)
        t_one = _best(lambda: remap_code_tables([old_c], [new_c], [table]), args.repeats)
        warm = remap_code_tables([old_c], [new_c], [table]).levels[0]
        cold = remap_code_tables([old_c], [rng.normal(size=(k, d)).astype(np.float32)], [table]).levels[0]
        result["remap"] = {"nearest_s": round(t_near, 4), "one_to_one_s": round(t_one, 4),
                           "ratio": round(t_one / t_near, 3), "warm_rounds": warm["rounds"],
                           "warm_mean_cosine": round(warm["mean_cosine"], 4), "cold_rounds": cold["rounds"],
                           "cold_mean_cosine": round(cold["mean_cosine"], 4)}

        old_t = CodeTable(np.sort(ids), rq, vq)
        moved = rq.copy()
        flip = rng.random(n) < 0.1
        moved[flip, -1] = (moved[flip, -1] + 1) % k
        new_t = CodeTable(np.sort(ids), moved, vq)
        t_join = _best(lambda: np.intersect1d(old_t.item_ids, new_t.item_ids, return_indices=True), args.repeats)
        t_churn = _best(lambda: code_churn(old_t, new_t), args.repeats)
        churn = code_churn(old_t, new_t)
        result["churn"] = {"join_s": round(t_join, 4), "churn_s": round(t_churn, 4),
                           "ratio": round(t_churn / t_join, 3), "rq_code_churn": round(churn["rq_code_churn"], 4)}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for section in ("publish", "read", "remap", "churn"):
        print(f"{section:<8} " + "  ".join(f"{key}={value}" for key, value in result[section].items()))
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
