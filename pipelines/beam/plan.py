"""The cascade job's plan: every setting resolved in the driver before anything runs (configs validated, paths
fixed, the protocol's split applied to the source snapshot)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
from apache_beam.options.pipeline_options import PipelineOptions

from feature_store.split import SplitConfig
from pipelines.config.cascade import AlignSection, UserPromptsSection
from pipelines.mining.pairs import PairConfig
from pipelines.beam.options import cascade_config
from pipelines.beam.quantize_items import QuantConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignPlan:
    """How the align stage gets its encoder.

    Built from the config tree's align section (`pipelines.config.cascade.AlignSection`: the knobs' one home, so no
    defaults here).

    Args:
        encoder: the EncoderConfig (as a dict) the encoders are built from.
        mode: full | adapters | side.
        epochs, batch_size, lr, temperature: training settings (lr / temperature None: the trainer's defaults).
        checkpoint: reuse this aligned checkpoint (skip training).
        init_encoder: warm-start training from this checkpoint.
        threads: torch threads of the single align worker.
        seed: training seed.
        cache_dir: side mode: the frozen MLLM's hidden-state cache (reused when its fingerprint matches; default
            a folder in the work dir).
        layer_stride: side mode: keep every k-th backbone layer (group layer-dropping).
        side_dropout: side mode: dropout inside the side network while training.
        nproc: trainer processes (data-parallel, torch.distributed.run on the align worker); 1 trains in the
            worker itself. ``threads`` are shared out among them.
        base_map: the unaligned embedding's map (pipelines.encoder.base_map): "pca" (fitted on the protocol's
            train-portion items; needs side mode's cache) or "gaussian" (seeded by ``seed``). A warm start or a
            reused checkpoint keeps its own.
        gate_z: the never-worse gate's margin in paired standard errors (None: AlignConfig's default).
    """

    encoder: dict
    mode: str
    epochs: int
    batch_size: int
    lr: Optional[float]
    temperature: Optional[float]
    checkpoint: Optional[str]
    init_encoder: Optional[str]
    threads: int
    seed: int
    cache_dir: Optional[str]
    layer_stride: int
    side_dropout: float
    nproc: int
    base_map: str
    gate_z: Optional[float]

    def __post_init__(self):
        from pipelines.encoder.base_map import BASE_MAP_KINDS
        from pipelines.encoder.model_io import MODES

        if self.mode not in MODES:
            raise ValueError(f"AlignPlan.mode must be one of {MODES}, got {self.mode!r}")
        if self.base_map not in BASE_MAP_KINDS:
            raise ValueError(f"AlignPlan.base_map (--unaligned-map) must be one of {BASE_MAP_KINDS}, got "
                             f"{self.base_map!r}")
        if self.base_map == "pca" and (self.mode != "side" or self.checkpoint):
            raise ValueError(f"--unaligned-map pca is fitted on side mode's hidden-state cache; --align-mode "
                             f"{self.mode}{' with --align-checkpoint' if self.checkpoint else ''} has none: use "
                             "--unaligned-map gaussian")
        for name in ("epochs", "batch_size", "threads", "nproc"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AlignPlan.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint and not Path(self.checkpoint).exists():
            raise FileNotFoundError(f"--align-checkpoint {self.checkpoint}: no such checkpoint folder")
        for checkpoint in (self.checkpoint, self.init_encoder):
            if checkpoint:
                preflight_checkpoint(Path(checkpoint))


def preflight_checkpoint(path: Path) -> None:
    """Check, in the driver, the weight files an encoder checkpoint will load on the workers: its safetensors
    headers and the vision_weights file its config names. A wrong file is a WeightsFileError naming it before the
    job starts, not a worker's traceback (feature_store.weights)."""
    from feature_store.weights import check_safetensors
    from pipelines.encoder.checkpoint import read_meta, resolve_checkpoint
    from pipelines.encoder.towers import load_state_file

    step = resolve_checkpoint(path)
    for name in ("model.safetensors", "optimizer.safetensors"):
        if (step / name).is_file() or name == "model.safetensors":
            check_safetensors(step / name, "encoder")
    weights = (read_meta(step).get("encoder") or {}).get("vision_weights")
    if weights and not str(weights).startswith("pkg:"):  # installed packages are trusted files
        load_state_file(Path(weights))


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
    split: SplitConfig = SplitConfig()
    max_bad_fraction: Optional[float] = None  # the loader's share limit, checked again on the workers
    embed_batch_size: int = 64
    unaligned: bool = True
    init_quantizer: Optional[str] = None
    loader_rejects: tuple = field(default_factory=tuple)
    align_hints: tuple = ()  # (name, value) Beam resource hints of the Align step
    side_cache_shard_size: int = 4096  # items per hidden-state cache shard: one worker's unit of the backbone pass
    # the generic source read on the workers (`pipelines.beam.read_source`); None: the loader's snapshot
    # at items_path / interactions_path
    source: Optional[object] = None
    clock: Optional[object] = None  # the job's feature_store.clock.EventClock: later events are rejects
    # the user-prompt stage (--user-prompts; pipelines.beam.user_prompt_stage): None when off
    user_prompts: Optional[UserPromptsSection] = None


def encoder_dict(align: AlignSection, seed: int, has_images: bool = True) -> dict:
    """The job's encoder config; for a catalog without any image its text-only variant (`EncoderConfig.for_catalog`:
    no vision tower is built or loaded). A warm start (``--init-encoder``) follows its checkpoint instead."""
    from pipelines.encoder.checkpoint import read_meta
    from pipelines.encoder.config import EncoderConfig

    if align.align_checkpoint:  # the checkpoint's own encoder config wins: it decides preprocessing and width
        return dict(read_meta(Path(align.align_checkpoint))["encoder"])
    overrides = {"seed": seed}
    if align.embed_dim:
        overrides["embed_dim"] = align.embed_dim
    if align.encoder_image_size:
        overrides["image_size"] = align.encoder_image_size
    cfg = EncoderConfig.named(align.encoder, **overrides)
    if align.init_encoder:  # a warm start keeps the towers its checkpoint was trained with (text-only or not)
        has_images = read_meta(Path(align.init_encoder))["encoder"].get("vision", "none") != "none"
    if cfg.for_catalog(has_images) is not cfg:
        log.info("no item has an image: encoder %s runs text-only (its vision tower is not built)", align.encoder)
        cfg = cfg.for_catalog(has_images)
    return cfg.to_dict()


def with_raw_ids(frame: pd.DataFrame, id_maps: dict, fields: tuple) -> pd.DataFrame:
    """Add ``_raw_<field>`` (the source's own string id) for string-id sources, so job-stage rejects name records
    the way the user's files do. The id maps are the documented driver-side bound of string-id sources."""
    out = frame
    for name in fields:
        table = (id_maps or {}).get(name)
        if table is None:
            continue
        raw = pd.Series(table["raw"].to_numpy(), index=table["id"].to_numpy())
        out = out.assign(**{f"_raw_{name}": raw.reindex(frame[name].to_numpy()).to_numpy()})
    return out


def make_plan(options: PipelineOptions, staging: Path, work_dir: Path, ds, source=None, clock=None) -> JobPlan:
    """Resolve options + the loaded dataset (or, for the worker path, `source`: a
    `pipelines.beam.read_source.SourcePlan`, with ds None) into a JobPlan (validates every config before
    anything runs). ``clock``: the job's `feature_store.clock.EventClock`."""
    from pipelines.beam.job_report import snapshot
    from pipelines.beam.common import reject
    from pipelines.encoder.config import catalog_has_images

    cfg = cascade_config(options)
    seed = cfg.seed()
    al, q, rt = cfg.align, cfg.quant, cfg.runtime
    split = cfg.split.config()
    pairs = cfg.pairs.config(seed=seed, skip_unaligned=rt.skip_unaligned)
    quant = QuantConfig(rq_levels=q.rq_levels, rq_codebook_size=q.rq_codebook_size, fit_sample=q.fit_sample,
                        vq_k=q.vq_k, vq_index=q.vq_index, vq_gather_max=q.vq_gather_max, vq_nlist=q.vq_nlist,
                        vq_nprobe=q.vq_nprobe, seed=seed)
    # side mode: the frozen MLLM (with its seeded projector: no pretrained one loads offline) is the fixed
    # "pretrained" model, so it keeps the data seed and its cache serves every cascade seed; the side network,
    # pairs, quantizers and the unaligned map take the cascade seed
    encoder_seed = cfg.data.seed if al.align_mode == "side" else seed
    # a catalog without images (loaded here, or a source whose items have no image column) runs text-only
    has_images = catalog_has_images(ds.items) if ds is not None else source is None or source.image_column
    encoder = encoder_dict(al, encoder_seed, has_images)
    align = AlignPlan(encoder=encoder, mode=al.align_mode, epochs=al.align_epochs, batch_size=al.align_batch_size,
                      lr=al.align_lr, temperature=al.align_temperature, checkpoint=al.align_checkpoint,
                      init_encoder=al.init_encoder, threads=rt.torch_threads, seed=seed, cache_dir=al.side_cache_dir,
                      layer_stride=al.side_layer_stride, side_dropout=al.side_dropout, nproc=al.align_nproc,
                      base_map=al.resolved_unaligned_map(), gate_z=al.align_gate_z)
    if q.init_quantizer and not Path(q.init_quantizer).exists():
        raise FileNotFoundError(f"--init-quantizer {q.init_quantizer}: no such folder")
    common = dict(staging=str(staging), work_dir=str(work_dir), pairs=pairs, quant=quant, align=align, split=split,
                  embed_batch_size=rt.embed_batch_size, unaligned=not rt.skip_unaligned,
                  init_quantizer=q.init_quantizer,
                  align_hints=tuple((k, v) for k, v in (("min_ram", rt.align_min_ram),
                                                        ("accelerator", rt.align_accelerator)) if v),
                  side_cache_shard_size=al.side_cache_shard_size, clock=clock,
                  user_prompts=cfg.user_prompts if cfg.user_prompts.user_prompts else None)
    if source is not None:  # the workers read, parse and validate the source: nothing is snapshotted
        spec = cfg.data.spec()
        return JobPlan(items_path="", interactions_path="", image_root=source.image_root,
                       image_check=spec.validate_images, require_image=bool(spec.require_image),
                       max_bad_fraction=source.max_bad_fraction, source=source, **common)
    items_path = snapshot(with_raw_ids(ds.items, ds.id_maps, ("item_id",)), work_dir / "items.parquet")
    # the protocol's part of every event (0 train, 1 valid, 2 test) is computed in the pipeline (ProtocolParts)
    inter_path = snapshot(with_raw_ids(ds.interactions, ds.id_maps, ("user_id", "item_id")),
                          work_dir / "interactions.parquet")

    def known(value):
        return None if value is None or pd.isna(value) else value

    loader_rejects = tuple(
        reject("read_sources", str(r.source), str(r.reason), row=known(r.row), item_id=known(r.item_id),
               user_id=known(r.user_id), item_dense_id=known(getattr(r, "item_dense_id", None)),
               user_dense_id=known(getattr(r, "user_dense_id", None)), detail=str(r.detail),
               action=str(getattr(r, "action", "dropped")))
        for r in ds.rejects.itertuples(index=False))
    return JobPlan(items_path=str(items_path), interactions_path=str(inter_path),
                   image_root=str(ds.image_root) if ds.image_root else None,
                   image_check=ds.spec.validate_images if ds.spec else "draft",
                   require_image=bool(ds.spec.require_image) if ds.spec else False,
                   max_bad_fraction=ds.spec.max_bad_fraction if ds.spec else None,
                   loader_rejects=loader_rejects, **common)
