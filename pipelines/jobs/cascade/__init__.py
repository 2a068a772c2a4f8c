"""The QARM batch job (`qarm pipeline`, `python -m pipelines.jobs.cascade`): sources -> a published feature-store version.

One Beam pipeline, every step labelled::

    ReadSource (generic Parquet / CSV: read and parsed on the workers) or ReadItems / ReadInteractions (Parquet
    snapshot of a preset loaded in the driver)
      -> ValidateItems / ValidateInteractions (bad records -> dead letter, merged with the parse / loader rejects)
      -> ProtocolParts / ProtocolRecord (each event's protocol part and the protocol record as one combine, on the
                    workers; WindowEvents writes the valid / test events the driver's metrics read)
      -> TrainPortion (only the protocol's train events go on: nothing downstream sees valid / test)
      -> side mode: BuildSideCache (the frozen MLLM over item shards on the workers) -> EmbedFrozenFromCache
         (unaligned / text / image); full / adapters: EmbedUnaligned (RunInference). Either is the trigger fallback
      -> MinePairs (capped Swing + trigger->target pairs by the collaborative model's similarity; the latest
                    train pairs validate alignment) -> WriteTrainPairs / WriteHeldoutPairs (the trainer's input)
      -> Align (the trainer over the pair files and the cache: in the worker or --align-nproc data-parallel
                processes; --align-checkpoint reuses one)
      -> EmbedAlignedFromCache (side) / EmbedAligned (RunInference + the encoder's PyTorch ModelHandler)
      -> Quantize* (RQ fit on a hashed sample on one worker; encode in parallel, codebooks as side input;
                    VQ = faiss k-NN in parallel batches)
      -> Write* (beam.io.parquetio into the store's private staging folder)
    then, in the driver: metrics on the protocol's valid / test windows and an atomic publish (manifest with
    ``protocol``, checksums, CURRENT flipped). Any failure discards the staging folder: CURRENT stays where it was.

Modules: plan (options -> JobPlan), align_stage, graph (the Beam graph), config (manifest config + hash),
metrics (driver-side evaluation), job (driver + entry points).
"""
from pipelines.beam.align_stage import align_stage
from pipelines.beam.cascade_graph import CODES_FILE, EMB_FILE, UNALIGNED, build_graph
from pipelines.jobs.cascade.driver import (ACCEPTS_EXTRA_ARGS, CONFIG_TREE, DEFAULT_RUNNER, add_arguments, main,
                                           options_from_namespace, parse_argv, run, run_job)
from pipelines.beam.plan import AlignPlan, JobPlan, make_plan

__all__ = ["ACCEPTS_EXTRA_ARGS", "CONFIG_TREE", "DEFAULT_RUNNER", "parse_argv", "AlignPlan", "JobPlan", "make_plan", "align_stage", "build_graph",
           "run_job", "run", "main", "add_arguments", "options_from_namespace", "EMB_FILE", "CODES_FILE", "UNALIGNED"]
