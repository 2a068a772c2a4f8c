import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEYS = {"trainable_params", "cache_seconds", "seconds_per_epoch", "seconds_per_epoch_amortised", "peak_rss_mb",
        "next_item_recall@10"}


@pytest.mark.slow
def test_bench_align_reports_every_mode(tmp_path):
    proc = subprocess.run([sys.executable, "bench/align.py", "--encoder", "tiny", "--encoder-image-size", "32",
                           "--steps", "3", "--n-items", "80", "--n-users", "60", "--n-events", "3000",
                           "--data", str(tmp_path / "images"), "--json"],
                          cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report["modes"]) == {"full", "adapters", "side"}
    for mode, row in report["modes"].items():
        assert KEYS <= set(row), mode
        assert row["steps"] == 3, mode  # the same number of optimizer steps for every mode
    assert report["modes"]["side"]["cache_seconds"] > 0 and report["modes"]["full"]["cache_seconds"] == 0
    side, full = report["modes"]["side"], report["modes"]["full"]
    assert side["trainable_params"] < full["trainable_params"]
    assert side["seconds_per_epoch_amortised"] >= side["seconds_per_epoch"]
