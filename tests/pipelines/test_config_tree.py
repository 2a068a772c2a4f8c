"""The cascade's typed config tree and the command line generated from it (pipelines/config)."""
from __future__ import annotations

import argparse
import json
from dataclasses import FrozenInstanceError

import pytest
import yaml

from pipelines.cli import main
from pipelines.config.cascade import AlignSection, CascadeConfig, DataSection, PairsSection
from feature_store.config_tree import (add_config_file_arguments, add_tree_arguments, diff, flag_name, knob_names,
                                   resolve_tree, sections, to_dict, to_yaml, tree_from_dict, with_values)


def _parse(argv, tree_cls=CascadeConfig):
    parser = argparse.ArgumentParser()
    add_tree_arguments(parser, tree_cls, with_defaults=False)
    add_config_file_arguments(parser)
    return resolve_tree(tree_cls, parser.parse_args(argv))


def test_knob_names_are_unique_and_every_flag_follows_the_naming_rule():
    names = knob_names(CascadeConfig)
    assert len(names) == len(set(names)), "a knob name is defined in two sections"
    parser = argparse.ArgumentParser()
    add_tree_arguments(parser, CascadeConfig)
    flags = {a.dest: a.option_strings for a in parser._actions if a.dest in names}
    assert set(flags) == set(names)
    for name, strings in flags.items():
        assert strings[0] == flag_name(name)
    # the only aliases: spellings README / docs of 0.1.0 used (docs/ARCHITECTURE.md lists them)
    aliases = {s for strings in flags.values() for s in strings[1:] if not s.startswith("--no-")}
    assert aliases == {"--map", "--id-maps"}
    # a knob that defaults to on is switched off by --no-<flag> (argparse.BooleanOptionalAction)
    assert flags["user_prompt_adapters"] == ["--user-prompt-adapters", "--no-user-prompt-adapters"]


def test_defaults_are_the_library_configs_defaults():
    """Each knob is defined once: the tree's defaults are the loader's / miner's own."""
    from pipelines.beam.quantize_items import QuantConfig
    from pipelines.data import DataSpec
    from pipelines.mining.pairs import PairConfig

    cfg = CascadeConfig()
    assert cfg.pairs.trigger_similarity == PairConfig().trigger_similarity == "collab"
    assert cfg.pairs.config(seed=0, skip_unaligned=False) == PairConfig()
    assert cfg.data.spec() == DataSpec()
    q = QuantConfig()
    assert (q.rq_levels, q.vq_k, q.vq_index, q.fit_sample) == (cfg.quant.rq_levels, cfg.quant.vq_k,
                                                               cfg.quant.vq_index, cfg.quant.fit_sample)


def test_precedence_defaults_then_config_file_then_flags(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"align": {"align_epochs": 4, "align_mode": "adapters"},
                                    "pairs": {"swing_top_n": 9}, "split": {"split": "user_last_frac"}}))
    cfg = _parse(["--config", str(path), "--align-epochs", "2", "--vq-index", "ivf"])
    assert cfg.align.align_epochs == 2  # the flag beats the file
    assert cfg.align.align_mode == "adapters" and cfg.pairs.swing_top_n == 9  # the file beats the defaults
    assert cfg.split.split == "user_last_frac" and cfg.quant.vq_index == "ivf"
    assert cfg.align.side_layer_stride == AlignSection.side_layer_stride  # untouched: the default
    # a flag given with the *default* value still overrides a file that set something else
    assert _parse(["--config", str(path), "--align-mode", "side"]).align.align_mode == "side"


def test_print_config_round_trips_through_config(tmp_path, capsys):
    assert main(["pipeline", "--print-config", "--swing-top-n", "7", "--map", "items.item_id=sku",
                 "--trigger-similarity", "swing", "--split", "user_last_n"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    printed = tree_from_dict(CascadeConfig, yaml.safe_load(text))
    assert printed.pairs.swing_top_n == 7 and printed.data.column_map == ("items.item_id=sku",)
    assert main(["pipeline", "--print-config", "--config", str(path)]) == 0
    assert capsys.readouterr().out == text  # the file reproduces the resolved config exactly
    assert diff(printed, CascadeConfig()) == {"column_map": (["items.item_id=sku"], []), "swing_top_n": (7, 20),
                                              "trigger_similarity": ("swing", "collab"),
                                              "split": ("user_last_n", "global")}


def test_demo_defaults_sit_below_a_config_file(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["align"]["align_epochs"] == 2  # the demo's CPU-sized default
    path = tmp_path / "c.yaml"
    path.write_text("align:\n  align_epochs: 5\n")
    assert main(["demo", "--out", str(tmp_path), "--print-config", "--config", str(path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["align"]["align_epochs"] == 5


@pytest.mark.parametrize("content, message", [
    ({"align": {"align_epoch": 3}}, "align_epoch"),                       # a misspelt knob
    ({"aligner": {"align_epochs": 3}}, "aligner"),                        # a misspelt section
    ({"align": {"align_mode": "lora"}}, "align_mode"),                    # not one of the choices
    ({"align": {"align_epochs": "six"}}, "align_epochs"),                 # wrong type
    ({"align": {"align_epochs": 0}}, "--align-epochs"),                   # fails the section's validation
    ({"split": {"valid_frac": 0.6, "test_frac": 0.5}}, "valid_frac + test_frac"),
])
def test_bad_config_file_is_a_usage_error_naming_the_key(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    assert main(["pipeline", "--config", str(path), "--print-config", "--json"]) == 2
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ok"] is False and message in out["error"]


def test_unknown_flag_stays_an_error(capsys):
    assert main(["pipeline", "--align-epochz", "3", "--json"]) == 2
    assert "--align-epochz" in capsys.readouterr().out


def test_sections_are_frozen_and_validated():
    cfg = CascadeConfig()
    with pytest.raises(FrozenInstanceError):
        cfg.align.align_epochs = 3
    with pytest.raises(ValueError, match="--side-dropout"):
        AlignSection(side_dropout=1.5)
    with pytest.raises(ValueError, match="max_future|90x"):
        DataSection(max_future="90x")
    with pytest.raises(ValueError, match="unknown knob"):
        with_values(cfg, {"align_epoch": 3})
    assert [name for name, _ in sections(CascadeConfig)] == ["data", "split", "pairs", "align", "quant", "runtime",
                                                             "user_prompts"]
    assert to_dict(with_values(cfg, {"swing_top_n": 3}))["pairs"]["swing_top_n"] == 3
    assert PairsSection(trigger_similarity="swing").config(seed=4, skip_unaligned=True).trigger_fallback == "none"


def test_beam_options_carry_the_tree_and_record_no_credentials():
    from pipelines.beam.options import beam_options_record, cascade_config, options_for

    cfg = with_values(CascadeConfig(), {"swing_top_n": 5, "vq_index": "ivf", "store": "/tmp/s"})
    options = options_for(cfg, ["--runner", "FnApiRunner", "--direct_num_workers", "2",
                                "--aws_access_key_id", "AKIA", "--aws_secret_access_key", "hunter2"])
    assert cascade_config(options) == cfg
    record = beam_options_record(options)
    assert record["runner"] == "FnApiRunner" and record["direct_num_workers"] == 2
    assert not {"aws_access_key_id", "aws_secret_access_key"} & set(record) and "swing_top_n" not in record
    assert yaml.safe_load(to_yaml(cfg)) == to_dict(cfg)


def _tree_commands():
    import importlib

    from pipelines.cli import dispatch

    out = {}
    for name, (module_name, _) in dispatch.COMMANDS.items():
        module = importlib.import_module(module_name)
        if getattr(module, "CONFIG_TREE", None) is not None:
            out[name] = (module.CONFIG_TREE, getattr(module, "CONFIG_DEFAULTS", None))
    return out


def test_every_job_with_a_tree_prints_it_and_keeps_names_unique(capsys):
    trees = _tree_commands()
    assert set(trees) >= {"pipeline", "demo", "eval", "train-ranker", "distill", "retrieve", "retrain", "align"}
    for name, (tree, defaults) in trees.items():
        names = knob_names(tree)
        assert len(names) == len(set(names)), f"qarm {name}: a knob name in two sections"
        extra = ["--out", "x"] if name in ("demo", "retrieve", "align") else []
        assert main([name, "--print-config", *extra]) == 0, name
        printed = yaml.safe_load(capsys.readouterr().out)
        assert tree_from_dict(tree, printed) == resolve_tree(tree, argparse.Namespace(), defaults=defaults)


@pytest.mark.parametrize("command", ["train-ranker", "distill"])
def test_a_required_knob_missing_is_a_usage_error(command, capsys):
    assert main([command, "--json"]) == 2
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "--store" in out["error"] and out["error_type"] == "UsageError"


def test_one_name_per_knob_across_commands():
    """The names the issue found spelt differently per command are one flag everywhere now."""
    import importlib

    from pipelines.cli import dispatch

    def flags(command):
        module = importlib.import_module(dispatch.COMMANDS[command][0])
        parser = argparse.ArgumentParser()
        if getattr(module, "CONFIG_TREE", None) is not None:
            add_tree_arguments(parser, module.CONFIG_TREE)
        module.add_arguments(parser)
        return {s for a in parser._actions for s in a.option_strings}

    pipeline, align, ev, retrain = flags("pipeline"), flags("align"), flags("eval"), flags("retrain")
    for knob_flag in ("--align-epochs", "--align-lr", "--side-layer-stride", "--torch-threads", "--init-encoder",
                      "--align-mode", "--heldout-frac"):
        assert knob_flag in pipeline and knob_flag in align, knob_flag
    assert not {"--epochs", "--lr", "--layer-stride", "--threads", "--init-checkpoint", "--mode"} & align
    assert "--threads" not in ev and "--torch-threads" in ev
    assert "--tail-frac" in retrain and "--holdout-frac" not in retrain
