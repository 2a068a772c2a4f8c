"""The align stage: train (or reuse) the aligned item encoder on the mined train pairs.

Side mode (the default) is one backbone pass per job: the frozen MLLM runs once per item into a sharded
hidden-state cache (reused across runs when its fingerprint matches, e.g. the cascade seeds of `qarm eval`), the
side network trains on the cache, and every embedding the version needs (aligned, unaligned, text-only,
image-only) is read from the same cache (pipelines.mllm.onepass). full / adapters keep their own passes
(RunInference over the trained checkpoint). Training itself is `pipelines.mllm.shard_trainer` over the files the
graph wrote (pair Parquet files, the cache or an items table): in this worker, or `--align-nproc` data-parallel
processes on its machine (torch.distributed.run; gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

import pandas as pd
import pyarrow as pa

from feature_store.io import atomic_write_parquet
from pipelines.cascade.plan import AlignPlan
from pipelines.transforms.common import counter, stage_timer

log = logging.getLogger("pipelines.cascade")


def _dataset_view(items: list[dict], image_root: Optional[str]):
    """A minimal Dataset-shaped object (items, image_root) for the encoder's trainer."""
    from types import SimpleNamespace

    frame = pd.DataFrame(items).drop(columns=["_row"], errors="ignore").sort_values("item_id").reset_index(drop=True)
    return SimpleNamespace(items=frame, image_root=Path(image_root) if image_root else None, name="cascade")


ONEPASS_DIR = "onepass"  # work_dir/onepass/item_embeddings{,_unaligned}.parquet: read back by the graph
MODALITY_TABLES = ("text", "image")  # written straight into the staged version
NONFINITE = "nonfinite.json"  # {kind: [item ids whose embedding was not finite]}


def one_pass(plan: AlignPlan) -> bool:
    """Whether this job embeds from the side cache (trained here) instead of running RunInference."""
    return plan.mode == "side" and not plan.checkpoint


def align_stage(_, items, train_files, plan: AlignPlan, image_root: Optional[str], out_dir: str,
                work_dir: str, valid_files=()):
    """Align step: train (or reuse) the aligned encoder and copy its checkpoint to `out_dir`.

    The trainer is its own program over files (pipelines.mllm.shard_trainer): the pairs come as the Parquet files
    the graph wrote, the items as the side cache (side mode) or an items table; with ``plan.nproc`` > 1 it runs
    as that many data-parallel processes (torch.distributed.run, gloo / nccl), else in this worker.

    Args:
        items: validated item dicts (side input: the catalog the cache / items table is built from).
        train_files: the training pairs' Parquet file names (side input; written by WriteTrainPairs).
        valid_files: MinePairs' later train-portion pairs (early stopping; WriteHeldoutPairs).
        plan: AlignPlan.
        image_root: the dataset's image root.
        out_dir: where the aligned checkpoint goes (the staging version's ``encoder/``).
        work_dir: scratch for training (trainer inputs, optimizer state, side cache: not part of the version).
    Returns:
        `out_dir` (RunInference loads the aligned model from it).
    """
    from pipelines.mllm.checkpoint import resolve_checkpoint

    with stage_timer("align"):
        counter("align", "in").inc(_rows(train_files))
        if plan.checkpoint:
            source = resolve_checkpoint(Path(plan.checkpoint))
            log.info("align: reusing checkpoint %s", source)
        elif one_pass(plan):
            source = _side_one_pass(items, train_files, valid_files, plan, image_root, Path(out_dir).parent,
                                    Path(work_dir))
        else:
            inputs = Path(work_dir) / TRAINER_INPUT
            inputs.mkdir(parents=True, exist_ok=True)
            items_file = inputs / "items.parquet"
            atomic_write_parquet(items_file, pa.Table.from_pandas(_dataset_view(items, image_root).items,
                                                                  preserve_index=False))
            train_dir = _run_trainer(plan, _align_config(plan), train_files, valid_files, Path(work_dir),
                                     items_file=items_file, image_root=image_root)
            source = resolve_checkpoint(train_dir)
        # the version keeps the weights and their config, not optimizer state or caches
        Path(out_dir).mkdir(parents=True, exist_ok=False)
        for name in ("config.json", "model.safetensors", "trainer_state.json"):
            if (source / name).is_file():
                shutil.copy2(source / name, Path(out_dir) / name)
        counter("align", "out").inc(1)
    return out_dir


TRAINER_INPUT = "align_input"  # work_dir/align_input: the trainer's config / encoder / items files
TRAINER_OUT = "align"  # work_dir/align: the trainer's checkpoints and result.json


def _rows(files) -> int:
    import pyarrow.parquet as pq

    return int(sum(pq.ParquetFile(f).metadata.num_rows for f in files))


def _align_config(plan: AlignPlan, mode: Optional[str] = None):
    from pipelines.mllm.align import AlignConfig
    from pipelines.mllm.side import SideConfig

    extra = {k: v for k, v in (("lr", plan.lr), ("temperature", plan.temperature)) if v}
    return AlignConfig(mode=mode or plan.mode, epochs=plan.epochs, batch_size=plan.batch_size, seed=plan.seed,
                       num_threads=max(1, plan.threads // plan.nproc), progress=False, resume=False,
                       side=SideConfig(layer_stride=plan.layer_stride, dropout=plan.side_dropout), **extra)


def _run_trainer(plan: AlignPlan, cfg, train_files, valid_files, work_dir: Path, cache_dir: Optional[Path] = None,
                 items_file: Optional[Path] = None, image_root: Optional[str] = None) -> Path:
    """Write the trainer's inputs, run it (in this process or ``plan.nproc`` processes); returns its out dir."""
    from feature_store.io import atomic_write_json
    from pipelines.mllm.shard_trainer import launch, main

    inputs = work_dir / TRAINER_INPUT
    inputs.mkdir(parents=True, exist_ok=True)
    atomic_write_json(inputs / "align_config.json", cfg.to_dict())
    atomic_write_json(inputs / "encoder_config.json", plan.encoder)
    train_dir = work_dir / TRAINER_OUT
    shutil.rmtree(train_dir, ignore_errors=True)  # scratch: a stale step folder must not stand for this run
    argv = ["--config", str(inputs / "align_config.json"), "--out", str(train_dir),
            "--train-pairs", *map(str, train_files)]
    if valid_files and _rows(valid_files):
        argv += ["--valid-pairs", *map(str, valid_files)]
    if cache_dir is not None:
        argv += ["--cache", str(cache_dir)]
    if items_file is not None:
        argv += ["--items", str(items_file), "--encoder-config", str(inputs / "encoder_config.json")]
        if image_root:
            argv += ["--image-root", str(image_root)]
    if plan.init_encoder:
        argv += ["--init-checkpoint", str(plan.init_encoder)]
    if plan.nproc > 1:
        result = launch(plan.nproc, argv, threads_per_proc=cfg.num_threads)
    else:
        result = main(argv)
    log.info("align: %d process(es), %s", result["world_size"],
             {k: v for k, v in result.items() if k not in ("losses", "config", "valid")})
    return train_dir


def _side_one_pass(items, train_files, valid_files, plan: AlignPlan, image_root: Optional[str], staging: Path,
                   work_dir: Path) -> Path:
    """Cache the frozen MLLM once, train the side network on it, write every embedding from the same cache.

    Returns the checkpoint folder (copied into the version by the caller)."""
    import time

    import numpy as np
    import torch

    from feature_store.io import atomic_write_json
    from pipelines.mllm.align import load_side_head
    from pipelines.mllm.checkpoint import resolve_checkpoint
    from pipelines.mllm.config import EncoderConfig
    from pipelines.mllm.items import ItemCatalog
    from pipelines.mllm.onepass import build_mllm_cache, embed_from_cache, write_embedding_tables
    from pipelines.mllm.side import SideConfig

    torch.set_num_threads(plan.threads)
    enc_cfg = EncoderConfig.from_dict(plan.encoder)
    catalog = ItemCatalog.from_dataset(_dataset_view(items, image_root), enc_cfg, cache_images=False)
    cache_dir = Path(plan.cache_dir) if plan.cache_dir else work_dir / "side_cache"
    t0 = time.perf_counter()
    with stage_timer("align", "cache", total=False):
        cache = build_mllm_cache(enc_cfg, catalog, side=SideConfig(layer_stride=plan.layer_stride),
                                 cache_dir=cache_dir, progress=False)
    log.info("align: side cache of %d items %s in %.1fs (%s)", len(cache),
             "built" if getattr(cache, "built", True) else "reused", time.perf_counter() - t0, cache_dir)
    with stage_timer("align", "train", total=False):
        train_dir = _run_trainer(plan, _align_config(plan, "side"), train_files, valid_files, work_dir,
                                 cache_dir=cache_dir)
    torch.set_num_threads(plan.threads)
    _, head = load_side_head(cache, resolve_checkpoint(train_dir))
    with stage_timer("align", "embed", total=False):
        tables = embed_from_cache(head, cache, unaligned_seed=plan.seed, progress=False)
        finite, bad = {}, {}
        for kind, (ids, emb) in tables.items():  # a non-finite row goes to the dead letter, not into a table
            ok = np.isfinite(emb).all(axis=1)
            finite[kind], bad[kind] = (ids[ok], emb[ok]), ids[~ok].tolist()
        write_embedding_tables({k: v for k, v in finite.items() if k in ("aligned", "unaligned")},
                               work_dir / ONEPASS_DIR)
        write_embedding_tables({k: v for k, v in finite.items() if k in MODALITY_TABLES}, staging)
        atomic_write_json(work_dir / ONEPASS_DIR / NONFINITE, bad)
    return resolve_checkpoint(train_dir)
