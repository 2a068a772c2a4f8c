"""Pair mining of this checkout against another checkout's (e.g. main) on a real dataset: the same pairs?

Runs the Beam `MinePairs` (the job's default `PairConfig`, and the collaborative trigger similarity) once with each
tree's code, in a child process whose PYTHONPATH is that tree, on the same interactions and the same encoder
fallback vectors (deterministic random unit vectors per item: only the fallback path matters here), and compares
the train / held-out pairs and the cutoff row for row (weights exactly, as float64).

    git archive main | tar -x -C /tmp/base
    .venv/bin/python bench/pairs_equal.py --baseline-tree /tmp/base --dataset synthetic --events-per-shard 5000
    .venv/bin/python bench/pairs_equal.py --baseline-tree /tmp/base --dataset movielens --data ../shared/data/movielens
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"swing": {}, "collab": {"trigger_similarity": "collab"}}  # PairConfig overrides of the job defaults
COLUMNS = ["left", "right", "source", "ts", "weight"]


def _interactions(args):
    from pipelines.data.loader import load_dataset
    from pipelines.data.schema import DataSpec

    spec = DataSpec(dataset=args.dataset, data=Path(args.data) if args.data else None)
    return load_dataset(spec).interactions[["user_id", "item_id", "ts", "label"]]


def child(args) -> None:
    """Mine with the code on PYTHONPATH; write train / heldout Parquet and the cutoff under --out."""
    import apache_beam as beam
    import numpy as np
    import pandas as pd

    from pipelines.beam.mine_pairs import MinePairs
    from pipelines.mining.pairs import PairConfig

    inter = pd.read_parquet(args.inter)
    rng = np.random.default_rng(0)
    items = np.unique(inter["item_id"].to_numpy())
    vecs = rng.standard_normal((len(items), 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    out = Path(args.out)
    t0 = time.perf_counter()
    with beam.Pipeline() as p:  # the outputs go through files: closures are copies on the runner's workers
        rows = p | "Create" >> beam.Create(inter.to_dict("records"))
        enc = p | "Enc" >> beam.Create(list(zip(items.tolist(), list(vecs))))
        shards = {"events_per_shard": args.events_per_shard} if args.events_per_shard else {}
        res = rows | "Mine" >> MinePairs(PairConfig(**CONFIGS[args.config]), encoder=enc, **shards)
        for name in ("train", "heldout", "cutoff"):
            _ = (res[name] | f"Json{name}" >> beam.Map(lambda r: json.dumps(r, default=lambda v: v.item()))
                 | f"Write{name}" >> beam.io.WriteToText(str(out / name), num_shards=1, shard_name_template=""))
    seconds = time.perf_counter() - t0
    for name in ("train", "heldout"):
        got = [json.loads(ln) for ln in (out / name).read_text().splitlines()]
        frame = pd.DataFrame(got, columns=COLUMNS).sort_values(COLUMNS[:3]).reset_index(drop=True)
        frame.to_parquet(out / f"{name}.parquet")
    cutoff = [json.loads(ln) for ln in (out / "cutoff").read_text().splitlines()]
    (out / "meta.json").write_text(json.dumps({"cutoff": cutoff, "seconds": round(seconds, 1)}))


def _run_tree(tree: Path, inter: Path, config: str, out: Path, events_per_shard: int | None = None) -> dict:
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    shards = ["--events-per-shard", str(events_per_shard)] if events_per_shard else []
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--inter", str(inter), "--config",
                    config, "--out", str(out), *shards], check=True, env=env, cwd=tree)
    return json.loads((out / "meta.json").read_text())


def compare(base: Path, mine: Path) -> dict:
    import pandas as pd

    report = {}
    for name in ("train", "heldout"):
        a, b = pd.read_parquet(base / f"{name}.parquet"), pd.read_parquet(mine / f"{name}.parquet")
        keys = ["left", "right"]
        merged = a.merge(b, on=keys, how="outer", suffixes=("_base", "_this"), indicator=True)
        both = merged[merged["_merge"] == "both"]
        report[name] = {"baseline_rows": len(a), "this_rows": len(b),
                        "only_baseline": int((merged["_merge"] == "left_only").sum()),
                        "only_this": int((merged["_merge"] == "right_only").sum()),
                        "differing_rows": int(sum((both[f"{c}_base"] != both[f"{c}_this"]).sum()
                                                  for c in ("source", "ts", "weight"))),
                        "identical": bool(a.equals(b))}
    return report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-tree", help="a checkout of the code to compare with (e.g. main)")
    ap.add_argument("--dataset", choices=("synthetic", "movielens"), default="synthetic")
    ap.add_argument("--data", default=None, help="movielens: the folder holding ml-latest-small/")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--events-per-shard", type=int, default=None,
                    help="this checkout's MinePairs only (the baseline may not have shards): fewer events per shard "
                         "than the data has, so the comparison crosses shards")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inter", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return {}
    sys.path.insert(0, str(REPO))
    result = {"dataset": args.dataset, "events_per_shard": args.events_per_shard, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="pairs_equal_") as tmp:
        inter_path = Path(tmp) / "interactions.parquet"
        inter = _interactions(args)
        inter.to_parquet(inter_path)
        result["interactions"] = len(inter)
        for config in args.configs.split(","):
            base = _run_tree(Path(args.baseline_tree).resolve(), inter_path, config, Path(tmp) / config / "base")
            mine = _run_tree(REPO, inter_path, config, Path(tmp) / config / "this", args.events_per_shard)
            result["configs"][config] = {"cutoff_equal": base["cutoff"] == mine["cutoff"],
                                         "seconds": {"baseline": base["seconds"], "this": mine["seconds"]},
                                         **compare(Path(tmp) / config / "base", Path(tmp) / config / "this")}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
