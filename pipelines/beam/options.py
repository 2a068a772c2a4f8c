"""PipelineOptions of the cascade job (`qarm pipeline`, `python -m pipelines.jobs.cascade`), generated from the
config tree (`pipelines.config.cascade.CascadeConfig`): every knob is a Beam option of the same name, so a job
submitted to Flink, Spark or Dataflow carries its whole config to the workers.

Beam collects the flags of *every* direct PipelineOptions subclass into one parser, so a flag may be defined by
one class only: DataOptions holds the data section, CascadeOptions the others.
"""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.config.cascade import CascadeConfig, DataSection
from feature_store.config_tree import add_section_arguments, add_tree_arguments, flat, tree_from_flat
from pipelines.data import DataSpec

JOB_SECTIONS = ("split", "pairs", "align", "quant", "runtime", "user_prompts")
# Beam options never recorded in a manifest: credentials and tokens (any option whose name contains one of these)
SECRET_MARKERS = ("token", "secret", "password", "credential", "access_key", "key_file", "service_account_key")


class DataOptions(PipelineOptions):
    """The data section's flags (--dataset --data ... --seed)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_section_arguments(parser, DataSection, title="data (CascadeConfig)")


class CascadeOptions(PipelineOptions):
    """The other sections' flags: split, pairs, align, quant, runtime, user_prompts."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_tree_arguments(parser, CascadeConfig, only=JOB_SECTIONS)


def cascade_config(options: PipelineOptions) -> CascadeConfig:
    """The validated config tree these options carry (every knob is an option of the same name)."""
    return tree_from_flat(CascadeConfig, options.get_all_options(), where="pipeline options")


def options_for(config: CascadeConfig, beam_args=()) -> PipelineOptions:
    """PipelineOptions carrying ``config`` and Beam's own flags (``--runner ...``)."""
    return PipelineOptions(list(beam_args), **flat(config))


def data_spec(options: PipelineOptions) -> DataSpec:
    """The job's DataSpec."""
    return cascade_config(options).data.spec()


def beam_options_record(options: PipelineOptions) -> dict:
    """Beam's own options that differ from their defaults (runner and all; no tree knob, no credential)."""
    from feature_store.config_tree import knob_names

    knobs = set(knob_names(CascadeConfig))
    out = {}
    for key, value in options.get_all_options(drop_default=True).items():
        if key in knobs or any(m in key.lower() for m in SECRET_MARKERS):
            continue
        out[key] = value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)
    return out
