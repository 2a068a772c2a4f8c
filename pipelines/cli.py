"""`qarm` console script: a thin dispatcher over the packages' command modules.

Each subcommand lives in the package that owns it, as a module with two functions:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> dict      # the machine-readable result

The dispatcher imports only the chosen module (start-up stays fast, libraries stay side-effect free), prints a
human summary, and with ``--json`` prints the result as one JSON line, always the last line of stdout.
A command whose module does not exist yet exits 2 with "not built yet" instead of faking a result.

Exit codes: 0 ok, 1 error (bad input, failed job), 2 usage / not built, 3 rejected by a validation gate,
4 another run holds the lock.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Sequence

from feature_store.io import json_default

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REJECTED, EXIT_LOCKED = 0, 1, 2, 3, 4

# name -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pipelines.demo", "whole cascade on a dataset, then the ranker ablation report"),
    "pipeline": ("pipelines.cascade", "the Beam batch job: sources to a published feature-store version"),
    "data": ("pipelines.data.cli", "inspect a data source (`qarm data stats`)"),
    "align": ("pipelines.mllm.cli", "align the multimodal item encoder to behaviour and evaluate it"),
    "quantize": ("quant.cli", "quantize item embeddings into semantic-ID codes"),
    "train-ranker": ("ranker.cli", "train the TorchRec ranker on a feature-store version"),
    "eval": ("ranker.ablation", "QARM Table-1-style ablation over ranker feature sets"),
    "retrain": ("pipelines.retrain", "the scheduled retraining job"),
    "distill": ("pipelines.distill", "PromptMM-style retrieval distillation: teacher, student and KD rows"),
    "retrieve": ("pipelines.retrieve", "top-K retrieval candidates per user for a window (Parquet)"),
    "store": ("feature_store.cli",
              "list | show | diff | rollback | retain | verify | cleanup | history of feature-store versions"),
}


class CommandExit(Exception):
    """Raised by a command to end with a specific exit code and a machine-readable result."""

    def __init__(self, code: int, message: str, result: dict | None = None):
        super().__init__(message)
        self.code = code
        self.result = result or {}


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=_printable, sort_keys=False), flush=True)
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
    parser = argparse.ArgumentParser(
        prog="qarm",
        description="QARM: aligned multimodal item codes as learnable ranker features.",
        epilog="\n".join(f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="qarm COMMAND [options] [--json]",
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return EXIT_OK if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _top_parser().parse_args([name])  # prints the choices and exits 2
    module_name, help_ = COMMANDS[name]
    as_json = "--json" in rest
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            msg = f"qarm {name}: not built yet"
            print(msg, file=sys.stderr)
            if as_json:
                _print_result({"command": name, "ok": False, "error": "not built yet"}, True)
            return EXIT_USAGE
        raise
    parser = argparse.ArgumentParser(prog=f"qarm {name}", description=help_)
    module.add_arguments(parser)
    if not any(a.dest == "json" for a in parser._actions):
        parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    args, unknown = _parse(parser, module, rest)
    if unknown:
        args.extra_args = unknown
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    try:
        result = module.run(args)
    except CommandExit as exc:
        print(f"qarm {name}: {exc}", file=sys.stderr)
        _print_result({"command": name, "ok": False, "error": str(exc), **exc.result}, as_json)
        return exc.code
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError, KeyError) as exc:
        # Library errors carry the file / column / row in their message; show it, not a traceback.
        msg = str(exc) if not isinstance(exc, KeyError) else f"missing key {exc}"
        print(f"qarm {name}: error: {msg}", file=sys.stderr)
        if as_json:
            _print_result({"command": name, "ok": False, "error": msg, "error_type": type(exc).__name__}, True)
        return EXIT_ERROR
    result = {"command": name, "ok": True, **(result or {})}
    _print_result(result, as_json)
    return EXIT_OK


def _parse(parser: argparse.ArgumentParser, module, rest: list[str]):
    # Jobs that pass Beam options through (e.g. `--runner FlinkRunner`) accept unknown flags.
    if getattr(module, "ACCEPTS_EXTRA_ARGS", False):
        return parser.parse_known_args(rest)
    return parser.parse_args(rest), []


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
