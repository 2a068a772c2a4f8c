"""The Beam graph of the cascade: every step labelled, heavy work as PTransforms over PCollections."""
from __future__ import annotations

import functools
from pathlib import Path

import apache_beam as beam

from pipelines.beam.align_stage import align_on_cache, align_stage, one_pass, side_cache_dir
from pipelines.beam.plan import JobPlan
from pipelines.beam.common import count

EMB_FILE, CODES_FILE = "item_embeddings", "item_codes"
UNALIGNED = "_unaligned"
TRAIN_PAIRS, HELDOUT_PAIRS = "train_pairs", "heldout_pairs"  # <work_dir>/<name>.parquet: the trainer's inputs
VALID_QUERIES = "valid_queries"  # <work_dir>/valid_queries.parquet: the validation window's next-item queries
# in the work dir: what the workers computed over the whole log for the driver (protocol record, watermark, items
# digest) and the valid / test window events the driver's metrics read (pipelines.jobs.cascade.window_metrics)
SOURCE_SUMMARY = "source_summary.json"
WINDOW_EVENTS = "window_events"


def _write_json(record: dict, path: str) -> str:
    from feature_store.io import atomic_write_json

    atomic_write_json(path, record)
    return path


class TrainPortion(beam.PTransform):
    """Validated interactions -> those in the protocol's train portion (``_part == 0``).

    The part travels with the raw source row (`pipelines.beam.protocol.ProtocolParts` sets it); validated
    records keep ``_row``, so the two are joined by row (a keyed shuffle: no worker holds the log).
    """

    def __init__(self, raw):
        super().__init__()
        self.raw = raw

    def expand(self, validated):
        parts = self.raw | "RowParts" >> beam.Map(lambda r: (int(r["_row"]), int(r["_part"])))
        keyed = validated | "KeyByRow" >> beam.Map(lambda r: (int(r["_row"]), r))
        return ({"part": parts, "event": keyed} | "JoinParts" >> beam.CoGroupByKey()
                | "KeepTrain" >> beam.FlatMap(_train_events))


def _summary(_, record: dict, items_sha: str) -> dict:
    return {**record, "items_sha256": items_sha}  # {"protocol", "max_ts", "items_sha256"}


def _write_windows(rows, prefix: str):
    import pyarrow as pa

    from pipelines.beam.protocol import WINDOW_FIELDS

    schema = pa.schema([pa.field(f, pa.float32() if f == "label" else pa.int64()) for f in WINDOW_FIELDS])
    return rows | "WriteParquet" >> beam.io.WriteToParquet(prefix, schema, file_name_suffix=".parquet", num_shards=1,
                                                           shard_name_template="")


def _train_events(keyed):
    _, grouped = keyed
    if list(grouped["part"]) == [0]:
        yield from grouped["event"]


def build_graph(p: beam.Pipeline, plan: JobPlan) -> dict:
    """Add every stage of the job to `p`. Returns the main PCollections (for tests and the retraining job).

    Stages, in order: read and validate the source (`_read_validated`), the protocol (`_protocol`: parts, train
    portion, windows, the gate's queries), side mode's frozen pass or the unaligned embedding (`_frozen`), pair
    mining, alignment and the aligned embedding (`_aligned`), codes and tables (`_write_version`), the optional
    user-prompt stage, the dead letter.
    """
    from pipelines.encoder.config import EncoderConfig
    from pipelines.beam.mine_pairs import MinePairs
    from pipelines.beam.validate_records import DEAD
    from pipelines.beam.write import WriteRejects, write_pairs

    enc_cfg = EncoderConfig.from_dict(plan.align.encoder)
    vi, vx, loader_rejects, interactions, order = _read_validated(p, plan)
    train, window_rows, query_files = _protocol(p, plan, interactions, vi, vx, order)
    frozen = _frozen(plan, enc_cfg, vi, train)
    emb_u = frozen["unaligned"]
    fallback = None
    if emb_u is not None and plan.pairs.trigger_fallback == "encoder":
        from pipelines.mining.collab import normalise

        fallback = emb_u["embeddings"] | "FallbackVectors" >> beam.Map(lambda kv: (int(kv[0]), normalise(kv[1])))
    pairs = (train | "CountPairsIn" >> count("mine_pairs", "in")
             | "MinePairs" >> MinePairs(plan.pairs, encoder=fallback))
    _ = pairs["train"] | "CountPairsOut" >> count("mine_pairs", "out")
    _ = pairs["heldout"] | "CountHeldoutPairsOut" >> count("mine_pairs", "out")
    # the trainer reads the pairs from files (no worker gets them as a side input): only file names travel
    train_files = pairs["train"] | "WriteTrainPairs" >> write_pairs(str(Path(plan.work_dir) / TRAIN_PAIRS))
    heldout_files = pairs["heldout"] | "WriteHeldoutPairs" >> write_pairs(str(Path(plan.work_dir) / HELDOUT_PAIRS))
    emb = _aligned(p, plan, enc_cfg, vi, frozen, train_files, heldout_files, query_files)
    out = {"items": vi["items"], "interactions": vx["interactions"], "train": train, "pairs": pairs,
           "embeddings": emb, **_write_version(plan, enc_cfg, emb, emb_u)}
    dead = [loader_rejects, vi[DEAD], vx[DEAD], emb[DEAD]] + ([frozen["cache_rejects"]] if frozen["onepass"] else [])
    if plan.user_prompts is not None:  # --user-prompts: user vectors in the same version (after the aligned items)
        from pipelines.beam.user_prompt_stage import UserPromptStage, user_encoder_config

        out["user_embeddings"] = p | "UserPrompts" >> UserPromptStage(
            user_encoder_config(plan), plan.align.encoder, vi["items"], emb["embeddings"], train, window_rows,
            plan.image_root, plan.staging, plan.work_dir, order=order, hints=plan.align_hints)
    if plan.unaligned:
        # the unaligned embedder sees the same items; its image problems are already in the aligned dead letter
        dead.append(emb_u[DEAD] | "OnlyUnalignedNaN" >> beam.Filter(lambda r: r["reason"] == "nan_embedding"))
    dead_all = tuple(dead) | "DeadLetter" >> beam.Flatten()
    _ = dead_all | "WriteDeadLetter" >> WriteRejects(str(Path(plan.staging) / "dead_letter"))
    out["dead_letter"] = dead_all
    return out


def _read_validated(p: beam.Pipeline, plan: JobPlan):
    """(validated items, validated interactions, loader rejects, the rows the protocol parts, the within-(user, ts)
    order): the loader's snapshot read back and validated again, or the generic source read on the workers."""
    from pipelines.beam.validate_records import DEAD, ValidateInteractions, ValidateItems

    if plan.source is None:  # the loader's snapshot, read back in parallel and validated again
        items = p | "ReadItems" >> beam.io.ReadFromParquet(plan.items_path)
        interactions = p | "ReadInteractions" >> beam.io.ReadFromParquet(plan.interactions_path)
        loader_rejects = p | "LoaderRejects" >> beam.Create(list(plan.loader_rejects))
        check_share, order = plan.max_bad_fraction, ("_row",)
    else:  # the generic source read and parsed on the workers (the parse step checks the bad share)
        from pipelines.beam.read_source import ReadSource

        src = p | "ReadSource" >> ReadSource(plan.source)
        items, interactions, loader_rejects = src["items"], src["interactions"], src[DEAD]
        # inside one (user, ts) the loader's table is in (item, file row, table row) order
        check_share, order = None, ("item_id", "_file_row", "_row")
    vi = items | "ValidateItems" >> ValidateItems(plan.image_root, plan.image_check, plan.require_image,
                                                  max_bad_fraction=check_share, recheck=plan.source is None)
    vx = interactions | "ValidateInteractions" >> ValidateInteractions(vi["items"], max_bad_fraction=check_share,
                                                                       dedupe=plan.source is not None,
                                                                       clock=plan.clock)
    # the protocol's part of every event, on the workers (= feature_store.split.split_labels over the loader's
    # table: the snapshot itself, or the validated records of the worker path)
    protocol_rows = interactions if plan.source is None else vx["interactions"]
    return vi, vx, loader_rejects, protocol_rows, order


def _protocol(p: beam.Pipeline, plan: JobPlan, protocol_rows, vi, vx, order):
    """(train portion, window events, the validation queries' files): the protocol computed once, on the workers,
    with its record and the source summary written for the driver."""
    from pipelines.beam.protocol import ItemsDigest, ProtocolParts, ProtocolRecord, WindowEvents
    from pipelines.beam.queries import NextItemQueries, write_queries

    parted = protocol_rows | "ProtocolParts" >> ProtocolParts(plan.split, order)
    train = vx["interactions"] | "TrainPortion" >> TrainPortion(parted)
    record = parted | "ProtocolRecord" >> ProtocolRecord(plan.split)
    items_sha = vi["items"] | "ItemsDigest" >> ItemsDigest()
    _ = (p | "SummaryTrigger" >> beam.Create([None])
         | "SourceSummary" >> beam.Map(_summary, beam.pvalue.AsSingleton(record), beam.pvalue.AsSingleton(items_sha))
         | "WriteSourceSummary" >> beam.Map(_write_json, str(Path(plan.work_dir) / SOURCE_SUMMARY)))
    window_rows = parted | "WindowEvents" >> WindowEvents(plan.pairs.positive_label, order)
    _ = window_rows | "WriteWindowEvents" >> beam.ptransform_fn(_write_windows)(
        str(Path(plan.work_dir) / WINDOW_EVENTS))
    # the alignment gate's judge: next-item queries of the validation window, as a file the trainer reads
    query_files = (window_rows | "ValidQueries" >> NextItemQueries(1, plan.pairs.positive_label)
                   | "WriteValidQueries" >> write_queries(str(Path(plan.work_dir) / VALID_QUERIES)))
    return train, window_rows, query_files


def _frozen(plan: JobPlan, enc_cfg, vi, train) -> dict:
    """What exists before alignment: side mode's one backbone pass (cache, base map, the frozen MLLM's text /
    image / unaligned embeddings, written or kept) or, in the other modes, the unaligned RunInference pass.
    Returns {onepass, cache_dir, cache_done, base_map, cache_rejects, unaligned: {embeddings, dead} or None}."""
    from pipelines.encoder.base_map import BASE_MAP_FILE
    from pipelines.encoder.model_io import unaligned_encoder
    from pipelines.beam.embed_items import EmbedItems, encoder_handler
    from pipelines.beam.side_cache import BuildSideCache, CacheImageRejects, EmbedFromCache, FitBaseMap
    from pipelines.beam.validate_records import DEAD
    from pipelines.beam.write import WriteEmbeddings

    staging = Path(plan.staging)
    out = {"onepass": one_pass(plan.align), "cache_dir": None, "cache_done": None, "base_map": None,
           "cache_rejects": None, "unaligned": None}
    if out["onepass"]:  # one backbone pass on the workers: Align trains on this cache, every embedding comes from it
        cache_dir = side_cache_dir(plan.align, plan.work_dir)
        cache_done = vi["items"] | "BuildSideCache" >> BuildSideCache(
            plan.align.encoder, plan.align.layer_stride, plan.image_root, cache_dir,
            shard_size=plan.side_cache_shard_size, batch_size=plan.embed_batch_size, threads=plan.align.threads)
        # the unaligned embedding's map: fitted on the train portion's items only (or the warm start's own)
        base_map = cache_done | "FitBaseMap" >> FitBaseMap(
            cache_dir, str(staging / BASE_MAP_FILE), plan.align.base_map, plan.align.seed, enc_cfg.embed_dim,
            train | "TrainItems" >> beam.Map(lambda r: int(r["item_id"])), checkpoint=plan.align.init_encoder)
        # the frozen MLLM's own embeddings need no training, so they exist before pair mining (trigger fallback)
        frozen_kinds = ("text",) + (("image",) if enc_cfg.has_vision else ()) + \
            (("unaligned",) if plan.unaligned else ())
        frozen = cache_done | "EmbedFrozenFromCache" >> EmbedFromCache(
            cache_dir, None, frozen_kinds, unaligned_seed=plan.align.seed, threads=plan.align.threads,
            base_map=base_map)
        out.update(cache_dir=cache_dir, cache_done=cache_done, base_map=base_map,
                   cache_rejects=cache_done | "SideCacheImageRejects" >> CacheImageRejects(cache_dir))
        for kind in ("text", "image"):  # the modality tables go straight into the version
            if kind in frozen_kinds:
                _ = frozen[kind] | f"WriteEmbeddings{kind.title()}" >> WriteEmbeddings(
                    str(staging / f"{EMB_FILE}_{kind}"), enc_cfg.embed_dim, stage=f"write_{kind}")
        if plan.unaligned:
            out["unaligned"] = {"embeddings": frozen["unaligned"], DEAD: frozen[DEAD]}
    elif plan.unaligned:  # behaviour-free, so it may feed pair mining (the trigger fallback)
        handler_u = encoder_handler(checkpoint=None, encoder_factory=functools.partial(
            unaligned_encoder, enc_cfg, plan.align.seed, plan.align.init_encoder or plan.align.checkpoint),
            batch_size=plan.embed_batch_size, num_threads=plan.align.threads, stage="embed_unaligned")
        out["unaligned"] = vi["items"] | "EmbedUnaligned" >> EmbedItems(handler_u, enc_cfg, plan.image_root,
                                                                         "embed_unaligned")
    return out


def _aligned(p: beam.Pipeline, plan: JobPlan, enc_cfg, vi, frozen: dict, train_files, heldout_files, query_files):
    """The Align step (one worker, resource hints) and the aligned embedding of every item: from side mode's
    cache, or RunInference over the checkpoint the step wrote. Returns {embeddings, dead}."""
    from pipelines.beam.embed_items import EmbedItems, encoder_handler
    from pipelines.beam.side_cache import EmbedFromCache
    from pipelines.beam.validate_records import DEAD

    staging = Path(plan.staging)
    if frozen["onepass"]:
        cache_done = frozen["cache_done"]
        aligned_path = (p | "AlignTrigger" >> beam.Create([None])
                        | "Align" >> beam.Map(align_on_cache, beam.pvalue.AsSingleton(cache_done),
                                              beam.pvalue.AsList(train_files), plan.align, str(staging / "encoder"),
                                              plan.work_dir, beam.pvalue.AsList(heldout_files),
                                              beam.pvalue.AsList(query_files),
                                              beam.pvalue.AsSingleton(frozen["base_map"]))
                        .with_resource_hints(**dict(plan.align_hints)))
        aligned = cache_done | "EmbedAlignedFromCache" >> EmbedFromCache(
            frozen["cache_dir"], aligned_path, ("aligned",), unaligned_seed=plan.align.seed,
            threads=plan.align.threads)
        return {"embeddings": aligned["aligned"], DEAD: aligned[DEAD]}
    aligned_path = (p | "AlignTrigger" >> beam.Create([None])
                    | "Align" >> beam.Map(align_stage, beam.pvalue.AsList(vi["items"]),
                                          beam.pvalue.AsList(train_files),
                                          plan.align, plan.image_root, str(staging / "encoder"), plan.work_dir,
                                          beam.pvalue.AsList(heldout_files), beam.pvalue.AsList(query_files))
                    .with_resource_hints(**dict(plan.align_hints)))
    # the path is also the side input, so RunInference loads the model only after the align stage wrote it
    handler = encoder_handler(checkpoint=str(staging / "encoder"), batch_size=plan.embed_batch_size,
                              num_threads=plan.align.threads)
    return vi["items"] | "EmbedAligned" >> EmbedItems(handler, enc_cfg, plan.image_root, "embed",
                                                      model_path=aligned_path)


def _write_version(plan: JobPlan, enc_cfg, emb: dict, emb_u) -> dict:
    """Codes (and the unaligned ones) quantized and written with the embeddings into the staged version.
    Returns {codes, [embeddings_unaligned, codes_unaligned]}."""
    from pipelines.beam.quantize_items import QuantizeItems
    from pipelines.beam.write import WriteCodes, WriteEmbeddings

    staging = Path(plan.staging)
    codes = emb["embeddings"] | "Quantize" >> QuantizeItems(
        plan.quant, "quantize", save_dir=str(staging / "quantizer"),
        codebooks_file=str(staging / "codebooks.safetensors"), init_dir=plan.init_quantizer,
        ivf_file=str(Path(plan.work_dir) / "vq_ivf.safetensors"))
    _ = emb["embeddings"] | "WriteEmbeddings" >> WriteEmbeddings(str(staging / EMB_FILE), enc_cfg.embed_dim)
    _ = codes | "WriteCodes" >> WriteCodes(str(staging / CODES_FILE))
    out = {"codes": codes}
    if plan.unaligned:
        codes_u = emb_u["embeddings"] | "QuantizeUnaligned" >> QuantizeItems(
            plan.quant, "quantize_unaligned", codebooks_file=str(staging / "codebooks_unaligned.safetensors"),
            ivf_file=str(Path(plan.work_dir) / "vq_ivf_unaligned.safetensors"))
        _ = emb_u["embeddings"] | "WriteEmbeddingsUnaligned" >> WriteEmbeddings(
            str(staging / (EMB_FILE + UNALIGNED)), enc_cfg.embed_dim, stage="write_unaligned")
        _ = codes_u | "WriteCodesUnaligned" >> WriteCodes(str(staging / (CODES_FILE + UNALIGNED)),
                                                          stage="write_unaligned")
        out.update(embeddings_unaligned=emb_u, codes_unaligned=codes_u)
    return out
