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
                       "--skip-movielens", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    case = result["cases"][0]
    assert {"ours", "faiss", "speedup_total", "rel_mse_ratio"} <= case.keys()
    assert case["ours"]["gemm_gflops"] > 0 and case["ours"]["encode_vs_gemm_bound"] > 0
    assert result["collision_resolution"]["unique_after"] is True
    assert result["peak_rss_mib"] > 0
