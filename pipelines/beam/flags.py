"""One command-line dialect for every `qarm` command: hyphenated flags, old underscore spellings as hidden aliases,
and unknown flags refused (Beam's own pass-through flags excepted).

    parser.add_argument("--align-epochs", type=int, default=2)
    add_underscore_aliases(parser)           # --align_epochs still parses, but --help shows only --align-epochs
    check_beam_flags(["--runner", "FlinkRunner", "--align_epochz", "5"])   # UnknownFlagError: --align_epochz
"""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


class UnknownFlagError(ValueError):
    """A flag that neither qarm nor Beam knows (the dispatcher exits 2 naming it)."""

    def __init__(self, flags: list[str]):
        super().__init__("unknown flag(s): " + " ".join(flags) + " (neither a qarm flag nor a Beam pipeline option; "
                         "see --help)")
        self.flags = flags


def add_underscore_aliases(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Register ``--a_b`` as a hidden alias of every ``--a-b`` flag (the spelling of the previous release).

    The alias maps to the same argparse action, so values, defaults and types are shared; it is not in
    ``action.option_strings``, so --help lists only the hyphenated form. Returns {alias: flag}.
    """
    aliases = {}
    for action in list(parser._actions):  # argparse keeps no public registry of option strings
        for flag in action.option_strings:
            if not flag.startswith("--") or "-" not in flag[2:]:
                continue
            alias = "--" + flag[2:].replace("-", "_")
            if alias not in parser._option_string_actions:
                parser._option_string_actions[alias] = action
                aliases[alias] = flag
    return aliases


def warn_deprecated_spellings(argv: list[str], aliases: dict[str, str]) -> None:
    """Log a warning for each old underscore spelling used in ``argv``."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in aliases:
            log.warning("%s is deprecated and will be removed in the next release; use %s", name, aliases[name])


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
