"""The cascade graph builds (offline, construction only) with Flink, Spark and Dataflow options: the runner object
is created, every DoFn serialises into the runner API proto, and job / data flags are parsed beside Beam's."""
from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions, SetupOptions,
                                                  StandardOptions)

REPO = Path(__file__).resolve().parents[2]
JOB = ["--encoder", "tiny", "--n-items", "24", "--n-users", "12", "--n-events", "300", "--n-clusters", "2",
       "--image-size", "16", "--setup_file", str(REPO / "setup.py")]
RUNNERS = {
    "FlinkRunner": ["--runner", "FlinkRunner", "--flink_master", "localhost:8081", "--environment_type",
                    "DOCKER", "--parallelism", "4"],
    "SparkRunner": ["--runner", "SparkRunner", "--spark_master_url", "spark://localhost:7077",
                    "--environment_type", "DOCKER"],
    "DataflowRunner": ["--runner", "DataflowRunner", "--project", "qarm-test-project", "--region", "us-central1",
                       "--temp_location", "gs://qarm-test-bucket/tmp", "--staging_location",
                       "gs://qarm-test-bucket/staging", "--machine_type", "n1-standard-8",
                       "--align-min-ram", "16GB"],
}
# side mode (the default) runs the frozen MLLM once on the workers (BuildSideCache) and embeds every item from that
# cache (EmbedFrozenFromCache before pair mining, EmbedAlignedFromCache after Align) instead of the two RunInference steps (EmbedAligned / EmbedUnaligned) of full / adapters
STEPS = ("ReadItems", "ReadInteractions", "ValidateItems", "ValidateInteractions", "MinePairs", "WriteTrainPairs",
         "BuildSideCache", "EmbedFrozenFromCache", "Align", "EmbedAlignedFromCache", "Quantize", "QuantizeUnaligned", "WriteEmbeddings", "WriteCodes",
         "WriteDeadLetter")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from pipelines.data import DataSpec, load_dataset

    return load_dataset(DataSpec(n_items=24, n_users=12, n_events=300, n_clusters=2, image_size=16,
                                 data=tmp_path_factory.mktemp("img")))


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_graph_builds_for_runner(runner, dataset, tmp_path):
    from pipelines.jobs.cascade import build_graph, make_plan
    from pipelines.beam.options import CascadeOptions, DataOptions

    argv = RUNNERS[runner] + JOB + ["--store", str(tmp_path / "store"), "--work-dir", str(tmp_path / "work")]
    options = PipelineOptions(argv)
    assert options.view_as(StandardOptions).runner == runner
    assert options.view_as(SetupOptions).setup_file.endswith("setup.py")
    assert options.view_as(CascadeOptions).store == str(tmp_path / "store")
    assert options.view_as(DataOptions).n_items == 24
    (tmp_path / "work").mkdir()
    plan = make_plan(options, tmp_path / "staging", tmp_path / "work", dataset)
    p = beam.Pipeline(options=options)  # creates the runner object; nothing is submitted
    assert type(p.runner).__name__ == runner
    build_graph(p, plan)
    proto = p.to_runner_api()  # pickles every DoFn and side input as a remote worker would receive them
    labels = {t.unique_name for t in proto.components.transforms.values()}
    for step in STEPS:
        assert step in labels, f"step {step} missing from the {runner} graph"
    if runner == "DataflowRunner":
        assert options.view_as(GoogleCloudOptions).project == "qarm-test-project"
        assert dict(plan.align_hints) == {"min_ram": "16GB"}
        align = next(t for t in proto.components.transforms.values() if t.unique_name == "Align")
        assert align.environment_id or proto.components.environments  # hints live on the transform's env
    # Beam-only flags never leak into the job config
    all_flags = options.get_all_options()
    assert all_flags["store"] == str(tmp_path / "store") and all_flags["encoder"] == "tiny"

