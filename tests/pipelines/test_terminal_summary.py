"""The terminal ends with a summary a person reads (the ablation table as text, where the report and the plots
are); --json keeps stdout to the one JSON line."""
import json

import pytest

from oracle_world import oracle_world, publish_world_version, write_world_files
from pipelines.cli import main as qarm_main
from ranker.report import text_table
from ranker.stats import summarize_runs


def _rows():
    runs = {"id": [{"test": {"auc": 0.70, "gauc": 0.60, "logloss": 0.5}, "best_epoch": 1},
                   {"test": {"auc": 0.72, "gauc": 0.62, "logloss": 0.5}, "best_epoch": 1}],
            "vq+rq": [{"test": {"auc": 0.75, "gauc": 0.66, "logloss": 0.4}, "best_epoch": 1},
                      {"test": {"auc": 0.77, "gauc": 0.68, "logloss": 0.4}, "best_epoch": 1}]}
    return summarize_runs(runs)


def test_text_table_is_aligned_plain_text():
    table = text_table(_rows()).splitlines()
    assert table[0].split()[:3] == ["row", "AUC", "GAUC"] and set(table[1]) <= {"-", " "}
    assert table[2].startswith("id ") and "0.7100 ± 0.0141" in table[2]
    assert table[3].startswith("vq+rq ") and "0.7600 ± 0.0141" in table[3]
    assert "|" not in "".join(table) and "**" not in "".join(table)  # not Markdown
    assert table[2].index("0.7100") == table[3].index("0.7600")  # columns line up


def test_demo_summary_names_the_table_report_and_plots():
    from pipelines.jobs.demo_report import terminal_summary

    result = {"seconds": 612.3, "version": "v7", "store": "out/store", "report_md": "out/report.md",
              "report_json": "out/report.json", "plots": {"utilization": "out/utilization.png",
                                                          "ablation": "out/ablation/ablation.png"},
              "next_item_test_aligned": {"recall@10": 0.25, "recall@50": 0.5, "mrr": 0.125},
              "next_item_test_unaligned": {"recall@10": 0.2, "recall@50": None, "mrr": 0.1},
              "ablation_rows": _rows(), "ablation": {"dataset": "synthetic", "seeds": 2, "cascade_seeds": 0,
                                                     "skipped": {"frozen": "no frozen table"},
                                                     "files": {"md": "out/ablation/ablation.md",
                                                               "json": "out/ablation/ablation.json",
                                                               "png": "out/ablation/ablation.png"}}}
    text = terminal_summary(result)
    assert "version v7 in out/store" in text and "612 s" in text
    assert "0.2500" in text and "n/a" in text  # an undefined figure is n/a, not 0
    assert text_table(_rows()).rstrip() in text
    assert "skipped frozen: no frozen table" in text
    for path in ("out/report.md", "out/utilization.png", "out/ablation/ablation.md", "out/ablation/ablation.png"):
        assert path in text
    assert "{" not in text  # no raw dicts
    skipped = terminal_summary({**result, "ablation": None, "ablation_rows": None,
                                "ablation_note": "Skipped (--skip-ablation)."})
    assert "Ranker ablation: Skipped (--skip-ablation)." in skipped


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("summary")
    world = oracle_world(n_items=150, n_users=40, n_events=1500, seed=7)
    items, inter = write_world_files(world, base / "data")
    publish_world_version(world, base / "store")
    return base, items, inter


@pytest.mark.parametrize("as_json", [False, True])
def test_eval_ends_with_the_table_unless_json(world_files, tmp_path, capsys, as_json):
    base, items, inter = world_files
    argv = ["eval", "--dataset", "generic", "--items", str(items), "--interactions", str(inter),
            "--store", str(base / "store"), "--rows", "id,vq+rq", "--seeds", "1", "--history-len", "4",
            "--epochs", "1", "--batch-size", "256", "--bootstrap", "20", "--out", str(tmp_path / "ev")]
    assert qarm_main(argv + (["--json"] if as_json else [])) == 0
    out = capsys.readouterr().out.strip().splitlines()
    if as_json:
        assert len(out) == 1 and json.loads(out[0])["rows"]["vq+rq"]["runs"] == 1  # nothing but the JSON line
        return
    text = "\n".join(out)
    assert out[0].startswith("QARM ablation — ")
    assert any(line.startswith("id ") for line in out) and any(line.startswith("vq+rq ") for line in out)
    assert f"ablation report: {tmp_path / 'ev' / 'ablation.md'}" in text
    assert f"ablation plot:   {tmp_path / 'ev' / 'ablation.png'}" in text
    assert not any(line.startswith(("rows: ", "files: ", "ok: ")) for line in out)  # no raw key: value dump
