"""Scale benchmark of the cascade's Beam stages (issue 13 point 6). Prints figures, with --json one JSON line last.

For each catalog size N (``--sizes``): a synthetic, text-only catalog of N items and min(2N, 500k) users with
5..20 positive events each (Zipf popularity inside 32 taste clusters, plus optionally one hot item consumed by
``--hot-item-users`` users), written as Parquet part files. Then every stage runs as a Beam pipeline in its own
child process (so its peak RSS is its own), reading the previous stage's Parquet output and writing its own:

    read_validate   ReadFromParquet (globs of part files) -> ValidateItems / ValidateInteractions -> Parquet
    mine_pairs      MinePairs: capped Swing, collaborative (iALS) trigger similarity, exact quantile cutoff
    embed           RunInference with a small text encoder (``--encoder``, default tiny text-only: the embed
                    stage is not the only cost)
    quantize        RQ fit on the hashed sample + encode; VQ k-NN (gathered below --vq-gather-max, else IVF)

Alignment is not benchmarked here: its cost is the trainer's (`bench/align.py`; data-parallel over
`--align-nproc` processes with `pipelines.beam.align_trainer`), not the runner's.
Per stage: ``seconds`` (child wall time, Python start-up included), ``cpu_seconds`` (user + system time of the
child and the SDK worker processes: steadier than wall time on a shared machine) and ``peak_rss_mb`` (the largest
max RSS of the child or one of its workers); ``growth.<stage>`` / ``growth_cpu.<stage>``: wall / CPU time ratio
per 10x items between consecutive sizes. ``--baseline-tree DIR`` also runs mine_pairs with DIR's code (another
checkout, e.g. main) on the same data (``mine_pairs_baseline``) and prints a before / after table.
Then the embed stage with the real encoder against a bare torch loop over the same model and items
(``--embed-items``, default 4096), one run.

    .venv/bin/python bench/scale.py --sizes 10000,100000 --json
    .venv/bin/python bench/scale.py --sizes 10000,100000,1000000 --json          # the issue's table
    .venv/bin/python bench/scale.py --sizes 2000 --embed-items 0 --json          # quick
    .venv/bin/python bench/scale.py --sizes 0 --embed-items 4096 --json          # the embed comparison only
    # pair mining before / after: main's code in a second checkout, the same data
    git worktree add --detach /tmp/base main
    .venv/bin/python bench/scale.py --sizes 10000,100000 --stages read_validate,mine_pairs \\
        --baseline-tree /tmp/base --runner FnApiRunner --workers 2 --embed-items 0 --json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STAGES = ("read_validate", "mine_pairs", "embed", "quantize")
WORDS = [f"w{i}" for i in range(2000)]


# ------------------------------------------------------------------------------------------------ data


def generate(n_items: int, out: Path, seed: int = 0, hot_item_users: int = 0, part_rows: int = 500_000) -> dict:
    """Write items/part-*.parquet and interactions/part-*.parquet (contract columns + ``_row``)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_users = min(2 * n_items, 500_000)
    n_clusters = 32
    cluster = rng.integers(0, n_clusters, n_items)
    (out / "items").mkdir(parents=True, exist_ok=True)
    (out / "interactions").mkdir(parents=True, exist_ok=True)
    words = np.asarray(WORDS)
    for start in range(0, n_items, part_rows):
        stop = min(n_items, start + part_rows)
        ids = np.arange(start, stop)
        base = cluster[ids] * 50
        w = words[(base[:, None] + rng.integers(0, 60, (len(ids), 4))) % len(words)]
        titles = [" ".join(r) for r in w.tolist()]
        pq.write_table(pa.table({"item_id": ids.astype(np.int64), "title": titles, "text": titles,
                                 "image_uri": pa.nulls(len(ids), pa.string()), "_row": ids.astype(np.int64)}),
                       out / "items" / f"part-{start // part_rows:05d}.parquet")
    members = [np.flatnonzero(cluster == c) for c in range(n_clusters)]
    zipf = [1.0 / np.arange(1, len(m) + 1) ** 0.8 for m in members]
    zipf = [z / z.sum() for z in zipf]
    per_user = rng.integers(5, 21, n_users)
    taste = rng.integers(0, n_clusters, n_users)
    users = np.repeat(np.arange(n_users), per_user)
    items = np.empty(len(users), np.int64)
    for c in range(n_clusters):
        rows = np.flatnonzero(taste[users] == c)
        if len(members[c]) and len(rows):
            items[rows] = members[c][rng.choice(len(members[c]), len(rows), p=zipf[c])]
        elif len(rows):
            items[rows] = rng.integers(0, n_items, len(rows))
    ts = 1_600_000_000 + rng.integers(0, 90 * 86_400, len(users))
    if hot_item_users:
        hot_users = rng.choice(n_users, min(hot_item_users, n_users), replace=False)
        users = np.r_[users, hot_users]
        items = np.r_[items, np.zeros(len(hot_users), np.int64)]
        ts = np.r_[ts, 1_600_000_000 + rng.integers(0, 90 * 86_400, len(hot_users))]
    n_events = len(users)
    for start in range(0, n_events, part_rows):
        stop = min(n_events, start + part_rows)
        pq.write_table(pa.table({"user_id": users[start:stop].astype(np.int64), "item_id": items[start:stop],
                                 "ts": ts[start:stop].astype(np.int64),
                                 "label": np.ones(stop - start, np.float32),
                                 "_row": np.arange(start, stop, dtype=np.int64)}),
                       out / "interactions" / f"part-{start // part_rows:05d}.parquet")
    return {"items": int(n_items), "users": int(n_users), "events": int(n_events)}


# ------------------------------------------------------------------------------------------------ stages


def _options(args):
    from apache_beam.options.pipeline_options import PipelineOptions

    flags = ["--runner", args.runner]
    if args.runner == "FnApiRunner" and args.workers > 1:
        flags += ["--direct_num_workers", str(args.workers), "--direct_running_mode", "multi_processing"]
    return PipelineOptions(flags)


def _dicts(r):
    return dict(r)


def run_stage(stage: str, work: Path, args) -> dict:
    """One stage as one Beam pipeline in this process; returns element counts."""
    import apache_beam as beam
    import pyarrow as pa

    from pipelines.beam.common import read_stage_metrics

    out = {}
    p = beam.Pipeline(options=_options(args))
    if True:  # build the stage's graph, then run it once
        if stage == "read_validate":
            from pipelines.beam.validate_records import DEAD, ValidateInteractions, ValidateItems

            items = p | "ReadItems" >> beam.io.ReadFromParquet(str(work / "items" / "part-*.parquet"))
            inter = p | "ReadInteractions" >> beam.io.ReadFromParquet(str(work / "interactions" / "part-*.parquet"))
            vi = items | "ValidateItems" >> ValidateItems(None, "exists", False)
            vx = inter | "ValidateInteractions" >> ValidateInteractions(vi["items"])
            _ = (vi["items"] | "ItemRows" >> beam.Map(lambda r: {k: r.get(k) for k in ("item_id", "title", "text")})
                 | "WriteItems" >> beam.io.WriteToParquet(
                     str(work / "valid_items"), pa.schema([("item_id", pa.int64()), ("title", pa.string()),
                                                            ("text", pa.string())]), file_name_suffix=".parquet"))
            _ = (vx["interactions"] | "InterRows" >> beam.Map(
                lambda r: {k: r[k] for k in ("user_id", "item_id", "ts", "label")})
                 | "WriteInteractions" >> beam.io.WriteToParquet(
                     str(work / "valid_interactions"),
                     pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("ts", pa.int64()),
                                ("label", pa.float32())]), file_name_suffix=".parquet"))
            _ = (vi[DEAD], vx[DEAD]) | "Dead" >> beam.Flatten() | "CountDead" >> beam.combiners.Count.Globally()
        elif stage == "mine_pairs":
            from pipelines.mining.collab import CollabConfig
            from pipelines.mining.pairs import PairConfig
            from pipelines.beam.mine_pairs import MinePairs

            cfg = PairConfig(trigger_similarity=args.trigger_similarity, trigger_fallback="none",
                             swing_max_users=args.swing_max_users, collab=CollabConfig(iterations=args.collab_iterations))
            inter = p | "Read" >> beam.io.ReadFromParquet(str(work / "valid_interactions*.parquet"))
            pairs = inter | "MinePairs" >> MinePairs(cfg)
            from pipelines.beam.write import write_pairs

            _ = pairs["train"] | "WriteTrain" >> write_pairs(str(work / "train_pairs"))
        elif stage == "embed":
            import functools

            from pipelines.encoder.config import EncoderConfig
            from pipelines.encoder.model_io import build_for_mode
            from pipelines.beam.embed_items import EmbedItems, encoder_handler
            from pipelines.beam.write import WriteEmbeddings

            cfg = EncoderConfig.named(args.encoder, **({"vision": "none"} if args.encoder == "tiny" else {}))
            handler = encoder_handler(encoder_factory=functools.partial(build_for_mode, "unaligned", cfg),
                                      batch_size=64, num_threads=1)
            items = (p | "Read" >> beam.io.ReadFromParquet(str(work / "valid_items*.parquet"))
                     | "Contract" >> beam.Map(lambda r: {**r, "image_uri": None}))
            emb = items | "Embed" >> EmbedItems(handler, cfg, None, "embed")
            _ = emb["embeddings"] | "Write" >> WriteEmbeddings(str(work / "embeddings"), cfg.embed_dim)
        elif stage == "quantize":
            from pipelines.beam.quantize_items import QuantConfig, QuantizeItems
            from pipelines.beam.write import WriteCodes

            emb = (p | "Read" >> beam.io.ReadFromParquet(str(work / "embeddings*.parquet"))
                   | "ToPairs" >> beam.Map(lambda r: (int(r["item_id"]), r["embedding"])))
            codes = emb | "Quantize" >> QuantizeItems(QuantConfig(rq_levels=3, vq_k=25,
                                                                  vq_gather_max=args.vq_gather_max,
                                                                  vq_index=args.vq_index),
                                                      ivf_file=str(work / "vq_ivf.safetensors"))
            _ = codes | "WriteCodes" >> WriteCodes(str(work / "codes"))
        else:
            raise ValueError(f"unknown stage {stage!r}")
        result = p.run()
        result.wait_until_finish()
    out["stages"] = read_stage_metrics(result)
    return out


def child(args) -> None:
    t0 = time.perf_counter()
    res = run_stage(args.stage, Path(args.work), args)
    res["seconds_in_process"] = round(time.perf_counter() - t0, 3)
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    res["peak_rss_children_mb"] = round(children, 1)  # SDK worker processes (FnApiRunner multi_processing)
    print("STAGE " + json.dumps(res))


def _cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stage_process(stage: str, work: Path, args, timeout: int, tree: Path = REPO) -> dict:
    """Run one stage in a child process with the code of `tree` (this checkout, or --baseline-tree's)."""
    cmd = [sys.executable, str(tree / "bench" / "scale.py"), "--stage", stage, "--work", str(work),
           "--runner", args.runner, "--workers", str(args.workers), "--encoder", args.job_encoder,
           "--trigger-similarity", args.trigger_similarity, "--swing-max-users", str(args.swing_max_users),
           "--collab-iterations", str(args.collab_iterations), "--vq-gather-max", str(args.vq_gather_max),
           "--vq-index", args.vq_index]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tree))
    t0, cpu0 = time.perf_counter(), _cpu_seconds_of_children()
    try:
        proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s", "seconds": None, "peak_rss_mb": None}
    wall = time.perf_counter() - t0
    # CPU time of the child and the SDK worker processes it waited for: less sensitive than wall time to other
    # jobs sharing the machine
    cpu = round(_cpu_seconds_of_children() - cpu0, 2)
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "seconds": round(wall, 2),
                "cpu_seconds": cpu, "peak_rss_mb": None}
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("STAGE "))
    res = json.loads(line[len("STAGE "):])
    return {"ok": True, "seconds": round(wall, 2), "seconds_in_process": res["seconds_in_process"], "cpu_seconds": cpu,
            "peak_rss_mb": max(res["peak_rss_mb"], res["peak_rss_children_mb"]),
            "counts": {k: {"in": v["in"], "out": v["out"]} for k, v in res["stages"].items()}}


BASELINE = "mine_pairs_baseline"  # mine_pairs run with --baseline-tree's code on the same data


def growth(sizes: dict, field: str = "seconds") -> dict:
    """Ratio of `field` per 10x items for every stage, between consecutive sizes (scaled to exactly 10x)."""
    out = {}
    ns = sorted(int(n) for n in sizes)
    for stage in STAGES + (BASELINE,):
        ratios = {}
        for a, b in zip(ns, ns[1:]):
            sa, sb = sizes[str(a)]["stages"].get(stage, {}), sizes[str(b)]["stages"].get(stage, {})
            if sa.get("ok") and sb.get("ok") and sa.get(field) and sb.get(field):
                per10 = (sb[field] / sa[field]) ** (1.0 / math.log10(b / a))
                ratios[f"{a}->{b}"] = round(per10, 2)
        if ratios:
            out[stage] = ratios
    return out


def _cell(r: dict | None) -> str:
    if not r:
        return "-"
    if not r.get("ok"):
        return f"failed: {r.get('error')}"
    return f"{r['seconds']:.1f} s ({r.get('cpu_seconds', 0):.0f} CPU s) / {r['peak_rss_mb']:,.0f} MB"


def before_after_table(result: dict) -> str:
    """Markdown table: mine_pairs with --baseline-tree's code (before) and this checkout's (after), per size."""
    rows = ["| items (events) | before: baseline tree | after: this tree |", "|---|---|---|"]
    for n, entry in sorted(result["sizes"].items(), key=lambda kv: int(kv[0])):
        rows.append(f"| {int(n):,} ({entry['data']['events']:,}) | {_cell(entry['stages'].get(BASELINE))} | "
                    f"{_cell(entry['stages'].get('mine_pairs'))} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="catalog sizes (items)")
    ap.add_argument("--runner", default="BundleBasedDirectRunner", help="Beam runner of every stage")
    ap.add_argument("--workers", type=int, default=1, help="FnApiRunner worker processes (multi_processing)")
    ap.add_argument("--job-encoder", default="tiny", help="encoder of the embed stage (tiny: text-only, small)")
    ap.add_argument("--trigger-similarity", choices=("collab", "swing"), default="collab")
    ap.add_argument("--swing-max-users", type=int, default=1000)
    ap.add_argument("--collab-iterations", type=int, default=4)
    ap.add_argument("--vq-gather-max", type=int, default=200_000)
    ap.add_argument("--vq-index", choices=("flat", "ivf"), default="flat",
                    help="faiss index over a gathered VQ base (ivf: approximate, for large gathered catalogs)")
    ap.add_argument("--baseline-tree", default=None,
                    help="a checkout of the code to compare with (e.g. `git worktree add /tmp/base main`): "
                         "mine_pairs also runs with its code on the same data, before this checkout's")
    ap.add_argument("--baseline-max-items", type=int, default=None,
                    help="run the baseline only up to this catalog size (main needs ~20 GB and is OOM-killed at "
                         "100k items: do not take the machine down to prove it again)")
    ap.add_argument("--hot-item-users", type=int, default=0, help="add one item consumed by this many users")
    ap.add_argument("--stages", default=",".join(STAGES), help="stages to run, in order (later ones need earlier)")
    ap.add_argument("--embed-items", type=int, default=4096, help="items of the real-encoder embed comparison (0: skip)")
    ap.add_argument("--embed-encoder", default="minilm-effnet", help="encoder of the embed comparison")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per stage process")
    ap.add_argument("--work-root", default=None, help="where data and stage outputs go (default: a temp folder)")
    ap.add_argument("--json", action="store_true")
    # child mode (one stage in this process)
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--encoder", default="tiny", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        child(args)
        return {}

    import logging

    logging.basicConfig(level=logging.WARNING)
    root = Path(args.work_root) if args.work_root else Path(tempfile.mkdtemp(prefix="qarm-scale-"))
    result = {"bench": "scale", "cpu_count": os.cpu_count(), "runner": args.runner, "workers": args.workers,
              "job_encoder": args.job_encoder, "trigger_similarity": args.trigger_similarity,
              "swing_max_users": args.swing_max_users, "hot_item_users": args.hot_item_users, "sizes": {}}
    for n in [int(s) for s in args.sizes.split(",") if s.strip() and int(s) > 0]:
        work = root / f"n{n}"
        t0 = time.perf_counter()
        data = generate(n, work, hot_item_users=args.hot_item_users)
        entry = {"data": data, "generate_seconds": round(time.perf_counter() - t0, 2), "stages": {}}
        print(f"[{n} items] {data['users']} users, {data['events']} events (generated in "
              f"{entry['generate_seconds']} s)", flush=True)
        for stage in [s for s in STAGES if s in args.stages.split(",")]:
            if stage == "mine_pairs" and args.baseline_tree and (args.baseline_max_items is None
                                                                 or n <= args.baseline_max_items):
                r = stage_process(stage, work, args, args.timeout, tree=Path(args.baseline_tree).resolve())
                entry["stages"][BASELINE] = r
                print(f"[{n} items] {BASELINE:<14} {_cell(r)}", flush=True)
            r = stage_process(stage, work, args, args.timeout)
            entry["stages"][stage] = r
            print(f"[{n} items] {stage:<14} {_cell(r)}", flush=True)
            if not r["ok"]:
                break
        result["sizes"][str(n)] = entry
    result["growth"] = growth(result["sizes"])
    result["growth_cpu"] = growth(result["sizes"], "cpu_seconds")
    for stage, ratios in result["growth"].items():
        print(f"growth per 10x items, {stage}: wall {ratios}, CPU {result['growth_cpu'].get(stage)} (target <= 12)")
    if args.baseline_tree:
        print(before_after_table(result))
    if args.embed_items:
        from bench.pipeline import embed_comparison

        e = embed_comparison(args.embed_encoder, args.embed_items, 64, 1, 64, root)
        result["embed_vs_torch"] = e
        print(f"embed stage ({e['encoder']}, {e['items']} items): Beam/torch time ratio {e['beam_overhead_ratio']} "
              f"(torch {e['torch_seconds']} s, Beam {e['beam_seconds']} s; target <= 1.2)")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
