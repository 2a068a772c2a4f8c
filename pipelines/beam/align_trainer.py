"""The alignment trainer as its own program: reads the shards a job wrote, trains one process or data-parallel.

    python -m pipelines.beam.align_trainer --cache DIR --train-pairs PATH [--valid-pairs PATH] \\
        --config align_config.json --out DIR [--json]
    torchrun --standalone --nproc_per_node 4 -m pipelines.beam.align_trainer ...     # DDP: gloo CPU, nccl GPU

Inputs are what the cascade job (or anyone) wrote: the pairs as Parquet (a file, a folder of part files or a glob:
``left, right[, source, ts, weight]``), the validation window's next-item queries (``query, target``: the judge of
the never-worse gate), the unaligned embedding's base map, the AlignConfig as JSON (``AlignConfig.to_dict``;
``batch_size`` is the *global* batch, split over the ranks), and either the frozen MLLM's hidden-state cache (side modes:
``pipelines.encoder.cache``, safetensors shards + manifest) or the items table (full / adapters: ``--items`` Parquet
and ``--image-root``). Rank 0 writes the checkpoints into ``--out`` and ``--out/result.json`` (atomically) last:
the job waits for that file's process to exit 0, then loads the checkpoint.

Memory bound: every rank holds the cache of the items it trains on (``cache.bytes_per_item()`` x items, 19.5 KB
per item pooled for minilm-effnet) and the pair table (~40 bytes per pair); the global batch's embeddings are
gathered (B x D floats).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def read_pairs(path: str) -> pd.DataFrame:
    """A pair table from a Parquet file, a folder of part files or a glob (rows sorted so the pair order, and so
    the seeded batches, do not depend on how a runner sharded the write)."""
    from pipelines.data.io import table_files
    from pipelines.mining.pairs import PAIR_COLUMNS

    files = table_files(Path(path))
    frames = [pd.read_parquet(f) for f in files]
    pairs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PAIR_COLUMNS)
    missing = {"left", "right"} - set(pairs.columns)
    if missing:
        raise ValueError(f"{path}: pair table lacks column(s) {sorted(missing)} (has {list(pairs.columns)})")
    keys = [c for c in PAIR_COLUMNS if c in pairs.columns]
    return pairs.sort_values(keys, kind="stable").reset_index(drop=True)


def read_queries(path: str) -> pd.DataFrame:
    """The validation window's next-item queries (query, target) from a Parquet file, folder or glob (sorted, so
    the judge's figures do not depend on how a runner sharded the write)."""
    from pipelines.data.io import table_files

    frames = [pd.read_parquet(f) for f in table_files(Path(path))]
    queries = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["query", "target"])
    missing = {"query", "target"} - set(queries.columns)
    if missing:
        raise ValueError(f"{path}: query table lacks column(s) {sorted(missing)} (has {list(queries.columns)})")
    return queries.astype({"query": "int64", "target": "int64"}).sort_values(["query", "target"], kind="stable") \
        .reset_index(drop=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.beam.align_trainer",
                                description="Train the aligned encoder from pair and item shards (torchrun-ready).")
    p.add_argument("--config", type=Path, required=True, help="AlignConfig JSON (AlignConfig.to_dict)")
    p.add_argument("--train-pairs", required=True, help="Parquet file / folder / glob of training pairs")
    p.add_argument("--valid-pairs", default=None, help="validation pairs (the judge without --valid-queries, else a "
                                                        "diagnostic); optional")
    p.add_argument("--valid-queries", default=None,
                   help="next-item queries (query, target) of the protocol's validation window, Parquet file / folder "
                        "/ glob: the judge of early stopping and of the never-worse gate (step 0 vs every epoch)")
    p.add_argument("--base-map", type=Path, default=None,
                   help="the unaligned embedding's base map (pipelines.encoder.base_map safetensors) the residual "
                        "starts from (default: the AlignConfig's base_map; ignored with --init-checkpoint)")
    p.add_argument("--cache", type=Path, default=None, help="side modes: the hidden-state cache folder")
    p.add_argument("--items", type=Path, default=None, help="full / adapters: the items Parquet table")
    p.add_argument("--image-root", type=Path, default=None, help="full / adapters: image folder of the items")
    p.add_argument("--encoder-config", type=Path, default=None, help="full / adapters: EncoderConfig JSON")
    p.add_argument("--init-checkpoint", type=Path, default=None, help="warm start")
    p.add_argument("--out", type=Path, required=True, help="checkpoints + result.json")
    p.add_argument("--json", action="store_true", help="print the result as JSON (rank 0)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Train; returns the result summary (every rank; rank 0 writes it)."""
    from feature_store.io import atomic_write_json, dumps_strict
    from pipelines.encoder.alignment import AlignConfig, train_alignment, train_side
    from pipelines.encoder.base_map import load_base_map
    from pipelines.encoder.distributed import Communicator

    args = parser().parse_args(argv)
    cfg = AlignConfig.from_dict(json.loads(args.config.read_text()))
    comm = Communicator.from_env(cfg.device)
    if comm.distributed and cfg.device.startswith("cuda"):  # one GPU per rank
        cfg = dataclasses.replace(cfg, device=str(comm.device))
    try:
        train = read_pairs(args.train_pairs)
        valid = read_pairs(args.valid_pairs) if args.valid_pairs else None
        queries = read_queries(args.valid_queries) if args.valid_queries else None
        base = load_base_map(args.base_map)[0] if args.base_map else None
        if cfg.mode in ("side", "side-towers"):
            from pipelines.encoder.cache import load_cache

            if args.cache is None:
                raise ValueError(f"mode {cfg.mode} trains on a hidden-state cache: pass --cache DIR")
            cache = load_cache(args.cache)
            if cache is None:
                raise FileNotFoundError(f"--cache {args.cache}: no complete cache (manifest.json) there")
            result = train_side(cache, train, valid, cfg, args.out, init_checkpoint=args.init_checkpoint, comm=comm,
                                valid_queries=queries, base=base)
        else:
            from types import SimpleNamespace

            from pipelines.encoder.config import EncoderConfig

            if args.items is None or args.encoder_config is None:
                raise ValueError(f"mode {cfg.mode} runs the encoder: pass --items PARQUET and --encoder-config JSON")
            items = pd.read_parquet(args.items).sort_values("item_id").reset_index(drop=True)
            dataset = SimpleNamespace(items=items, image_root=args.image_root, name="shards")
            enc = EncoderConfig.from_dict(json.loads(args.encoder_config.read_text()))
            result = train_alignment(enc, dataset, train, cfg, args.out, init_checkpoint=args.init_checkpoint,
                                     valid_pairs=valid, comm=comm, valid_queries=queries, base=base)
        summary = {**result.summary(), "losses": [float(x) for x in result.losses], "world_size": comm.world_size,
                   "config": cfg.to_dict()}
        comm.barrier()
        if comm.is_main:
            atomic_write_json(args.out / RESULT_FILE, summary)
            if args.json:
                print(dumps_strict(summary))
        return summary
    finally:
        comm.close()


def launch(nproc: int, argv: Sequence[str], threads_per_proc: Optional[int] = None, timeout: Optional[float] = None
           ) -> dict:
    """Run the trainer in child processes (``torch.distributed.run --standalone``) and return rank 0's result.

    Args:
        nproc: processes on this machine (1: one plain child process).
        argv: the trainer's flags (``--out`` among them).
        threads_per_proc: OMP / torch threads of each child.
    Raises:
        RuntimeError naming the exit code and the tail of the children's output when training fails.
    """
    out = Path(argv[list(argv).index("--out") + 1])
    result_file = out / RESULT_FILE
    if result_file.exists():
        result_file.unlink()  # a stale result must never stand for this run
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipelines.beam.align_trainer", *argv]
    else:
        cmd = [sys.executable, "-m", "pipelines.beam.align_trainer", *argv]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    if threads_per_proc:
        env["OMP_NUM_THREADS"] = str(threads_per_proc)
    log.info("align: launching %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]).strip()
        raise RuntimeError(f"alignment trainer ({nproc} process(es)) exited with code {proc.returncode}; "
                           f"{'no ' + str(result_file) if not result_file.is_file() else ''}\n{tail}")
    return json.loads(result_file.read_text())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
