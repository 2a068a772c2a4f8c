"""Alignment modes side by side: trainable share, seconds per epoch, peak memory, held-out recall@10.

Each mode runs `qarm align` in its own process (so peak RSS belongs to that mode alone) on the same data, pairs
and encoder; figures are reported against `full` fine-tuning from the same run (ratios), as in the IISAN and VIP5
papers' anchors (IISAN: 47 GB -> 3 GB, 443 s -> 22 s per epoch; VIP5 adapters: -21% time, -18% memory).

    .venv/bin/python bench/align.py --max-items 300 --json                  # a few minutes on 2 CPU cores
    .venv/bin/python bench/align.py --data ../shared/data/movielens --max-items 0 --device cuda --json

Side-mode seconds per epoch exclude the one-off backbone pass that fills its cache (`cache_seconds`, reported
separately): that pass is the whole point of the design (run once, train many epochs). Full and adapter runs can
be capped with --max-steps; their seconds per epoch are then scaled from the steps run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("full", "adapters", "side")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="movielens")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "movielens")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--max-items", type=int, default=300, help="most popular N poster items (0 = all)")
    p.add_argument("--epochs", type=int, default=1, help="epochs for full and adapters")
    p.add_argument("--side-epochs", type=int, default=10, help="epochs for side (cheap once cached)")
    p.add_argument("--max-steps", type=int, default=None, help="cap full/adapters steps (s/epoch is scaled)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--encoder", default="minilm-effnet")
    p.add_argument("--encoder-image-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/qarm-bench-align"))
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def run_mode(mode: str, args) -> dict:
    epochs = args.side_epochs if mode == "side" else args.epochs
    cmd = [sys.executable, "-m", "pipelines.cli", "align", "--dataset", args.dataset, "--data", str(args.data),
           "--require-image", "--mode", mode, "--epochs", str(epochs), "--batch-size", str(args.batch_size),
           "--encoder", args.encoder, "--encoder-image-size", str(args.encoder_image_size),
           "--threads", str(args.threads), "--device", args.device, "--seed", str(args.seed), "--no-resume",
           "--out", str(args.out / mode), "--json"]
    if args.max_items:
        cmd += ["--max-items", str(args.max_items)]
    if args.max_steps and mode != "side":
        cmd += ["--max-steps", str(args.max_steps)]
    print(f"[bench/align] {mode}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0 or not result.get("ok"):
        raise SystemExit(f"bench/align: mode {mode} failed (exit {proc.returncode}): {result.get('error')}")
    return result


def ratio(a, b):
    return a / b if a and b else None


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = {}
    for mode in modes:
        r = run_mode(mode, args)
        rows[mode] = {
            "trainable_share": r["trainable_share"], "trainable_params": r["trainable_params"],
            "seconds_per_epoch": r["seconds_per_epoch"], "cache_seconds": r["cache_seconds"],
            "peak_memory_mb": r["peak_memory_mb"], "epochs": r["epochs"], "steps": r["steps"],
            "recall@10_aligned": r["recall@10_aligned"], "recall@10_unaligned": r["recall@10_unaligned"],
            "mrr_aligned": r["mrr_aligned"], "mrr_unaligned": r["mrr_unaligned"],
            "n_items": r["n_items"], "n_pairs_train": r["n_pairs_train"], "n_pairs_heldout": r["n_pairs_heldout"],
        }
    full = rows.get("full")
    vs_full = {}
    if full:
        for mode, row in rows.items():
            if mode == "full":
                continue
            vs_full[mode] = {
                "epoch_speedup": ratio(full["seconds_per_epoch"], row["seconds_per_epoch"]),
                "memory_reduction": ratio(full["peak_memory_mb"], row["peak_memory_mb"]),
                "recall@10_relative": ratio(row["recall@10_aligned"], full["recall@10_aligned"]),
            }
    report = {"bench": "align", "dataset": args.dataset, "device": args.device, "threads": args.threads,
              "max_items": args.max_items, "encoder": args.encoder, "image_size": args.encoder_image_size,
              "modes": rows, "vs_full": vs_full}
    print(f"{'mode':<9} {'train%':>7} {'s/epoch':>9} {'cache s':>8} {'peak MB':>8} {'R@10 al':>8} {'R@10 un':>8}")
    for mode, row in rows.items():
        print(f"{mode:<9} {100 * row['trainable_share']:>6.2f}% {row['seconds_per_epoch']:>9.2f} "
              f"{row['cache_seconds']:>8.1f} {row['peak_memory_mb']:>8.0f} {row['recall@10_aligned']:>8.4f} "
              f"{row['recall@10_unaligned']:>8.4f}")
    for mode, v in vs_full.items():
        print(f"{mode} vs full: {v['epoch_speedup']:.1f}x faster per epoch, {v['memory_reduction']:.2f}x less peak "
              f"memory, recall@10 at {100 * (v['recall@10_relative'] or 0):.0f}% of full")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
