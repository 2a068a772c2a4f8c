"""Alignment modes side by side: full / adapters / side on the same items, pairs and optimizer steps.

Per mode: trainable parameters, one-off cache seconds (side: the single MLLM pass), seconds per epoch, seconds
per epoch amortised (cache seconds spread over the epochs actually run), peak RSS, and next-item recall@10 on the
protocol's test window (for each test positive, the catalog ranked by similarity to the same user's previous
positive). Each mode runs in its own process (``--worker MODE``) so its peak RSS is its own; ratios are against
``full`` from the same run (IISAN's anchor: 20x faster epochs, 15x less GPU memory than full fine-tuning).

    .venv/bin/python bench/align.py --json                                   # synthetic, a few minutes on CPU
    .venv/bin/python bench/align.py --dataset movielens --data ../shared/data/movielens --max-items 300 --json

``--stages`` instead times the side-mode job's MLLM stages on the dataset, before and after issue 12: before, the
job built the side cache, then ran the backbones again for the aligned embedding (RunInference) and once more for
the unaligned one; after, the cache is the only pass and every embedding (aligned, unaligned, text, image) comes
from it. Both paths run here on the same trained side network:

    .venv/bin/python bench/align.py --stages --dataset movielens --max-items 0 --json

``--sweep`` chooses side-mode defaults on the protocol's validation window from one cache (base map, learning rate,
temperature, graph vs batch masking, pair sources; epochs by early stopping; each setting's weights are the ones the
never-worse gate ships: step 0, the unaligned embedding, unless an epoch beats it), then reports the chosen
setting's next-item recall@10 and MRR on the test window once, against the unaligned embedding:

    .venv/bin/python bench/align.py --sweep --dataset movielens --max-items 0 --cache-dir /tmp/ml-side-cache --json

Protocol: global time split (valid 10%, test 10%); pairs are mined on the train window only, the latest 10% of
them (by time) are held as validation pairs (reported, not used to stop: every mode runs exactly ``--steps``
optimizer steps); next-item queries come from the test window.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("full", "adapters", "side")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic", choices=("synthetic", "movielens"))
    p.add_argument("--data", type=Path, default=None, help="movielens folder, or the synthetic image cache")
    p.add_argument("--n-items", type=int, default=300, help="synthetic catalog size")
    p.add_argument("--n-users", type=int, default=300, help="synthetic users")
    p.add_argument("--n-events", type=int, default=20000, help="synthetic interactions")
    p.add_argument("--max-items", type=int, default=300, help="movielens: most popular N poster items (0 = all)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=40, help="optimizer steps, the same for every mode")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--encoder", default="minilm-effnet")
    p.add_argument("--encoder-image-size", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", action="store_true", help="time the side job's stages (one pass vs three)")
    p.add_argument("--side-epochs", type=int, default=6, help="--stages: side training epochs")
    p.add_argument("--sweep", action="store_true", help="choose side defaults on validation pairs")
    p.add_argument("--cache-dir", type=Path, default=None, help="--sweep: side cache folder (reused when it fits)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _load(args):
    from pipelines.data import load_dataset
    from pipelines.data.schema import DataSpec
    from pipelines.jobs.align import cap_items

    if args.dataset == "synthetic":
        spec = DataSpec(dataset="synthetic", data=str(args.data) if args.data else None, n_items=args.n_items,
                        n_users=args.n_users, n_events=args.n_events, seed=args.seed)
        return load_dataset(spec)
    data = args.data or REPO.parent / "shared" / "data" / "movielens"
    ds = load_dataset(DataSpec(dataset="movielens", data=str(data), require_image=True, seed=args.seed))
    return cap_items(ds, args.max_items) if args.max_items else ds


def worker(args) -> dict:
    """One mode, in this process. Returns the mode's row."""
    import numpy as np
    import torch

    from feature_store.split import time_split
    from pipelines.encoder.alignment import AlignConfig, split_valid_pairs, train_alignment
    from pipelines.encoder.config import EncoderConfig
    from pipelines.encoder.embed_catalog import embed_catalog
    from pipelines.encoder.retrieval_eval import next_item_queries, next_item_recall, pair_retrieval
    from pipelines.encoder.items import ItemCatalog
    from pipelines.encoder.onepass import embed_from_cache
    from pipelines.mining.pairs import PairConfig, mine_pairs

    torch.set_num_threads(args.threads)
    mode = args.worker
    ds = _load(args)
    train_i, _, _ = time_split(ds.interactions, "global", valid_frac=0.1, test_frac=0.1)
    pairs = mine_pairs(train_i, PairConfig(heldout_frac=0.0, seed=args.seed))
    train_pairs, valid_pairs = split_valid_pairs(pairs.train, 0.1)
    n_batches = math.ceil(len(train_pairs) / args.batch_size)
    enc_cfg = EncoderConfig.named(args.encoder, image_size=args.encoder_image_size, seed=args.seed)
    cfg = AlignConfig(mode=mode, epochs=math.ceil(args.steps / n_batches), max_steps=args.steps,
                      batch_size=args.batch_size, temperature=args.temperature, seed=args.seed, patience=None,
                      num_threads=args.threads, device=args.device, progress=False, resume=False)
    catalog = ItemCatalog.from_dataset(ds, enc_cfg, cache_images=mode != "side")
    t0 = time.perf_counter()
    result = train_alignment(enc_cfg, ds, train_pairs, cfg, catalog=catalog)
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    unaligned = None
    if mode == "side":
        tables = embed_from_cache(result.encoder, result.cache, progress=False)
        ids, emb = tables["aligned"]
        unaligned = tables["unaligned"]
    else:
        ids, emb, _ = embed_catalog(result.encoder, ds, batch_size=64, progress=False, catalog=catalog)
    embed_seconds = time.perf_counter() - t0
    inter = ds.interactions
    positive = (inter["label"] > 0.5).to_numpy()
    pos = inter[positive].reset_index(drop=True)
    test_ts = time_split(ds.interactions, "global", valid_frac=0.1, test_frac=0.1)[2]["ts"]
    test_mask = pos["ts"].to_numpy() >= (test_ts.min() if len(test_ts) else np.inf)
    queries = next_item_queries(pos, test_mask)
    rec = next_item_recall(ids, emb, queries, k=10)
    epochs_run = result.steps / n_batches  # fractional when the steps end mid-epoch
    row = {
        "trainable_params": int(result.trainable_params), "total_params": int(result.total_params),
        "cache_seconds": float(result.cache_seconds), "seconds_per_epoch": float(result.seconds_per_epoch),
        "seconds_per_epoch_amortised": float(result.seconds_per_epoch + result.cache_seconds / max(epochs_run, 1e-9)),
        "peak_rss_mb": float(result.peak_memory_mb), "next_item_recall@10": rec["recall@10"],
        "n_next_item_queries": rec["n_queries"], "steps": int(result.steps), "epochs_run": round(epochs_run, 3),
        "train_seconds": train_seconds, "embed_seconds": embed_seconds,
        "valid_pair_recall@10": pair_retrieval(ids, emb, valid_pairs, ks=(10,))["recall@10"]
        if len(valid_pairs) else None,
        "n_items": int(len(ds.items)), "n_pairs_train": int(len(train_pairs)), "n_pairs_valid": int(len(valid_pairs)),
        "loss_first": float(np.mean(result.losses[:5])), "loss_last": float(np.mean(result.losses[-5:])),
    }
    if unaligned is not None:
        row["unaligned_next_item_recall@10"] = next_item_recall(*unaligned, queries, k=10)["recall@10"]
    return row


def _side_setup(args):
    """What --stages and --sweep share: the data, the global split, the pairs of the train portion (the miner's
    later train-portion pairs as validation pairs), the next-item queries of the validation and test windows, the
    encoder config. Returns (dataset, queries {"valid", "test"}, train pairs, valid pairs, EncoderConfig)."""
    from feature_store.split import SplitConfig, split_labels
    from pipelines.encoder.config import EncoderConfig
    from pipelines.encoder.retrieval_eval import next_item_queries
    from pipelines.mining.pairs import PairConfig, mine_pairs

    ds = _load(args)
    part = split_labels(ds.interactions, SplitConfig("global", valid_frac=0.1, test_frac=0.1))
    pairs = mine_pairs(ds.interactions[part == 0].reset_index(drop=True), PairConfig(heldout_frac=0.1))
    positive = (ds.interactions["label"] >= 0.5).to_numpy()
    queries = {w: next_item_queries(ds.interactions[positive], (part == code)[positive])
               for w, code in (("valid", 1), ("test", 2))}
    enc_cfg = EncoderConfig.named(args.encoder, image_size=args.encoder_image_size, seed=args.seed)
    return ds, queries, pairs.train, pairs.heldout, enc_cfg


def stages(args) -> dict:
    """Side-mode job stages, seconds: one backbone pass (now) against three (before issue 12)."""
    import torch

    from pipelines.encoder.alignment import AlignConfig, train_side
    from pipelines.encoder.embed_catalog import embed_catalog
    from pipelines.encoder.items import ItemCatalog
    from pipelines.encoder.model_io import build_for_mode
    from pipelines.encoder.onepass import build_mllm_cache, embed_from_cache

    torch.set_num_threads(args.threads)
    ds, queries, train_pairs, valid_pairs, enc_cfg = _side_setup(args)
    side_encoder = build_for_mode("side", enc_cfg)
    catalog = ItemCatalog.from_dataset(ds, enc_cfg, cache_images=False)
    t = {}
    t0 = time.perf_counter()
    cache = build_mllm_cache(side_encoder, catalog, progress=False)
    t["cache"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = train_side(cache, train_pairs, valid_pairs,
                        AlignConfig(mode="side", epochs=args.side_epochs, batch_size=128, progress=False,
                                    temperature=args.temperature, seed=args.seed), model=side_encoder,
                        valid_queries=queries["valid"])
    t["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    embed_from_cache(result.encoder, cache, progress=False)
    t["embed_from_cache"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    embed_catalog(result.encoder, ds, batch_size=64, progress=False)
    t["embed_aligned_pass"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    embed_catalog(build_for_mode("unaligned", enc_cfg), ds, batch_size=64, progress=False)
    t["embed_unaligned_pass"] = time.perf_counter() - t0
    before = t["cache"] + t["train"] + t["embed_aligned_pass"] + t["embed_unaligned_pass"]
    after = t["cache"] + t["train"] + t["embed_from_cache"]
    return {"bench": "align-stages", "dataset": args.dataset, "n_items": int(len(ds.items)),
            "encoder": args.encoder, "image_size": args.encoder_image_size, "threads": args.threads,
            "seconds": t, "before_seconds": before, "after_seconds": after, "speedup": before / after,
            "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "cache_bytes_per_item": cache.bytes_per_item(), "cache_mb": cache.nbytes() / 2 ** 20}


SWEEP_GRID = ([{}, {"base_map": "gaussian"}, {"lr": 3e-4}, {"lr": 3e-3}, {"temperature": 0.05},
               {"temperature": 0.2}, {"mask": "batch"}, {"sources": ("swing",)}, {"sources": ("u2i",)}])


def sweep(args) -> dict:
    """Side-mode settings (each one change from the default) judged on the validation window (one cache); the
    chosen one evaluated once on the test window."""
    import torch

    from pipelines.encoder.alignment import AlignConfig, train_side
    from pipelines.encoder.retrieval_eval import next_item_recall
    from pipelines.encoder.items import ItemCatalog
    from pipelines.encoder.onepass import build_mllm_cache, embed_from_cache

    torch.set_num_threads(args.threads)
    ds, queries, train_pairs, valid_pairs, enc_cfg = _side_setup(args)
    cache = build_mllm_cache(enc_cfg, ItemCatalog.from_dataset(ds, enc_cfg, cache_images=False),
                             cache_dir=args.cache_dir, progress=False)
    rows = []
    for setting in SWEEP_GRID:
        cfg = AlignConfig(**{"mode": "side", "epochs": args.side_epochs, "patience": 2, "batch_size": 128,
                             "seed": args.seed, "progress": False, "base_map": "pca", **setting})
        try:
            result = train_side(cache, train_pairs, valid_pairs, cfg, valid_queries=queries["valid"])
        except ValueError as exc:  # e.g. a pair source this log has no pairs of
            print(f"[sweep] {setting}: skipped ({exc})", file=sys.stderr, flush=True)
            continue
        gate = result.alignment
        shipped = gate["valid_next_item"]["best"]
        rows.append({"setting": {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()},
                     "valid_recall@10": shipped["recall@10"], "valid_mrr": shipped["mrr"], "kept": gate["kept"],
                     "step0_valid_recall@10": gate["valid_next_item"]["step0"]["recall@10"],
                     "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "model": result.encoder})
        print(f"[sweep] {setting or 'default'}: valid R@10 {shipped['recall@10']:.4f} mrr {shipped['mrr']:.4f} "
              f"kept {gate['kept']} (epoch {result.best_epoch})", file=sys.stderr, flush=True)
    chosen = max(rows, key=lambda r: (r["valid_recall@10"], r["valid_mrr"]))
    tables = embed_from_cache(chosen["model"], cache, progress=False)
    test = {k: {m: next_item_recall(*tables[k], queries["test"], k=10)[m] for m in ("recall@10", "mrr")}
            for k in ("aligned", "unaligned")}
    for r in rows:
        r.pop("model")
    return {"bench": "align-sweep", "dataset": args.dataset, "n_items": int(len(ds.items)),
            "n_pairs_train": int(len(train_pairs)), "n_pairs_valid": int(len(valid_pairs)),
            "n_valid_queries": int(len(queries["valid"])), "settings": rows,
            "chosen": {k: v for k, v in chosen.items() if k != "model"},
            "test_next_item": test, "n_test_queries": int(len(queries["test"]))}


def run_mode(mode: str, argv: list) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", mode]
    print(f"[bench/align] {mode} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench/align: mode {mode} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def ratio(a, b):
    return a / b if a and b else None


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    return obj


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(_clean(worker(args))))
        return 0
    if args.sweep:
        report = sweep(args)
        for r in report["settings"]:
            print(f"  {json.dumps(r['setting']) if r['setting'] else 'default':<34} valid R@10 "
                  f"{r['valid_recall@10']:.4f}  mrr {r['valid_mrr']:.4f}  kept {r['kept']} (epoch {r['best_epoch']}; "
                  f"step 0 {r['step0_valid_recall@10']:.4f})")
        print(f"chosen {report['chosen']['setting'] or 'default'}; test next-item {report['test_next_item']}")
        if args.json:
            print(json.dumps(_clean(report)))
        return 0
    if args.stages:
        report = stages(args)
        print(f"{report['n_items']} items, {args.encoder} @ {args.encoder_image_size}px, {args.threads} thread(s)")
        for name, secs in report["seconds"].items():
            print(f"  {name:<22} {secs:8.1f} s")
        print(f"before (cache + train + aligned pass + unaligned pass): {report['before_seconds']:.1f} s; "
              f"after (cache + train + embed from cache): {report['after_seconds']:.1f} s "
              f"({report['speedup']:.2f}x); cache {report['cache_bytes_per_item']:.0f} bytes/item")
        if args.json:
            print(json.dumps(_clean(report)))
        return 0
    passthrough = [a for a in argv if a != "--json"]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"full", "adapters", "side", "side-towers"})
    if unknown:
        raise SystemExit(f"bench/align: unknown modes {unknown}")
    rows = {mode: run_mode(mode, passthrough) for mode in modes}
    full = rows.get("full")
    vs_full = {}
    if full:
        for mode, row in rows.items():
            if mode != "full":
                vs_full[mode] = {
                    "epoch_speedup": ratio(full["seconds_per_epoch"], row["seconds_per_epoch"]),
                    "epoch_speedup_amortised": ratio(full["seconds_per_epoch_amortised"],
                                                     row["seconds_per_epoch_amortised"]),
                    "memory_reduction": ratio(full["peak_rss_mb"], row["peak_rss_mb"]),
                    "recall@10_relative": ratio(row["next_item_recall@10"], full["next_item_recall@10"]),
                }
    report = {"bench": "align", "dataset": args.dataset, "device": args.device, "threads": args.threads,
              "encoder": args.encoder, "image_size": args.encoder_image_size, "steps": args.steps,
              "batch_size": args.batch_size, "modes": rows, "vs_full": vs_full}
    print(f"{'mode':<9} {'trainable':>10} {'cache s':>8} {'s/epoch':>9} {'amort.':>9} {'peak MB':>8} "
          f"{'R@10 next':>9}")
    for mode, r in rows.items():
        rec = r["next_item_recall@10"]
        print(f"{mode:<9} {r['trainable_params']:>10d} {r['cache_seconds']:>8.1f} {r['seconds_per_epoch']:>9.2f} "
              f"{r['seconds_per_epoch_amortised']:>9.2f} {r['peak_rss_mb']:>8.0f} "
              f"{rec if rec is None else round(rec, 4):>9}")
    if "side" in rows and rows["side"].get("unaligned_next_item_recall@10") is not None:
        print(f"unaligned MLLM (same cache): R@10 next {rows['side']['unaligned_next_item_recall@10']:.4f}")
    for mode, v in vs_full.items():
        fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
        print(f"{mode} vs full: {fmt(v['epoch_speedup'], '.1f')}x faster per epoch "
              f"({fmt(v['epoch_speedup_amortised'], '.1f')}x amortised), {fmt(v['memory_reduction'], '.2f')}x less "
              f"peak RSS, recall@10 at {fmt(None if v['recall@10_relative'] is None else 100 * v['recall@10_relative'], '.0f')}% of full")
    if args.json:
        print(json.dumps(_clean(report)))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
