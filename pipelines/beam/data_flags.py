"""The data flags every `qarm` command shares, and the DataSpec they make (both from
`pipelines.config.cascade.DataSection`, where each knob is defined once)."""
from __future__ import annotations

import argparse

from pipelines.config.cascade import DataSection
from feature_store.config_tree import add_section_arguments, knob_fields, section_from_values
from pipelines.data.schema import DataSpec


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the data section's flags (--dataset --data --items ... --seed) with their defaults."""
    add_section_arguments(parser, DataSection, title="data source")


def data_section_from_args(args) -> DataSection:
    """The data section from an argparse Namespace or a Beam options view (absent attributes: defaults)."""
    values = {f.name: getattr(args, f.name) for f, _ in knob_fields(DataSection) if hasattr(args, f.name)}
    return section_from_values(DataSection, values, where="data flags")


def data_spec_from_args(args: argparse.Namespace) -> DataSpec:
    """DataSpec from the data flags (raises ValueError naming a bad flag value)."""
    return data_section_from_args(args).spec()
