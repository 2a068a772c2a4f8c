"""Benchmark of the cascade job (issue 5). Prints figures, and with --json one JSON line last.

In one run:
1. embed stage: items/s through Beam's DirectRunner (RunInference + the encoder's ModelHandler, with image decode)
   vs a bare batched torch loop (`pipelines.encoder.embed_catalog.embed_items`) over the same encoder and items; the ratio is
   the Beam overhead (target <= 20%, i.e. beam_seconds / torch_seconds <= 1.2);
2. whole-job wall time and peak RSS (`qarm pipeline` in a child process, DirectRunner) per catalog: MovieLens
   posters (when --movielens is given) and synthetic catalogs of --sizes items, to show how cost grows.

    .venv/bin/python bench/pipeline.py --json                                          # full: 10k and 100k
    .venv/bin/python bench/pipeline.py --sizes 500 --embed-items 256 --encoder tiny --json   # quick
    .venv/bin/python bench/pipeline.py --movielens ../shared/data/movielens --sizes 10000 --json
"""
from __future__ import annotations

import argparse
import functools
import json
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


def embed_comparison(encoder_name: str, n_items: int, batch_size: int, threads: int, image_size: int,
                     work: Path) -> dict:
    """Same encoder, same items: bare torch loop vs Beam RunInference (DirectRunner)."""
    import apache_beam as beam
    import torch
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.data import DataSpec, load_dataset
    from pipelines.encoder.config import EncoderConfig
    from pipelines.encoder.embed_catalog import embed_items
    from pipelines.encoder.items import ItemCatalog
    from pipelines.encoder.model_io import build_for_mode
    from pipelines.beam.embed_items import EmbedItems, encoder_handler

    torch.set_num_threads(threads)
    ds = load_dataset(DataSpec(n_items=n_items, n_users=max(10, n_items // 10), n_events=n_items * 5,
                               n_clusters=min(16, n_items), data=work / "embed-img"))
    overrides = {"image_size": image_size} if image_size else {}
    cfg = EncoderConfig.named(encoder_name, **overrides)
    factory = functools.partial(build_for_mode, "unaligned", cfg)

    encoder = factory()
    catalog = ItemCatalog.from_dataset(ds, cfg)
    t0 = time.perf_counter()
    ids, _, _ = embed_items(encoder, catalog, batch_size=batch_size)
    torch_s = time.perf_counter() - t0

    items = ds.items.assign(_row=range(len(ds.items))).to_dict("records")
    opts = PipelineOptions(["--runner", "DirectRunner", "--direct_num_workers", "1"])
    t0 = time.perf_counter()
    with beam.Pipeline(options=opts) as p:
        out = (p | "Items" >> beam.Create(items)
               | "Embed" >> EmbedItems(encoder_handler(encoder_factory=factory, batch_size=batch_size,
                                                       num_threads=threads), cfg, str(ds.image_root)))
        _ = out["embeddings"] | "Count" >> beam.combiners.Count.Globally()
    beam_s = time.perf_counter() - t0
    n = len(ids)
    return {"encoder": encoder_name, "items": n, "batch_size": batch_size, "threads": threads,
            "torch_seconds": round(torch_s, 3), "beam_seconds": round(beam_s, 3),
            "torch_items_per_s": round(n / torch_s, 2), "beam_items_per_s": round(n / beam_s, 2),
            "beam_overhead_ratio": round(beam_s / torch_s, 3), "target_ratio": 1.2,
            "meets_target": beam_s / torch_s <= 1.2}


def whole_job(label: str, data_args: list, job_args: list, work: Path, timeout: int) -> dict:
    """`qarm pipeline` in a child process; wall time, its peak RSS and the per-stage seconds."""
    store = work / f"store-{label}"
    code = ("import json, resource, sys; from pipelines.jobs.cascade import run; "
            "s = run(sys.argv[1:], save_main_session=False); "
            "print('BENCH ' + json.dumps({'stages': s['stages'], 'version': s['version'], "
            "'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
    cmd = [sys.executable, "-c", code, *data_args, *job_args, "--store", str(store), "--runner", "DirectRunner"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"catalog": label, "ok": False, "error": proc.stderr.strip().splitlines()[-1:] or ["?"]}
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("BENCH "))
    res = json.loads(line[len("BENCH "):])
    stages = res["stages"]
    items = stages.get("validate_items", {}).get("out")
    return {"catalog": label, "ok": True, "items": items, "wall_seconds": round(wall, 1),
            "peak_rss_mb": round(res["rss_mb"], 1),
            "stage_seconds": {k: v["seconds"] for k, v in stages.items() if v.get("seconds")}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="minilm-effnet", help="named encoder config")
    ap.add_argument("--encoder-image-size", type=int, default=64, help="encoder input pixels (0: config's)")
    ap.add_argument("--embed-items", type=int, default=1000, help="items in the embed-stage comparison")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--sizes", default="10000,100000", help="synthetic catalog sizes for the whole-job runs")
    ap.add_argument("--movielens", type=Path, default=None, help="folder with ml-latest-small/ and posters/")
    ap.add_argument("--job-encoder", default="tiny",
                    help="encoder of the whole-job runs (tiny isolates the job's own scaling from model cost)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per whole-job run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="qarm-bench-"))
    result = {"bench": "pipeline", "cpu_count": os.cpu_count()}
    result["embed"] = embed_comparison(args.encoder, args.embed_items, args.batch_size, args.threads,
                                       args.encoder_image_size, work)
    e = result["embed"]
    print(f"embed stage ({e['encoder']}, {e['items']} items): torch loop {e['torch_items_per_s']} items/s, "
          f"Beam DirectRunner {e['beam_items_per_s']} items/s, Beam/torch time ratio {e['beam_overhead_ratio']} "
          f"(target <= 1.2: {'met' if e['meets_target'] else 'NOT met'})")
    job = ["--encoder", args.job_encoder, "--align-epochs", "1", "--torch-threads", str(args.threads)]
    runs = []
    if args.movielens:
        runs.append(("movielens-posters", ["--dataset", "movielens", "--data", str(args.movielens),
                                           "--require-image"]))
    for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
        runs.append((f"synthetic-{size}", ["--n-items", str(size), "--n-users", str(max(50, size // 4)),
                                           "--n-events", str(size * 20), "--data", str(work / f"img-{size}")]))
    result["jobs"] = []
    for label, data_args in runs:
        r = whole_job(label, data_args, job, work, args.timeout)
        result["jobs"].append(r)
        if r["ok"]:
            print(f"whole job {label}: {r['items']} items, {r['wall_seconds']} s wall, peak RSS {r['peak_rss_mb']} MB")
        else:
            print(f"whole job {label}: FAILED {r['error']}")
    ok = [r for r in result["jobs"] if r["ok"]]
    if len(ok) >= 2:  # growth of cost with catalog size, relative to the smallest run
        base = ok[0]
        for r in ok[1:]:
            r["items_ratio_vs_first"] = round(r["items"] / base["items"], 2)
            r["wall_ratio_vs_first"] = round(r["wall_seconds"] / base["wall_seconds"], 2)
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
