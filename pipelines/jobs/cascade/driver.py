"""The cascade's driver: load, plan, run the graph, evaluate the staged tables, publish atomically."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import apache_beam as beam
import pandas as pd
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from pipelines.config.cascade import CascadeConfig
from feature_store.config_tree import add_config_file_arguments, add_tree_arguments, resolve_tree, to_dict
from pipelines.jobs.cascade.manifest_config import job_config
from pipelines.beam.cascade_graph import HELDOUT_PAIRS, SOURCE_SUMMARY, TRAIN_PAIRS, build_graph
from pipelines.jobs.cascade.window_metrics import post_metrics, read_window_events
from pipelines.beam.plan import make_plan
from pipelines.beam.common import read_counters, read_stage_metrics
from pipelines.beam.options import beam_options_record, cascade_config, options_for

log = logging.getLogger("pipelines.jobs.cascade")

ACCEPTS_EXTRA_ARGS = True  # `qarm pipeline` passes unknown flags (Beam's own) through to PipelineOptions
# The embedded default: what the DirectRunner runs for batch pipelines, in-process, no download. Beam 2.77's
# "DirectRunner" first tries the Prism runner, which downloads a binary (impossible offline) before falling back;
# the legacy BundleBasedDirectRunner trips over a GroupByKey fed by a side-input check.
DEFAULT_RUNNER = "FnApiRunner"


def run_job(options: PipelineOptions, save_main_session: bool = True, test_pipeline=None) -> dict:
    """Run the whole job; returns the summary (per-stage counts/seconds, dead letter, metrics, version)."""
    from feature_store import FeatureStore

    t_job = time.perf_counter()
    cfg = cascade_config(options)  # the validated tree: every knob, resolved
    opts = cfg.runtime
    if not opts.store:
        raise ValueError("--store DIR is required (the feature store the job publishes into)")
    options.view_as(SetupOptions).save_main_session = save_main_session
    std = options.view_as(StandardOptions)
    if std.runner is None:
        std.runner = DEFAULT_RUNNER
    store = FeatureStore(opts.store)
    given_work = scratch_path(opts.work_dir) if opts.work_dir else None  # refused before anything is loaded
    # one writer per store: the CURRENT this job starts from; publishing is a compare-and-swap from it, refused
    # (StoreConflictError, exit 4) when another writer moved CURRENT meanwhile
    started_from = store.current_id()
    given = cfg.data.spec()  # the config records the spec as given: the job's identity is not its start time
    spec = given.at_clock()  # one clock for the driver and every worker
    clock = spec.clock()
    source, ds, stages = read_in_driver(spec, opts)
    dataset_name = ds.name if ds is not None else source.name
    own_work = opts.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="qarm-cascade-")) if own_work else given_work
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        with store.stage(parent=started_from, require_parent_current=True) as st:
            plan = make_plan(options, st.path, work_dir, ds, source=source, clock=clock)
            p = test_pipeline if test_pipeline is not None else beam.Pipeline(options=options)
            build_graph(p, plan)
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
            heldout = pd.read_parquet(work_dir / f"{HELDOUT_PAIRS}.parquet")
            train_n = pq.ParquetFile(work_dir / f"{TRAIN_PAIRS}.parquet").metadata.num_rows
            metrics = post_metrics(Path(st.path), plan, heldout, read_window_events(work_dir))
            metrics["pairs"] = {"train": int(train_n), "align_valid": int(len(heldout))}
            metrics["alignment"] = alignment_metrics(plan, work_dir, Path(st.path))
            metrics["triggers"] = trigger_counts(result, plan)
            if plan.user_prompts is not None:  # the user-prompt stage's gate: step 0 (history pooling) or trained
                from pipelines.beam.user_prompt_stage import user_prompts_record

                metrics["user_prompts"] = user_prompts_record(work_dir)
            metrics["dead_letter"] = dead_counts
            metrics["counts"] = {k: v for k, v in stages.items()}
            summary_rec = json.loads((work_dir / SOURCE_SUMMARY).read_text())
            protocol = summary_rec["protocol"]  # computed once, on the workers, from the parts the job trained on
            watermark = clock.cap(summary_rec["max_ts"])  # a watermark never passes the clock
            data_sha = hashlib.sha256(f"{summary_rec['items_sha256']}:{protocol['data_sha256']}".encode()).hexdigest()
            config = job_config(plan, given, data_sha)
            resolved = {"cascade": to_dict(cfg), "beam": beam_options_record(options)}
            version = st.publish(config=config, metrics=metrics,
                                 extra={"resolved_config": resolved, "watermark": watermark, "dataset": dataset_name,
                                        "pipeline_seconds": pipeline_seconds, "clock": clock.to_dict(),
                                        "protocol": protocol})
            stages["publish"] = {"in": 1, "out": 1, "rejected": 0, "seconds": round(time.perf_counter() - t_pub, 3)}
    finally:
        if own_work:
            shutil.rmtree(work_dir, ignore_errors=True)
    from pipelines.encoder.alignment import gate_line

    summary = {
        "version": version.id, "store": store.url, "config_sha256": version.manifest[
            "config_sha256"], "watermark": watermark, "dataset": dataset_name, "runner": str(std.runner),
        "stages": stages, "dead_letter": dead_counts, "dead_letter_total": int(sum(dead_counts.values())),
        "alignment": gate_line(metrics["alignment"]),
        "metrics": {k: v for k, v in metrics.items() if k not in ("counts", "dead_letter")},
        "pipeline_seconds": pipeline_seconds, "seconds": round(time.perf_counter() - t_job, 3),
    }
    return summary


def scratch_path(work_dir: str) -> Path:
    """``--work-dir`` as a local path (``file://`` URLs too). The work dir is where the driver and the workers
    exchange files through local-path APIs (trainer inputs and checkpoints, the side cache, safetensors), so an
    object-storage URL is refused with what to use instead; the store itself may be on object storage."""
    from feature_store.objects import is_object_url, local_path

    if is_object_url(work_dir):
        raise ValueError(f"--work-dir {work_dir}: the work dir must be a local or shared POSIX path (the align "
                         "trainer, the side cache and the quantizer write it through file APIs); object storage is "
                         "supported for --store (s3://, gs://), whose versions are staged under $QARM_STORE_CACHE "
                         "and uploaded at publish")
    return local_path(work_dir)


def read_in_driver(spec, opts) -> tuple:
    """(SourcePlan or None, Dataset or None, stages): the generic Parquet / CSV source is read and parsed on the
    workers (the driver resolves it and checks that its tables have rows); presets generated or loaded in the
    driver (synthetic, movielens) go through the loader and its snapshot, refused when no event survived it."""
    from pipelines.data import load_dataset
    from pipelines.beam.read_source import source_plan

    t0 = time.perf_counter()
    if reads_on_workers(spec, opts):
        return source_plan(spec), None, {}
    ds = load_dataset(spec)
    require_events(ds)
    return None, ds, {"read_sources": {"in": int(len(ds.items) + len(ds.interactions) + len(ds.rejects)),
                                       "out": int(len(ds.items) + len(ds.interactions)),
                                       "rejected": int(len(ds.rejects)), "seconds": round(time.perf_counter() - t0, 3)}}


def require_events(ds) -> None:
    """Refuse, before the job starts, a load that left no interaction to learn from (each was rejected)."""
    from pipelines.data.io import DataError

    if len(ds.interactions) == 0:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(ds.reject_counts.items())) or "none rejected"
        raise DataError(f"{ds.name}: no usable interactions: every row was rejected ({counts}); nothing to learn "
                        "from, nothing published")


def alignment_metrics(plan, work_dir: Path, staging: Path) -> dict:
    """``manifest.metrics.alignment``: the align step's gate record (kept, judge, step 0 vs the weights that
    ship on the validation window's next-item queries) and the base map the unaligned embedding used."""
    from pipelines.beam.align_stage import alignment_record
    from pipelines.encoder.base_map import BASE_MAP_FILE, load_base_map

    record = dict(alignment_record(plan.align, work_dir))
    base_file = staging / BASE_MAP_FILE
    if base_file.is_file():  # side mode writes the map it fitted (or took from the warm start) into the version
        record["base_map"] = load_base_map(base_file)[1]
    elif plan.align.init_encoder or plan.align.checkpoint:
        record["base_map"] = {"kind": "checkpoint"}
    else:
        record["base_map"] = {"kind": "gaussian", "seed": int(plan.align.seed)}
    return record


def reads_on_workers(spec, opts) -> bool:
    """--read-sources auto (default): the generic source is read on the workers, presets in the driver."""
    mode = getattr(opts, "read_sources", None) or "auto"
    if mode == "workers" and spec.dataset != "generic":
        raise ValueError(f"--read-sources workers reads the generic Parquet / CSV source; --dataset {spec.dataset} "
                         "is generated or loaded in the driver (use --read-sources auto or driver)")
    return spec.dataset == "generic" and mode != "driver"


def trigger_counts(result, plan) -> dict:
    """Targets of the train portion by where their trigger came from (collab | swing | encoder | none)."""
    from pipelines.mining.pairs import TRIGGER_SOURCES

    got = read_counters(result, "qarm.pairs")
    counts = {s: int(got.get(f"trigger_{s}", 0)) for s in TRIGGER_SOURCES}
    return {"similarity": plan.pairs.trigger_similarity, "fallback": plan.pairs.trigger_fallback,
            "targets": int(sum(counts.values())), "by_source": counts}


CONFIG_TREE = CascadeConfig  # the dispatcher generates the flags, --config and --print-config from it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`qarm pipeline`: only the tree's flags (added by the dispatcher); Beam's own flags pass through."""


def options_from_namespace(args: argparse.Namespace) -> PipelineOptions:
    """PipelineOptions of a dispatched command: its resolved tree (``args.config_tree``) and Beam's flags."""
    return options_for(args.config_tree, getattr(args, "extra_args", None) or ())


def parse_argv(argv) -> tuple[CascadeConfig, list]:
    """(resolved tree, Beam's own flags) of a command line: defaults < --config FILE < flags given. A flag neither
    the tree nor any Beam option knows raises UnknownFlagError (Beam would only log and drop it)."""
    from pipelines.beam.flags import check_beam_flags

    parser = argparse.ArgumentParser(prog="pipelines.jobs.cascade", allow_abbrev=False)
    add_tree_arguments(parser, CascadeConfig, with_defaults=False)
    add_config_file_arguments(parser)
    args, beam_args = parser.parse_known_args(list(argv or []))
    check_beam_flags(beam_args)
    return resolve_tree(CascadeConfig, args), beam_args


def run(argv=None, save_main_session: bool = True, test_pipeline=None) -> dict:
    """Run the job.

    Args:
        argv: command-line flags (list), or the argparse Namespace of `qarm pipeline`.
        save_main_session: pickle the main session for remote workers (Beam convention).
        test_pipeline: a TestPipeline to build on instead of a new Pipeline.
    Returns:
        the job summary dict (also printed as JSON by `qarm pipeline --json`).
    """
    from pipelines.beam.job_report import format_summary

    if isinstance(argv, argparse.Namespace):
        options = options_from_namespace(argv)
    else:
        options = options_for(*parse_argv(argv))
    summary = run_job(options, save_main_session=save_main_session, test_pipeline=test_pipeline)
    log.info("job summary:\n%s", format_summary(summary))
    return summary


def main(argv=None) -> None:
    """`python -m pipelines.jobs.cascade FLAGS`: Beam's own entry convention (flags hyphenated or Beam's)."""
    from feature_store.io import dumps_strict
    from pipelines.jobs.outcome import configure_logging

    configure_logging(verbose=False)
    summary = run(argv)
    print(dumps_strict(summary, default=str))
