"""The align stage: train (or reuse) the aligned item encoder on the mined train pairs.

Side mode (the default) is one backbone pass per job: the workers run the frozen MLLM once per item into a
sharded hidden-state cache (pipelines.beam.side_cache.BuildSideCache; shards reused across runs when their
fingerprint matches, e.g. the cascade seeds of `qarm eval`), the side network trains on the cache
(`align_on_cache`), and the workers read every embedding the version needs (aligned, unaligned, text-only,
image-only) from the same cache (EmbedFromCache). full / adapters keep their own passes (RunInference over the
trained checkpoint; `align_stage`). Training itself is `pipelines.beam.align_trainer` over the files the
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
from pipelines.beam.plan import AlignPlan
from pipelines.beam.common import counter, stage_timer

log = logging.getLogger("pipelines.jobs.cascade")


def _dataset_view(items: list[dict], image_root: Optional[str]):
    """A minimal Dataset-shaped object (items, image_root) for the encoder's trainer."""
    from types import SimpleNamespace

    frame = pd.DataFrame(items).drop(columns=["_row"], errors="ignore").sort_values("item_id").reset_index(drop=True)
    return SimpleNamespace(items=frame, image_root=Path(image_root) if image_root else None, name="cascade")


def one_pass(plan: AlignPlan) -> bool:
    """Whether this job embeds from the side cache (BuildSideCache / EmbedFromCache) instead of running
    RunInference."""
    return plan.mode == "side" and not plan.checkpoint


def align_stage(_, items, train_files, plan: AlignPlan, image_root: Optional[str], out_dir: str,
                work_dir: str, valid_files=(), query_files=(), base_map: Optional[str] = None):
    """Align step of full / adapters / a reused checkpoint: train (or reuse) the encoder, copy it to `out_dir`.

    The trainer is its own program over files (pipelines.beam.align_trainer): the pairs come as the Parquet files
    the graph wrote, the items as the side cache (side mode) or an items table; with ``plan.nproc`` > 1 it runs
    as that many data-parallel processes (torch.distributed.run, gloo / nccl), else in this worker.

    Args:
        items: validated item dicts (side input: the catalog the cache / items table is built from).
        train_files: the training pairs' Parquet file names (side input; written by WriteTrainPairs).
        valid_files: MinePairs' later train-portion pairs (a diagnostic of every epoch; WriteHeldoutPairs).
        query_files: the validation window's next-item queries (WriteValidQueries): the judge of early stopping
            and of the never-worse gate (every epoch against step 0, the unaligned embedding).
        base_map: the unaligned embedding's base map file (None: the trainer's Gaussian map of the plan's seed).
        plan: AlignPlan.
        image_root: the dataset's image root.
        out_dir: where the aligned checkpoint goes (the staging version's ``encoder/``).
        work_dir: scratch for training (trainer inputs, optimizer state, side cache: not part of the version).
    Returns:
        `out_dir` (RunInference loads the aligned model from it).
    """
    from pipelines.encoder.checkpoint import resolve_checkpoint

    with stage_timer("align"):
        counter("align", "in").inc(_rows(train_files))
        if plan.checkpoint:
            source = resolve_checkpoint(Path(plan.checkpoint))
            log.info("align: reusing checkpoint %s", source)
        else:
            inputs = Path(work_dir) / TRAINER_INPUT
            inputs.mkdir(parents=True, exist_ok=True)
            items_file = inputs / "items.parquet"
            atomic_write_parquet(items_file, pa.Table.from_pandas(_dataset_view(items, image_root).items,
                                                                  preserve_index=False))
            train_dir = _run_trainer(plan, _align_config(plan), train_files, valid_files, Path(work_dir),
                                     items_file=items_file, image_root=image_root, query_files=query_files,
                                     base_map=base_map)
            source = resolve_checkpoint(train_dir)
        _copy_checkpoint(source, Path(out_dir))
        counter("align", "out").inc(1)
    return out_dir


def _copy_checkpoint(source: Path, out_dir: Path) -> None:
    """The version keeps the weights and their config, not optimizer state or caches."""
    out_dir.mkdir(parents=True, exist_ok=False)
    for name in ("config.json", "model.safetensors", "trainer_state.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir / name)


TRAINER_INPUT = "align_input"  # work_dir/align_input: the trainer's config / encoder / items files
TRAINER_OUT = "align"  # work_dir/align: the trainer's checkpoints and result.json


def _rows(files) -> int:
    import pyarrow.parquet as pq

    return int(sum(pq.ParquetFile(f).metadata.num_rows for f in files))


def _align_config(plan: AlignPlan, mode: Optional[str] = None):
    from pipelines.encoder.alignment import AlignConfig
    from pipelines.encoder.side import SideConfig

    extra = {k: v for k, v in (("lr", plan.lr), ("temperature", plan.temperature)) if v}
    if plan.gate_z is not None:
        extra["gate_z"] = plan.gate_z
    return AlignConfig(mode=mode or plan.mode, epochs=plan.epochs, batch_size=plan.batch_size, seed=plan.seed,
                       num_threads=max(1, plan.threads // plan.nproc), progress=False, resume=False,
                       side=SideConfig(layer_stride=plan.layer_stride, dropout=plan.side_dropout),
                       unaligned_seed=plan.seed, **extra)


def _run_trainer(plan: AlignPlan, cfg, train_files, valid_files, work_dir: Path, cache_dir: Optional[Path] = None,
                 items_file: Optional[Path] = None, image_root: Optional[str] = None, query_files=(),
                 base_map: Optional[str] = None) -> Path:
    """Write the trainer's inputs, run it (in this process or ``plan.nproc`` processes); returns its out dir."""
    from feature_store.io import atomic_write_json
    from pipelines.beam.align_trainer import launch, main

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
    if query_files and _rows(query_files):
        argv += ["--valid-queries", *map(str, query_files)]
    if base_map:
        argv += ["--base-map", str(base_map)]
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


def align_on_cache(_, cache_dir: str, train_files, plan: AlignPlan, out_dir: str, work_dir: str, valid_files=(),
                   query_files=(), base_map: Optional[str] = None):
    """Align step of side mode: train the side network on the hidden-state cache BuildSideCache wrote (the
    trainer reads the cache, the pair and query files and the base map; no item or pair travels as a side input).
    Copies the checkpoint (the weights the gate chose: step 0's when no epoch beat it) to `out_dir` and returns
    it (EmbedFromCache loads it once per worker)."""
    from pipelines.encoder.checkpoint import resolve_checkpoint

    with stage_timer("align"):
        counter("align", "in").inc(_rows(train_files))
        train_dir = _run_trainer(plan, _align_config(plan, "side"), train_files, valid_files, Path(work_dir),
                                 cache_dir=Path(cache_dir), query_files=query_files, base_map=base_map)
        _copy_checkpoint(resolve_checkpoint(train_dir), Path(out_dir))
        counter("align", "out").inc(1)
    return out_dir


def alignment_record(plan: AlignPlan, work_dir: Path) -> dict:
    """``manifest.metrics.alignment``: the trainer's gate record (kept, judge, step 0 vs best figures), or why
    there is none (a reused checkpoint is not trained)."""
    import json

    if plan.checkpoint:
        return {"kept": None, "judge": None, "reason": f"--align-checkpoint {plan.checkpoint}: reused as it is, "
                                                       "not trained"}
    result = Path(work_dir) / TRAINER_OUT / "result.json"
    if not result.is_file():
        raise FileNotFoundError(f"{result}: the align step left no trainer result")
    return json.loads(result.read_text())["alignment"]


def side_cache_dir(plan: AlignPlan, work_dir: str) -> str:
    """Where side mode's hidden-state cache lives (reused across runs when its shards match)."""
    return str(plan.cache_dir) if plan.cache_dir else str(Path(work_dir) / "side_cache")
