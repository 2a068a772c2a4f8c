"""`qarm` console script: a thin dispatcher over the command modules.

Each subcommand is a module with two functions:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> dict      # the machine-readable result

The dispatcher imports only the chosen module (start-up stays fast, libraries stay side-effect free), prints a
human summary (the module's ``human_summary(result) -> str`` where it has one, else ``key: value`` lines), and with
``--json`` prints the result as one strict-JSON line (null, never NaN), always the last
line of stdout. Flags follow one naming rule (``--`` + the knob's name hyphenated). A module with a ``CONFIG_TREE``
(a typed config tree, `feature_store.config_tree`) gets its flags generated from the tree, plus ``--config FILE.yaml``
and ``--print-config``; ``args.config_tree`` is the resolved tree (defaults < file < flags) and its knobs are also
set on ``args`` by name. Jobs that pass Beam options through (ACCEPTS_EXTRA_ARGS) refuse any flag that Beam does
not know either.

Logging: our packages log INFO, third-party libraries (Beam, transformers, faiss, ...) WARNING; ``-v`` brings
their INFO back.

Exit codes: 0 ok, 1 error (bad input, failed job), 2 usage (unknown command or flag, a missing or bad argument),
3 rejected by a validation gate, 4 another writer holds the store's lock or published first
(feature_store.StoreLockedError / StoreConflictError). Every failure prints ``{"ok": false, "exit": CODE, "error":
...}`` as the last line under ``--json``, usage errors included.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import logging
import sys
from typing import Sequence

from feature_store.io import dumps_strict, json_default
from pipelines.jobs.outcome import EXIT_ERROR, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, CommandExit, configure_logging
from pipelines.beam.flags import UnknownFlagError, check_beam_flags
from feature_store.config_tree import (add_config_file_arguments, add_tree_arguments, flat, missing_required,
                                       resolve_tree, to_yaml)


# name -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pipelines.jobs.demo", "whole cascade on a dataset, then the ranker ablation report"),
    "pipeline": ("pipelines.jobs.cascade", "the Beam batch job: sources to a published feature-store version"),
    "data": ("pipelines.jobs.data_stats", "inspect a data source (`qarm data stats`)"),
    "align": ("pipelines.jobs.align", "align the multimodal item encoder to behaviour and evaluate it"),
    "quantize": ("pipelines.jobs.quantize", "quantize item embeddings into semantic-ID codes"),
    "train-ranker": ("pipelines.jobs.train_ranker", "train the TorchRec ranker on a feature-store version"),
    "eval": ("pipelines.jobs.evaluate", "QARM Table-1-style ablation over ranker feature sets"),
    "retrain": ("pipelines.jobs.retrain", "the scheduled retraining job"),
    "distill": ("pipelines.jobs.distill", "PromptMM-style retrieval distillation: teacher, student and KD rows"),
    "retrieve": ("pipelines.jobs.retrieve", "top-K retrieval candidates per user for a window (Parquet)"),
    "store": ("pipelines.jobs.store_admin",
              "list | show | diff | rollback | retain | verify | cleanup | history of feature-store versions"),
}


class UsageError(Exception):
    """A command line that does not parse (argparse's own errors, raised instead of exiting)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting, so the dispatcher can answer ``--json``."""

    def error(self, message):
        raise UsageError(message)


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(dumps_strict(result, default=_printable), flush=True)
        return
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=_printable)
        print(f"{key}: {value}")


def _printable(obj):
    """JSON encoding for printed results: the store's encoder, and str() for anything else (never crash on print)."""
    try:
        return json_default(obj)
    except TypeError:
        return str(obj)


def _top_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qarm",
        description="QARM: aligned multimodal item codes as learnable ranker features.",
        epilog="\n".join(f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="qarm COMMAND [options] [--json]",
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


@contextlib.contextmanager
def _quiet_imports(verbose: bool):
    """Import-time chatter of third-party packages (Beam's "apitools not found" on the root logger) stays out of
    the way unless -v."""
    root = logging.getLogger()
    level = root.level
    if not verbose:
        root.setLevel(logging.ERROR)
        if not root.handlers:
            root.addHandler(logging.NullHandler())
    try:
        yield
    finally:
        root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return EXIT_OK if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    as_json = "--json" in rest
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return _usage_error(_top_parser(), "qarm", None, f"unknown command {name!r}{hint} (choose from "
                                                       f"{', '.join(sorted(COMMANDS))})", as_json)
    module_name, help_ = COMMANDS[name]
    verbose = "-v" in rest or "--verbose" in rest
    with _quiet_imports(verbose):
        module = importlib.import_module(module_name)  # a broken install fails loudly here, never "not built"
    parser = _Parser(prog=f"qarm {name}", description=help_, allow_abbrev=False)  # no knob by a prefix
    tree_cls = getattr(module, "CONFIG_TREE", None)
    if tree_cls is not None:  # flags generated from the typed config tree; absent ones leave no attribute
        add_tree_arguments(parser, tree_cls, with_defaults=False)
        add_config_file_arguments(parser)
    module.add_arguments(parser)
    if not any(a.dest == "json" for a in parser._actions):
        parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    if not any(a.dest == "verbose" for a in parser._actions):
        parser.add_argument("-v", "--verbose", action="store_true",
                            help="third-party libraries log at INFO too (default: WARNING)")
    try:
        args, unknown = _parse(parser, module, rest, tree_cls)
    except UsageError as exc:
        return _usage_error(parser, f"qarm {name}", name, str(exc), as_json)
    configure_logging(getattr(args, "verbose", False))
    try:
        check_beam_flags(unknown)
    except UnknownFlagError as exc:
        print(f"qarm {name}: error: {exc}", file=sys.stderr)
        if as_json:
            _print_result({"command": name, "ok": False, "exit": EXIT_USAGE, "error": str(exc),
                           "error_type": "UnknownFlagError"}, True)
        return EXIT_USAGE
    if tree_cls is not None and args.print_config:
        print(to_yaml(args.config_tree), end="", flush=True)
        return EXIT_OK
    missing = missing_required(args.config_tree) if tree_cls is not None else []
    if missing:
        return _usage_error(parser, f"qarm {name}", name, "the following arguments are required: "
                            + ", ".join(missing), as_json)
    if unknown:
        args.extra_args = unknown
    return _run(name, module, args, as_json)


def _run(name: str, module, args: argparse.Namespace, as_json: bool) -> int:
    """Run the command and map its outcome to an exit code (the module docstring's table) and the printed result."""
    from feature_store.lock import StoreLockedError
    from feature_store.store import StoreConflictError

    try:
        result = module.run(args)
    except CommandExit as exc:
        print(f"qarm {name}: {exc}", file=sys.stderr)
        _print_result({"command": name, "ok": False, "exit": exc.code, "error": str(exc), **exc.result}, as_json)
        return exc.code
    except StoreLockedError as exc:
        print(f"qarm {name}: {exc}", file=sys.stderr)
        _print_result({"command": name, "ok": False, "exit": EXIT_LOCKED, "error": str(exc), "holder": exc.holder},
                      as_json)
        return EXIT_LOCKED
    except StoreConflictError as exc:  # another writer published first (compare-and-swap of CURRENT refused)
        print(f"qarm {name}: {exc}", file=sys.stderr)
        _print_result({"command": name, "ok": False, "exit": EXIT_LOCKED, "error": str(exc),
                       "status": "conflict", "current": exc.current, "expected": exc.expected}, as_json)
        return EXIT_LOCKED
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError, KeyError) as exc:
        # Library errors carry the file / column / row in their message; show it, not a traceback.
        msg = str(exc) if not isinstance(exc, KeyError) else f"missing key {exc}"
        print(f"qarm {name}: error: {msg}", file=sys.stderr)
        if as_json:
            _print_result({"command": name, "ok": False, "exit": EXIT_ERROR, "error": msg,
                           "error_type": type(exc).__name__}, True)
        return EXIT_ERROR
    result = {"command": name, "ok": True, **(result or {})}
    if not as_json and hasattr(module, "human_summary"):  # a job that ends with a summary for a person
        print(module.human_summary(result), flush=True)
    else:
        _print_result(result, as_json)
    return EXIT_OK


def _usage_error(parser: argparse.ArgumentParser, prog: str, name: str | None, message: str, as_json: bool) -> int:
    """argparse's usage + message on stderr (as argparse prints them), the JSON line on stdout with --json."""
    parser.print_usage(sys.stderr)
    print(f"{prog}: error: {message}", file=sys.stderr)
    if as_json:
        _print_result({"command": name, "ok": False, "exit": EXIT_USAGE, "error": message,
                       "error_type": "UsageError"}, True)
    return EXIT_USAGE


def _parse(parser: argparse.ArgumentParser, module, rest: list[str], tree_cls=None):
    """(args, unknown flags); with a config tree, ``args.config_tree`` is resolved (defaults < the command's
    CONFIG_DEFAULTS < --config < flags) and its knobs are set on ``args`` by name. Raises UsageError."""
    # Jobs that pass Beam options through (e.g. `--runner FlinkRunner`) accept unknown flags.
    if getattr(module, "ACCEPTS_EXTRA_ARGS", False):
        args, unknown = parser.parse_known_args(rest)
    else:
        args, unknown = parser.parse_args(rest), []
    if tree_cls is not None:
        try:
            args.config_tree = resolve_tree(tree_cls, args, defaults=getattr(module, "CONFIG_DEFAULTS", None))
        except (ValueError, FileNotFoundError) as exc:  # a bad config file or knob value names itself
            raise UsageError(str(exc)) from None
        vars(args).update(flat(args.config_tree))  # the jobs read knobs by name too
    return args, unknown


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
