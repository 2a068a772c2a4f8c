"""The QARM batch job (`qarm pipeline`, `python -m pipelines.cascade`): sources -> a published feature-store version.

One Beam pipeline, every step labelled::

    ReadItems / ReadInteractions (Parquet snapshot of the loaded source)
      -> ValidateItems / ValidateInteractions (bad records -> dead letter, merged with the loader's rejects)
      -> MinePairs (Swing + trigger->target pairs, time-split held-out set)
      -> Align (one worker runs the trainer; --align_checkpoint reuses one)
      -> EmbedAligned / EmbedUnaligned (RunInference + the encoder's PyTorch ModelHandler)
      -> Quantize* (RQ fit on a hashed sample on one worker; encode in parallel, codebooks as side input;
                    VQ = faiss k-NN in parallel batches)
      -> Write* (beam.io.parquetio into the store's private staging folder)
    then, in the driver: metrics (codebooks, held-out pair recall aligned vs unaligned) and an atomic publish
    (manifest + checksums, CURRENT flipped). Any failure discards the staging folder: CURRENT stays where it was.

The stages are module-level functions / PTransforms so the retraining job (issue 7) can reuse them with a warm
start (`--init_encoder`, `--init_quantizer`, or `build_graph(..., JobPlan)` directly).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import apache_beam as beam
import numpy as np
import pandas as pd
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from pipelines.pairs import PairConfig
from pipelines.transforms.common import count, counter, read_stage_metrics, stage_timer
from pipelines.transforms.options import CascadeOptions, cli_parser_flags, data_spec
from pipelines.transforms.quantize import QuantConfig

log = logging.getLogger("pipelines.cascade")

ACCEPTS_EXTRA_ARGS = True  # `qarm pipeline` passes unknown flags (Beam's own) through to PipelineOptions

EMB_FILE, CODES_FILE = "item_embeddings", "item_codes"
UNALIGNED = "_unaligned"


@dataclass(frozen=True)
class AlignPlan:
    """How the align stage gets its encoder.

    Args:
        encoder: the EncoderConfig (as a dict) the encoders are built from.
        mode: full | adapters | side.
        epochs, batch_size, lr, temperature: training settings (lr / temperature None: the trainer's defaults).
        checkpoint: reuse this aligned checkpoint (skip training).
        init_encoder: warm-start training from this checkpoint.
        threads: torch threads of the single align worker.
        seed: training seed.
    """

    encoder: dict
    mode: str = "side"
    epochs: int = 2
    batch_size: int = 128
    lr: Optional[float] = None
    temperature: Optional[float] = None
    checkpoint: Optional[str] = None
    init_encoder: Optional[str] = None
    threads: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("full", "adapters", "side"):
            raise ValueError(f"AlignPlan.mode must be full|adapters|side, got {self.mode!r}")
        for name in ("epochs", "batch_size", "threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AlignPlan.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint and not Path(self.checkpoint).exists():
            raise FileNotFoundError(f"--align_checkpoint {self.checkpoint}: no such checkpoint folder")


@dataclass(frozen=True)
class JobPlan:
    """Everything the graph needs, resolved in the driver (paths, configs)."""

    items_path: str
    interactions_path: str
    image_root: Optional[str]
    image_check: str
    require_image: bool
    staging: str
    work_dir: str
    pairs: PairConfig
    quant: QuantConfig
    align: AlignPlan
    embed_batch_size: int = 64
    unaligned: bool = True
    init_quantizer: Optional[str] = None
    loader_rejects: tuple = field(default_factory=tuple)
    align_hints: tuple = ()  # (name, value) Beam resource hints of the Align step


# ------------------------------------------------------------------------------------------------ align stage


def _dataset_view(items: list[dict], image_root: Optional[str]):
    """A minimal Dataset-shaped object (items, image_root) for the encoder's trainer."""
    from types import SimpleNamespace

    frame = pd.DataFrame(items).drop(columns=["_row"], errors="ignore").sort_values("item_id").reset_index(drop=True)
    return SimpleNamespace(items=frame, image_root=Path(image_root) if image_root else None, name="cascade")


def _pair_frame(rows) -> pd.DataFrame:
    from pipelines.pairs import PAIR_COLUMNS

    return pd.DataFrame(sorted(rows), columns=PAIR_COLUMNS)


def align_stage(_, items, train_pairs, plan: AlignPlan, image_root: Optional[str], out_dir: str,
                work_dir: str):
    """Single-worker stage: train (or reuse) the aligned encoder and copy its checkpoint to `out_dir`.

    Args:
        items: validated item dicts (side input).
        train_pairs: pair tuples from MinePairs (side input).
        plan: AlignPlan.
        image_root: the dataset's image root.
        out_dir: where the aligned checkpoint goes (the staging version's ``encoder/``).
        work_dir: scratch for training (optimizer state, side-network cache: not part of the version).
    Returns:
        `out_dir` (RunInference loads the aligned model from it).
    """
    import torch

    from pipelines.mllm.checkpoint import resolve_checkpoint

    with stage_timer("align"):
        counter("align", "in").inc(len(train_pairs))
        if plan.checkpoint:
            source = resolve_checkpoint(Path(plan.checkpoint))
            log.info("align: reusing checkpoint %s", source)
        else:
            from pipelines.mllm.align import AlignConfig, train_alignment
            from pipelines.mllm.config import EncoderConfig

            torch.set_num_threads(plan.threads)
            extra = {k: v for k, v in (("lr", plan.lr), ("temperature", plan.temperature)) if v}
            cfg = AlignConfig(mode=plan.mode, epochs=plan.epochs, batch_size=plan.batch_size, seed=plan.seed,
                              num_threads=plan.threads, progress=False, resume=False, **extra)
            train_dir = Path(work_dir) / "align"
            result = train_alignment(EncoderConfig.from_dict(plan.encoder), _dataset_view(items, image_root),
                                     _pair_frame(train_pairs), cfg, train_dir,
                                     init_checkpoint=Path(plan.init_encoder) if plan.init_encoder else None)
            log.info("align: %s", result.summary())
            source = resolve_checkpoint(train_dir)
        # the version keeps the weights and their config, not optimizer state or caches
        Path(out_dir).mkdir(parents=True, exist_ok=False)
        for name in ("config.json", "model.safetensors", "trainer_state.json"):
            if (source / name).is_file():
                shutil.copy2(source / name, Path(out_dir) / name)
        counter("align", "out").inc(1)
    return out_dir


# ------------------------------------------------------------------------------------------------ graph


def build_graph(p: beam.Pipeline, plan: JobPlan) -> dict:
    """Add every stage of the job to `p`. Returns the main PCollections (for tests and the retraining job)."""
    from pipelines.mllm.config import EncoderConfig
    from pipelines.mllm.model_io import build_for_mode
    from pipelines.transforms.embed import EmbedItems, encoder_handler
    from pipelines.transforms.pairs import MinePairs
    from pipelines.transforms.quantize import QuantizeItems
    from pipelines.transforms.validate import DEAD, ValidateInteractions, ValidateItems
    from pipelines.transforms.write import WriteCodes, WriteEmbeddings, WriteRejects

    staging = Path(plan.staging)
    enc_cfg = EncoderConfig.from_dict(plan.align.encoder)
    items = p | "ReadItems" >> beam.io.ReadFromParquet(plan.items_path)
    interactions = p | "ReadInteractions" >> beam.io.ReadFromParquet(plan.interactions_path)
    loader_rejects = p | "LoaderRejects" >> beam.Create(list(plan.loader_rejects))

    vi = items | "ValidateItems" >> ValidateItems(plan.image_root, plan.image_check, plan.require_image)
    vx = interactions | "ValidateInteractions" >> ValidateInteractions(vi["items"])
    pairs = (vx["interactions"] | "CountPairsIn" >> count("mine_pairs", "in")
             | "MinePairs" >> MinePairs(plan.pairs))
    _ = ((pairs["train"], pairs["heldout"]) | "AllPairs" >> beam.Flatten()
         | "CountPairsOut" >> count("mine_pairs", "out"))

    aligned_path = (p | "AlignTrigger" >> beam.Create([None])
                    | "Align" >> beam.Map(align_stage, beam.pvalue.AsList(vi["items"]),
                                          beam.pvalue.AsList(pairs["train"]),
                                          plan.align, plan.image_root, str(staging / "encoder"), plan.work_dir)
                    .with_resource_hints(**dict(plan.align_hints)))
    # the path is also the side input, so RunInference loads the model only after the align stage wrote it
    handler = encoder_handler(checkpoint=str(staging / "encoder"), batch_size=plan.embed_batch_size,
                              num_threads=plan.align.threads)
    emb = vi["items"] | "EmbedAligned" >> EmbedItems(handler, enc_cfg, plan.image_root, "embed",
                                                     model_path=aligned_path)
    codes = emb["embeddings"] | "Quantize" >> QuantizeItems(
        plan.quant, "quantize", save_dir=str(staging / "quantizer"),
        codebooks_file=str(staging / "codebooks.safetensors"), init_dir=plan.init_quantizer)
    _ = emb["embeddings"] | "WriteEmbeddings" >> WriteEmbeddings(str(staging / EMB_FILE), enc_cfg.embed_dim)
    _ = codes | "WriteCodes" >> WriteCodes(str(staging / CODES_FILE))
    dead = [loader_rejects, vi[DEAD], vx[DEAD], emb[DEAD]]
    out = {"items": vi["items"], "interactions": vx["interactions"], "pairs": pairs, "embeddings": emb,
           "codes": codes}
    if plan.unaligned:
        handler_u = encoder_handler(checkpoint=None, encoder_factory=functools.partial(
            build_for_mode, "unaligned", enc_cfg), batch_size=plan.embed_batch_size, num_threads=plan.align.threads,
            stage="embed_unaligned")
        emb_u = vi["items"] | "EmbedUnaligned" >> EmbedItems(handler_u, enc_cfg, plan.image_root, "embed_unaligned")
        codes_u = emb_u["embeddings"] | "QuantizeUnaligned" >> QuantizeItems(
            plan.quant, "quantize_unaligned", codebooks_file=str(staging / "codebooks_unaligned.safetensors"))
        _ = emb_u["embeddings"] | "WriteEmbeddingsUnaligned" >> WriteEmbeddings(
            str(staging / (EMB_FILE + UNALIGNED)), enc_cfg.embed_dim, stage="write_unaligned")
        _ = codes_u | "WriteCodesUnaligned" >> WriteCodes(str(staging / (CODES_FILE + UNALIGNED)),
                                                          stage="write_unaligned")
        # the unaligned embedder sees the same items; its image problems are already in the aligned dead letter
        dead.append(emb_u[DEAD] | "OnlyUnalignedNaN" >> beam.Filter(lambda r: r["reason"] == "nan_embedding"))
        out.update(embeddings_unaligned=emb_u, codes_unaligned=codes_u)
    dead_all = tuple(dead) | "DeadLetter" >> beam.Flatten()
    _ = dead_all | "WriteDeadLetter" >> WriteRejects(str(staging / "dead_letter"))
    out["dead_letter"] = dead_all
    return out


# ------------------------------------------------------------------------------------------------ driver


def _encoder_dict(opts: CascadeOptions, seed: int) -> dict:
    from pipelines.mllm.checkpoint import read_meta
    from pipelines.mllm.config import EncoderConfig

    if opts.align_checkpoint:  # the checkpoint's own encoder config wins: it decides preprocessing and width
        return dict(read_meta(Path(opts.align_checkpoint))["encoder"])
    overrides = {"seed": seed}
    if opts.embed_dim:
        overrides["embed_dim"] = opts.embed_dim
    if opts.encoder_image_size:
        overrides["image_size"] = opts.encoder_image_size
    return EncoderConfig.named(opts.encoder, **overrides).to_dict()


def make_plan(options: PipelineOptions, staging: Path, work_dir: Path, ds) -> JobPlan:
    """Resolve options + the loaded dataset into a JobPlan (validates every config before anything runs)."""
    from pipelines.transforms.report import snapshot
    from pipelines.transforms.common import reject

    opts = options.view_as(CascadeOptions)
    seed = data_spec(options).seed
    pairs = PairConfig(swing_top_n=opts.swing_top_n, swing_alpha=opts.swing_alpha, min_support=opts.min_support,
                       history=opts.trigger_history, heldout_frac=opts.heldout_frac, seed=seed)
    quant = QuantConfig(rq_levels=opts.rq_levels, rq_codebook_size=opts.rq_codebook_size,
                        fit_sample=opts.fit_sample, vq_k=opts.vq_k, vq_index=opts.vq_index, seed=seed)
    align = AlignPlan(encoder=_encoder_dict(opts, seed), mode=opts.align_mode, epochs=opts.align_epochs,
                      batch_size=opts.align_batch_size, lr=opts.align_lr, temperature=opts.align_temperature,
                      checkpoint=opts.align_checkpoint, init_encoder=opts.init_encoder, threads=opts.torch_threads,
                      seed=seed)
    if opts.init_quantizer and not Path(opts.init_quantizer).exists():
        raise FileNotFoundError(f"--init_quantizer {opts.init_quantizer}: no such folder")
    items_path = snapshot(ds.items, work_dir / "items.parquet")
    inter_path = snapshot(ds.interactions, work_dir / "interactions.parquet")
    loader_rejects = tuple(
        reject("read_sources", str(r.source), str(r.reason), row=None if pd.isna(r.row) else r.row,
               item_id=None if pd.isna(r.item_id) else r.item_id, user_id=None if pd.isna(r.user_id) else r.user_id,
               detail=str(r.detail), action=str(getattr(r, "action", "dropped")))
        for r in ds.rejects.itertuples(index=False))
    return JobPlan(items_path=str(items_path), interactions_path=str(inter_path),
                   image_root=str(ds.image_root) if ds.image_root else None,
                   image_check=ds.spec.validate_images if ds.spec else "header",
                   require_image=bool(ds.spec.require_image) if ds.spec else False,
                   staging=str(staging), work_dir=str(work_dir), pairs=pairs, quant=quant, align=align,
                   embed_batch_size=opts.embed_batch_size, unaligned=not opts.skip_unaligned,
                   init_quantizer=opts.init_quantizer, loader_rejects=loader_rejects,
                   align_hints=tuple((k, v) for k, v in (("min_ram", opts.align_min_ram),
                                                         ("accelerator", opts.align_accelerator)) if v))


def job_config(plan: JobPlan, spec, data_sha: str) -> dict:
    """The config stored in the manifest; its hash is the job's identity (no paths of this run in it)."""
    align = asdict(plan.align)
    align.pop("threads")
    for key in ("checkpoint", "init_encoder"):  # a reused checkpoint is identified by its content, not its path
        if align[key]:
            align[key] = _dir_sha(Path(align[key]))
    spec_dict = spec.to_dict()
    spec_dict.pop("data", None) if spec.dataset == "synthetic" else None  # synthetic: image cache path only
    return {"job": "qarm.cascade/1", "data": spec_dict, "data_sha256": data_sha, "pairs": plan.pairs.to_dict(),
            "encoder": plan.align.encoder, "align": align, "quantizer": plan.quant.to_dict(),
            "init_quantizer": _dir_sha(Path(plan.init_quantizer)) if plan.init_quantizer else None,
            "unaligned": plan.unaligned}


def _dir_sha(path: Path) -> str:
    from feature_store.io import sha256_file
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _post_metrics(staging: Path, plan: JobPlan, heldout: pd.DataFrame) -> dict:
    """Codebook metrics and held-out pair recall, from the staged tables themselves."""
    from feature_store.tables import read_codes, read_embeddings
    from pipelines.mllm.evaluate import pair_retrieval
    from pipelines.transforms.report import code_metrics
    from safetensors.numpy import load_file

    metrics = {}
    for suffix, name in (("", "aligned"), (UNALIGNED, "unaligned")):
        emb_file = staging / f"{EMB_FILE}{suffix}.parquet"
        if not emb_file.exists():
            continue
        ids, emb = read_embeddings(emb_file)
        codes = read_codes(staging / f"{CODES_FILE}{suffix}.parquet")
        books = load_file(str(staging / f"codebooks{suffix}.safetensors"))
        sizes = [books[f"rq.level{lvl}"].shape[0] for lvl in range(len(books))]
        metrics[f"codes_{name}"] = code_metrics(codes, sizes)
        metrics[f"heldout_{name}"] = pair_retrieval(ids, emb, heldout, ks=(10, 50))
    return metrics


def run_job(options: PipelineOptions, save_main_session: bool = True, test_pipeline=None) -> dict:
    """Run the whole job; returns the summary (per-stage counts/seconds, dead letter, metrics, version)."""
    from feature_store import FeatureStore
    from pipelines.data import load_dataset
    from pipelines.transforms.report import fingerprint

    t_job = time.perf_counter()
    opts = options.view_as(CascadeOptions)
    if not opts.store:
        raise ValueError("--store DIR is required (the feature store the job publishes into)")
    options.view_as(SetupOptions).save_main_session = save_main_session
    std = options.view_as(StandardOptions)
    if std.runner is None:
        std.runner = "DirectRunner"  # embedded default; Prism needs a download
    spec = data_spec(options)
    t0 = time.perf_counter()
    ds = load_dataset(spec)
    stages = {"read_sources": {"in": int(len(ds.items) + len(ds.interactions) + len(ds.rejects)),
                               "out": int(len(ds.items) + len(ds.interactions)), "rejected": int(len(ds.rejects)),
                               "seconds": round(time.perf_counter() - t0, 3)}}
    data_sha = fingerprint(ds.items, ds.interactions)
    own_work = opts.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="qarm-cascade-")) if own_work else Path(opts.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(opts.store)
    try:
        with store.stage() as st:
            plan = make_plan(options, st.path, work_dir, ds)
            config = job_config(plan, spec, data_sha)
            p = test_pipeline if test_pipeline is not None else beam.Pipeline(options=options)
            graph = build_graph(p, plan)
            heldout_file = work_dir / "heldout_pairs"
            from pipelines.transforms.write import write_pairs
            _ = graph["pairs"]["heldout"] | "WriteHeldoutPairs" >> write_pairs(str(heldout_file))
            _ = graph["pairs"]["train"] | "WriteTrainPairs" >> write_pairs(str(work_dir / "train_pairs"))
            t_run = time.perf_counter()
            result = p.run()
            state = result.wait_until_finish()
            if str(state).split(".")[-1] not in ("DONE", "None"):
                raise RuntimeError(f"pipeline ended in state {state}; nothing published")
            pipeline_seconds = round(time.perf_counter() - t_run, 3)
            stages.update(read_stage_metrics(result))
            t_pub = time.perf_counter()
            dead = pd.read_parquet(Path(st.path) / "dead_letter.parquet")
            dead_counts = {str(k): int(v) for k, v in dead["reason"].value_counts().sort_index().items()}
            heldout = pd.read_parquet(str(heldout_file) + ".parquet")
            train_n = len(pd.read_parquet(str(work_dir / "train_pairs") + ".parquet"))
            metrics = _post_metrics(Path(st.path), plan, heldout)
            metrics["pairs"] = {"train": int(train_n), "heldout": int(len(heldout))}
            metrics["dead_letter"] = dead_counts
            metrics["counts"] = {k: v for k, v in stages.items()}
            watermark = int(ds.interactions["ts"].max()) if len(ds.interactions) else None
            version = st.publish(config=config, metrics=metrics,
                                 extra={"watermark": watermark, "dataset": ds.name,
                                        "pipeline_seconds": pipeline_seconds})
            stages["publish"] = {"in": 1, "out": 1, "rejected": 0, "seconds": round(time.perf_counter() - t_pub, 3)}
    finally:
        if own_work:
            shutil.rmtree(work_dir, ignore_errors=True)
    summary = {
        "version": version.id, "store": str(Path(opts.store).resolve()), "config_sha256": version.manifest[
            "config_sha256"], "watermark": watermark, "dataset": ds.name, "runner": str(std.runner),
        "stages": stages, "dead_letter": dead_counts, "dead_letter_total": int(sum(dead_counts.values())),
        "metrics": {k: v for k, v in metrics.items() if k not in ("counts", "dead_letter")},
        "pipeline_seconds": pipeline_seconds, "seconds": round(time.perf_counter() - t_job, 3),
    }
    return summary


# ------------------------------------------------------------------------------------------------ entry points


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`qarm pipeline` flags (Beam's own flags pass through as unknown args)."""
    cli_parser_flags(parser)


def _options_from_namespace(args: argparse.Namespace) -> PipelineOptions:
    values = {k: v for k, v in vars(args).items() if k not in ("json", "extra_args", "command")}
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    return PipelineOptions(list(getattr(args, "extra_args", None) or []), **values)


def run(argv=None, save_main_session: bool = True, test_pipeline=None) -> dict:
    """Run the job.

    Args:
        argv: command-line flags (list), or the argparse Namespace of `qarm pipeline`.
        save_main_session: pickle the main session for remote workers (Beam convention).
        test_pipeline: a TestPipeline to build on instead of a new Pipeline.
    Returns:
        the job summary dict (also printed as JSON by `qarm pipeline --json`).
    """
    from pipelines.transforms.report import format_summary

    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        # an import may have configured the root logger at WARNING first; a long job should show its progress
        logging.getLogger().setLevel(logging.INFO)
    if isinstance(argv, argparse.Namespace):
        options = _options_from_namespace(argv)
    else:
        options = PipelineOptions(argv)
    summary = run_job(options, save_main_session=save_main_session, test_pipeline=test_pipeline)
    log.info("job summary:\n%s", format_summary(summary))
    return summary


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run(argv)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
