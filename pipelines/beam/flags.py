"""Unknown flags are refused: what neither a `qarm` command nor any Beam PipelineOptions class defines.

    check_beam_flags(["--runner", "FlinkRunner", "--align_epochz", "5"])   # UnknownFlagError: --align_epochz

The underscore spellings of the 0.0 releases (``--align_epochs``) are gone: qarm's flags follow one rule
(`feature_store.config_tree.flag_name`), and an underscore spelling is now an unknown flag.
"""
from __future__ import annotations

import argparse


class UnknownFlagError(ValueError):
    """A flag that neither qarm nor Beam knows (the dispatcher exits 2 naming it)."""

    def __init__(self, flags: list[str]):
        super().__init__("unknown flag(s): " + " ".join(flags) + " (neither a qarm flag nor a Beam pipeline option; "
                         "see --help)")
        self.flags = flags


def beam_flag_parser() -> argparse.ArgumentParser:
    """A parser that knows every option of every PipelineOptions subclass (what Beam itself would accept)."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    import pipelines.beam.options  # noqa: F401  (the cascade's own options: jobs that pass flags on to it)

    parser = _BeamArgumentParser(allow_abbrev=False)
    seen = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)  # the same walk as PipelineOptions.get_all_options
    return parser


def check_beam_flags(extra: list[str]) -> None:
    """Raise UnknownFlagError for any flag in ``extra`` that no PipelineOptions class defines.

    Beam itself only logs "Discarding unparseable args" and runs on with the defaults, which silently drops a
    mistyped qarm flag; a batch job that ran with the wrong settings costs more than one that refused to start.
    """
    if not extra:
        return
    _, unknown = beam_flag_parser().parse_known_args(extra)
    flags = [a for a in unknown if a.startswith("-")]
    if flags or unknown:
        raise UnknownFlagError(flags or unknown)
