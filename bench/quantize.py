"""Benchmark: our RQ-Kmeans vs faiss.ResidualQuantizer at the same code size, in one run.

For each embedding size (synthetic clustered float32, L2-normalised) and each code config L x K:
fit + encode seconds, rel_mse and collision_rate for both; our encode time against the machine's GEMM bound
(GEMM rate measured in this run); the speed ratio faiss / ours; peak RSS. Plus collision resolution on the largest
code table, and the MovieLens-scale figures (about 3k items x 64, 3 x 256, with and without the suffix level).

    .venv/bin/python bench/quantize.py --json            # issue sizes: 1,000,000 x 64 and 100,000 x 256
    .venv/bin/python bench/quantize.py --quick --json    # small sizes: a smoke run in about a minute

Both quantizers train on the same random sample (--sample rows); faiss keeps its default beam (--faiss-beam).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import RQKMeans, resolve_collisions  # noqa: E402
from quant import metrics as M  # noqa: E402

log = logging.getLogger("bench.quantize")


def parse_pairs(text: str, what: str) -> list[tuple[int, int]]:
    """'1000000x64,100000x256' -> [(1000000, 64), (100000, 256)]."""
    out = []
    for part in text.split(","):
        try:
            a, b = part.lower().split("x")
            out.append((int(a), int(b)))
        except ValueError as exc:
            raise SystemExit(f"--{what}: cannot parse {part!r}; expected AxB[,AxB...]") from exc
    return out


def clustered_embeddings(n: int, d: int, *, seed: int, n_top: int = 128, n_sub: int = 16,
                         chunk: int = 262144) -> np.ndarray:
    """(n, d) float32 unit vectors from a two-level planted cluster hierarchy (topics -> subtopics -> items)."""
    rng = np.random.default_rng(seed)
    top = rng.normal(size=(n_top, d)).astype(np.float32)
    sub = (top[:, None, :] + 0.5 * rng.normal(size=(n_top, n_sub, d))).reshape(-1, d).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        which = rng.integers(0, sub.shape[0], size=stop - start)
        block = sub[which] + 0.35 * rng.normal(size=(stop - start, d)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[start:stop] = block
    return x


def gemm_gflops(rows: int, d: int, k: int, *, repeats: int = 5) -> float:
    """Measured float32 GEMM rate (GFLOP/s) of torch.mm for (rows, d) @ (d, k), best of ``repeats``."""
    import torch

    a = torch.randn(rows, d)
    b = torch.randn(d, k)
    out = torch.empty(rows, k)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2.0 * rows * d * k / best / 1e9


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def rel_mse_chunked(x: np.ndarray, decode, codes, chunk: int = 262144) -> float:
    err = 0.0
    for start in range(0, len(x), chunk):
        diff = x[start:start + chunk] - decode(codes[start:start + chunk])
        err += float(np.einsum("nd,nd->", diff, diff, dtype=np.float64))
    total = float(((x - x.mean(axis=0, dtype=np.float64)) ** 2).sum(dtype=np.float64))
    return err / total


def run_ours(x: np.ndarray, levels: int, k: int, sample_rows: int, seed: int) -> dict:
    t = time.perf_counter()
    q = RQKMeans(levels=levels, codebook_size=k, seed=seed, sample=sample_rows).fit(x)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    codes = q.encode(x)
    encode_s = time.perf_counter() - t
    return {"method": "qarm RQKMeans", "fit_s": fit_s, "encode_s": encode_s, "total_s": fit_s + encode_s,
            "rel_mse": rel_mse_chunked(x, q.decode, codes), "collision_rate": M.collision_rate(codes),
            "converged_levels": sum(bool(s["converged"]) for s in q.fit_stats["levels"]),
            "_codes": codes}


def run_faiss(x: np.ndarray, levels: int, k: int, sample_rows: int, seed: int, beam: int) -> dict:
    import faiss

    nbits = int(np.log2(k))
    if 2 ** nbits != k:
        raise SystemExit(f"faiss.ResidualQuantizer needs a power-of-two codebook size, got {k}")
    rng = np.random.default_rng(seed)
    train = x if sample_rows >= len(x) else x[np.sort(rng.choice(len(x), sample_rows, replace=False))]
    rq = faiss.ResidualQuantizer(x.shape[1], levels, nbits)
    rq.max_beam_size = beam
    rq.cp.seed = seed
    t = time.perf_counter()
    rq.train(train)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    packed = rq.compute_codes(x)  # (N, code_size) uint8
    encode_s = time.perf_counter() - t
    return {"method": f"faiss.ResidualQuantizer(beam={beam})", "fit_s": fit_s, "encode_s": encode_s,
            "total_s": fit_s + encode_s, "rel_mse": rel_mse_chunked(x, rq.decode, packed),
            "collision_rate": M.collision_rate(packed)}


def movielens_scale(args) -> dict:
    """About 3k items x 64, 3 x 256: the figures a MovieLens-sized catalog gets, with and without the suffix."""
    source = "synthetic clustered 3000 x 64"
    if args.movielens_embeddings:
        from feature_store.tables import read_embeddings

        _, x = read_embeddings(args.movielens_embeddings)
        source = str(args.movielens_embeddings)
    else:
        x = clustered_embeddings(3000, 64, seed=args.seed + 1, n_top=18, n_sub=20)
    t = time.perf_counter()
    q = RQKMeans(levels=3, codebook_size=256, seed=args.seed).fit(x)
    codes = q.encode(x)
    seconds = time.perf_counter() - t
    x_hat = q.decode(codes)
    hits = M.hr_at_k(x, x_hat, (1, 10))
    t = time.perf_counter()
    resolved = resolve_collisions(codes, priority=((x - x_hat) ** 2).sum(axis=1))
    resolve_s = time.perf_counter() - t
    return {"source": source, "n_items": int(x.shape[0]), "dim": int(x.shape[1]), "config": "3x256",
            "fit_encode_s": seconds, "rel_mse": M.rel_mse(x, x_hat), "hr@1": hits[1], "hr@10": hits[10],
            "utilization": M.utilization(codes, 256), "entropy": M.entropy(codes, 256),
            "collision_rate": M.collision_rate(codes), "max_items_per_code": M.max_items_per_code(codes),
            "unique_codes": M.n_unique_codes(codes),
            "resolved": {"collision_rate": M.collision_rate(resolved), "levels": int(resolved.shape[1]),
                         "suffix_size": int(resolved[:, -1].max()) + 1, "seconds": resolve_s}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="NxD list (default 1000000x64,100000x256; --quick smaller)")
    parser.add_argument("--configs", default=None, help="LxK list (default 3x256,3x4096; --quick 3x64,3x256)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast smoke run")
    parser.add_argument("--sample", type=int, default=100_000, help="training rows for both quantizers")
    parser.add_argument("--faiss-beam", type=int, default=5, help="faiss.ResidualQuantizer max_beam_size (default 5)")
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--skip-movielens", action="store_true")
    parser.add_argument("--movielens-embeddings", type=Path, default=None,
                        help="real embeddings Parquet for the MovieLens-scale section (default: synthetic 3k x 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch / faiss threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    import faiss
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    sizes = parse_pairs(args.sizes or ("20000x64,10000x256" if args.quick else "1000000x64,100000x256"), "sizes")
    configs = parse_pairs(args.configs or ("3x64,3x256" if args.quick else "3x256,3x4096"), "configs")
    sample = min(args.sample, 20_000) if args.quick and args.sample == 100_000 else args.sample

    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
                          "torch": torch.__version__, "faiss": faiss.__version__, "load_avg_start": os.getloadavg()},
              "settings": {"sample": sample, "faiss_beam": args.faiss_beam, "seed": args.seed}, "cases": []}
    largest_codes = None
    for n, d in sizes:
        log.info("generating %d x %d clustered embeddings", n, d)
        x = clustered_embeddings(n, d, seed=args.seed)
        for levels, k in configs:
            case = {"n": n, "d": d, "levels": levels, "codebook_size": k, "train_rows": min(sample, n)}
            gflops = gemm_gflops(8192, d, k)
            log.info("%dx%d %dx%d: GEMM rate %.1f GFLOP/s; fitting ours", n, d, levels, k, gflops)
            ours = run_ours(x, levels, k, min(sample, n), args.seed)
            codes = ours.pop("_codes")
            if largest_codes is None or codes.shape[0] > largest_codes.shape[0]:
                largest_codes = codes
            gemm_bound_s = 2.0 * n * d * k * levels / (gflops * 1e9)
            ours.update(gemm_gflops=gflops, gemm_bound_encode_s=gemm_bound_s,
                        encode_vs_gemm_bound=ours["encode_s"] / gemm_bound_s)
            case["ours"] = ours
            case["peak_rss_mib_after_ours"] = peak_rss_mib()  # before faiss runs: our own peak so far
            log.info("ours: fit %.2fs encode %.2fs rel_mse %.4f collisions %.4f (encode %.2fx GEMM bound)",
                     ours["fit_s"], ours["encode_s"], ours["rel_mse"], ours["collision_rate"],
                     ours["encode_vs_gemm_bound"])
            if not args.skip_faiss:
                log.info("fitting faiss.ResidualQuantizer(beam=%d)", args.faiss_beam)
                theirs = run_faiss(x, levels, k, min(sample, n), args.seed, args.faiss_beam)
                case["faiss"] = theirs
                case["speedup_total"] = theirs["total_s"] / ours["total_s"]
                case["rel_mse_ratio"] = ours["rel_mse"] / theirs["rel_mse"]
                log.info("faiss: fit %.2fs encode %.2fs rel_mse %.4f collisions %.4f -> ours %.2fx faster",
                         theirs["fit_s"], theirs["encode_s"], theirs["rel_mse"], theirs["collision_rate"],
                         case["speedup_total"])
            case["peak_rss_mib_so_far"] = peak_rss_mib()
            result["cases"].append(case)
        del x
    if largest_codes is not None:
        t = time.perf_counter()
        resolved = resolve_collisions(largest_codes)
        result["collision_resolution"] = {"n_items": int(largest_codes.shape[0]),
                                          "seconds": time.perf_counter() - t,
                                          "suffix_size": int(resolved[:, -1].max()) + 1,
                                          "unique_after": M.n_unique_codes(resolved) == largest_codes.shape[0]}
    if not args.skip_movielens:
        result["movielens_scale"] = movielens_scale(args)
    result["peak_rss_mib"] = peak_rss_mib()
    result["machine"]["load_avg_end"] = os.getloadavg()
    print_table(result)
    if args.json:
        print(json.dumps(result, default=float), flush=True)
    return 0


def print_table(result: dict) -> None:
    head = (f"{'size':>14} {'code':>7} {'method':<32} {'fit s':>8} {'enc s':>8} {'total s':>8} {'rel_mse':>8} "
            f"{'collide':>8} {'enc/GEMM':>8}")
    print(head)
    print("-" * len(head))
    for case in result["cases"]:
        size = f"{case['n']}x{case['d']}"
        code = f"{case['levels']}x{case['codebook_size']}"
        for key in ("ours", "faiss"):
            if key not in case:
                continue
            r = case[key]
            ratio = f"{r['encode_vs_gemm_bound']:.2f}" if "encode_vs_gemm_bound" in r else ""
            print(f"{size:>14} {code:>7} {r['method']:<32} {r['fit_s']:8.2f} {r['encode_s']:8.2f} "
                  f"{r['total_s']:8.2f} {r['rel_mse']:8.4f} {r['collision_rate']:8.4f} {ratio:>8}")
        if "speedup_total" in case:
            print(f"{'':>14} {'':>7} {'-> ours faster by':<32} {case['speedup_total']:8.2f}x   rel_mse ratio "
                  f"ours/faiss {case['rel_mse_ratio']:.3f}   GEMM {case['ours']['gemm_gflops']:.1f} GFLOP/s")
    if "collision_resolution" in result:
        c = result["collision_resolution"]
        print(f"collision resolution: {c['n_items']} items in {c['seconds']:.3f}s, suffix size {c['suffix_size']}, "
              f"unique after: {c['unique_after']}")
    if "movielens_scale" in result:
        m = result["movielens_scale"]
        print(f"MovieLens scale ({m['source']}, 3x256): rel_mse {m['rel_mse']:.4f} hr@1 {m['hr@1']:.3f} "
              f"hr@10 {m['hr@10']:.3f} collision_rate {m['collision_rate']:.4f} (max {m['max_items_per_code']} per "
              f"code) -> with suffix {m['resolved']['collision_rate']:.4f} (suffix size "
              f"{m['resolved']['suffix_size']}); utilization {[round(u, 3) for u in m['utilization']]}")
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
