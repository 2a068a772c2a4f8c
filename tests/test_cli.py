"""The `qarm` dispatcher: --json as the last stdout line (strict JSON), errors as exit codes, one flag dialect."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pipelines.cli import dispatch as cli

REPO = Path(__file__).resolve().parents[1]


def _fake_command(monkeypatch, name: str, run):
    module = types.ModuleType(f"qarm_test_fake_{name}")
    module.add_arguments = lambda parser: parser.add_argument("--x", type=int, default=1)
    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, name, (module.__name__, "a fake command"))


def test_a_command_whose_module_is_missing_fails_loudly(monkeypatch):
    # every command is built: a missing module is a broken install, never a quiet "not built yet" exit
    monkeypatch.setitem(cli.COMMANDS, "later", ("pipelines.no_such_module_yet", "not written"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["later", "--json"])


def test_every_registered_command_imports_and_builds_its_parser():
    import argparse
    import importlib

    for name, (module_name, _) in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"qarm {name}")
        module.add_arguments(parser)
        assert parser.format_help().startswith(f"usage: qarm {name}")


def test_missing_dependency_inside_a_built_module_is_not_hidden(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "broken", ("qarm_test_broken_pkg.cmd", "imports a missing lib"))
    # The module's own name resolves, but a library it imports does not: that is a bug, not "not built yet".
    def fake_import(name):
        raise ModuleNotFoundError("No module named 'some_missing_lib'", name="some_missing_lib")
    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["broken"])


def test_json_result_is_the_last_stdout_line(monkeypatch, capsys):
    def run(args):
        print("some progress on stdout")
        return {"x": args.x, "nested": {"a": [1, 2]}}
    _fake_command(monkeypatch, "fake", run)
    assert cli.main(["fake", "--x", "5", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == {"command": "fake", "ok": True, "x": 5, "nested": {"a": [1, 2]}}


def test_value_error_becomes_exit_1_with_message(monkeypatch, capsys):
    def run(args):
        raise ValueError("items.csv: column 'sku' row 3: bad")
    _fake_command(monkeypatch, "bad", run)
    assert cli.main(["bad", "--json"]) == 1
    out, err = capsys.readouterr()
    assert "items.csv: column 'sku' row 3: bad" in err and "Traceback" not in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] is False and result["error_type"] == "ValueError" and "row 3" in result["error"]


def test_command_exit_keeps_its_code(monkeypatch, capsys):
    def run(args):
        raise cli.CommandExit(3, "gate rejected", {"auc": 0.5})
    _fake_command(monkeypatch, "gate", run)
    assert cli.main(["gate", "--json"]) == 3
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["auc"] == 0.5


def test_unknown_command_is_a_usage_error(capsys):
    assert cli.main(["no-such-command"]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert "unknown command 'no-such-command'" in err and out == ""  # no --json: no JSON line


@pytest.mark.parametrize("argv, says", [
    (["pipline", "--json"], "unknown command 'pipline'; did you mean 'pipeline'?"),
    (["train-ranker", "--store", "S", "--encoder", "tiny", "--json"], "unrecognized arguments: --encoder tiny"),
    (["store", "list", "--store", "S", "--bogus", "--json"], "unrecognized arguments: --bogus"),
    (["store", "lst", "--store", "S", "--json"], "invalid choice: 'lst'"),
    (["store", "list", "--json"], "the following arguments are required: --store"),
    (["pipeline", "--align-epochs", "two", "--json"], "argument --align-epochs: invalid int value: 'two'"),
])
def test_every_usage_error_prints_a_json_line(argv, says, capsys):
    """Issue 19 case 6: argparse's errors exited 2 without the JSON line `--json` promises."""
    assert cli.main(argv) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] is False and result["exit"] == 2 and result["error_type"] == "UsageError"
    assert says in result["error"] and says in err and "usage: qarm" in err


def _qarm(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_data_stats_end_to_end(tmp_path):
    proc = _qarm("data", "stats", "--dataset", "synthetic", "--data", str(tmp_path), "--n-items", "60",
                 "--n-users", "20", "--n-events", "500", "--n-clusters", "4", "--image-size", "16",
                 "--split", "global", "--rejects", str(tmp_path / "rej.parquet"), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["items"] == 60 and result["interactions"] == 500 and result["users"] <= 20
    assert result["rejected"] == {} and (tmp_path / "rej.parquet").exists()
    assert sum(result["split"][p]["interactions"] for p in ("train", "valid", "test")) == 500


def test_data_stats_reports_rejects_and_bad_files(tmp_path, capsys):
    (tmp_path / "i.csv").write_text("item_id,title\n1,a\n1,dup\n")
    (tmp_path / "r.csv").write_text("user_id,item_id,ts\n1,1,5\n1,9,6\n")
    args = ["data", "stats", "--dataset", "generic", "--items", str(tmp_path / "i.csv"),
            "--interactions", str(tmp_path / "r.csv"), "--json"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rejected"] == {"duplicate_item": 1, "unknown_item": 1} and result["interactions"] == 1
    (tmp_path / "r.csv").write_text("user_id,item_id,when\n1,1,5\n")
    assert cli.main(args) == 1
    out, err = capsys.readouterr()
    assert "r.csv" in err and "'ts'" in err and "Traceback" not in err
    assert "missing column" in json.loads(out.strip().splitlines()[-1])["error"]


def test_data_flag_misuse_is_exit_1(capsys):
    assert cli.main(["data", "stats", "--dataset", "synthetic", "--items", "x.csv"]) == 1
    assert "--items only apply to --dataset generic" in capsys.readouterr().err


def test_movielens_stats(movielens_dir, capsys):
    assert cli.main(["data", "stats", "--dataset", "movielens", "--data", str(movielens_dir),
                     "--validate-images", "exists", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["users"] == 610 and result["interactions"] == 100_836 and result["items_with_image"] == 2_947


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_built_command_follows_the_module_contract(name):
    """Each command module that exists defines add_arguments(parser) and run(args) at top level.

    Read with `ast`, not imported: the dispatcher imports lazily so that `qarm data` never pays for torch."""
    import ast

    module_name = cli.COMMANDS[name][0]
    base = REPO.joinpath(*module_name.split("."))
    path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)
    if path is None:
        pytest.skip(f"qarm {name}: {module_name} not built yet")
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    imported = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    for fn in ("add_arguments", "run"):
        if fn in imported and fn not in functions:
            continue  # re-exported from a submodule: its signature lives there
        assert fn in functions, f"{path}: no top-level {fn}()"
        args = functions[fn].args
        positional, required = len(args.args), len(args.args) - len(args.defaults)
        # Callable as fn(x): e.g. Beam-style run(argv=None, save_main_session=True, test_pipeline=None) is fine.
        assert positional >= 1 and required <= 1, f"{path}: {fn} must be callable with one argument"


def test_strict_json_prints_null_never_nan(monkeypatch, capsys):
    import numpy as np

    _fake_command(monkeypatch, "nanny", lambda args: {"recall": float("nan"), "inf": np.float32("inf"),
                                                     "nested": [np.float64("nan"), 1.5]})
    assert cli.main(["nanny", "--json"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "NaN" not in line and "Infinity" not in line
    parsed = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert parsed["recall"] is None and parsed["inf"] is None and parsed["nested"] == [None, 1.5]


def test_a_flag_neither_qarm_nor_beam_knows_is_a_usage_error(capsys):
    code = cli.main(["pipeline", "--store", "/nonexistent/never-used", "--align_epochz", "5", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and "--align_epochz" in err
    assert json.loads(out.strip().splitlines()[-1])["error_type"] == "UnknownFlagError"


def test_beam_flags_pass_the_unknown_flag_check():
    from pipelines.beam.flags import UnknownFlagError, check_beam_flags

    check_beam_flags(["--runner", "FlinkRunner", "--flink_master", "host:8081", "--direct_num_workers", "2",
                      "--environment_type", "LOOPBACK"])
    with pytest.raises(UnknownFlagError, match="--bogus_flag"):
        check_beam_flags(["--runner", "FlinkRunner", "--bogus_flag", "1"])


def test_old_underscore_spelling_is_refused_as_unknown(capsys):
    """One naming rule: the 0.0 underscore spellings are no longer aliases but unknown flags (exit 2)."""
    assert cli.main(["pipeline", "--align_epochs", "5", "--store", "/nonexistent", "--json"]) == 2
    assert "--align_epochs" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_speaks_hyphens_and_shows_its_groups(command):
    import argparse
    import importlib

    module = importlib.import_module(cli.COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"qarm {command}")
    module.add_arguments(parser)
    flags = [f for a in parser._actions for f in a.option_strings if f.startswith("--")]
    assert flags and not [f for f in flags if "_" in f], f"qarm {command}: underscore flags"
    if len(flags) > 8:  # commands with many flags group them under headings
        assert len(parser._action_groups) > 2


def test_every_flag_the_docs_show_exists():
    """README and docs/*.md command lines use only flags their command (or Beam) knows: a renamed knob cannot
    leave a stale doc behind."""
    import argparse
    import importlib
    import re

    from feature_store.config_tree import add_config_file_arguments, add_tree_arguments
    from pipelines.beam.flags import beam_flag_parser

    repo = Path(__file__).resolve().parents[1]
    known = {}
    for name, (module_name, _) in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(add_help=False)
        if getattr(module, "CONFIG_TREE", None) is not None:
            add_tree_arguments(parser, module.CONFIG_TREE)
            add_config_file_arguments(parser)
        module.add_arguments(parser)
        known[name] = {s for a in parser._actions for s in a.option_strings} | {"--json", "--verbose", "-v"}
    beam = {s for a in beam_flag_parser()._actions for s in a.option_strings}
    stale = []
    for doc in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        for line in doc.read_text().replace("\\\n", " ").splitlines():
            for match in re.finditer(r"qarm ([a-z-]+)((?: [^`|#]*)?)", line):
                if match.group(1) not in known:
                    continue
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", match.group(2)):
                    if flag not in known[match.group(1)] and flag not in beam:
                        stale.append(f"{doc.name}: qarm {match.group(1)} {flag}")
    assert not stale
