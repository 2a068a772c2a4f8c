"""bench/quantize.py runs end to end on a toy size and prints its JSON last (figures are not asserted)."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "quantize.py"


@pytest.mark.slow
def test_bench_quantize_smoke(capsys):
    spec = importlib.util.spec_from_file_location("bench_quantize", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--sizes", "3000x16", "--configs", "2x16", "--sample", "3000", "--threads", "1",
                       "--faiss-variants", "progressive,plain", "--repeats", "2", "--skip-movielens", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    case = result["cases"][0]
    assert case["threads"] == 1 and set(case["faiss"]) == {"progressive", "plain"}
    for theirs in case["faiss"].values():
        assert theirs["speedup_total"] > 0 and theirs["rel_mse_ratio"] > 0 and len(theirs["runs"]) == 2
        assert theirs["settings"]["max_beam_size"] == 1 and theirs["settings"]["train_rows"] == 3000
        totals = sorted(r["total_s"] for r in theirs["runs"])
        assert theirs["median_total_s"] == pytest.approx((totals[0] + totals[1]) / 2)
        assert theirs["speedup_median"] == pytest.approx(theirs["median_total_s"] / case["ours"]["median_total_s"])
        assert theirs["speedup_median_cpu"] == pytest.approx(
            theirs["median_total_cpu_s"] / case["ours"]["median_total_cpu_s"])
        assert all(r["total_cpu_s"] > 0 for r in theirs["runs"])
    bound = case["ours"]["gemm_bound"]
    assert bound["gflops"] == max(bound["gflops_encoder_blocks"], bound["gflops_8192_rows"]) > 0
    assert case["ours"]["encode_vs_gemm_bound"] > 0 and len(case["ours"]["runs"]) == 2
    assert result["collision_resolution"]["unique_after"] is True
    assert result["peak_rss_mib"] > 0
    assert any("GEMM bound" in line for line in out)  # the table states the bound it measured
    assert any("median total of 2 run(s)" in line for line in out)
    assert result["settings"]["device"] == "cpu" and case["ours"]["budget"].startswith("cpu:")
