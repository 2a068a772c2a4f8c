"""Benchmark: our RQ-Kmeans vs faiss.ResidualQuantizer at the same code size, in one run.

For each thread count, embedding size (synthetic clustered float32, L2-normalised) and code config L x K:
fit + encode seconds, rel_mse and collision_rate for ours and for faiss; the speed ratio faiss / ours; our
encode time against the GEMM bound measured in this run; peak RSS. Plus collision resolution on the largest code
table, and the MovieLens-scale figures (about 3k items x 64, 3 x 256, with and without the suffix level).

    .venv/bin/python bench/quantize.py --threads 1 --json       # issue sizes: 1,000,000 x 64 and 100,000 x 256
    .venv/bin/python bench/quantize.py --sizes 200000x64 --configs 3x1024 --threads 1,2 --json
    .venv/bin/python bench/quantize.py --quick --json           # small sizes: a smoke run in about a minute

Baseline. faiss.ResidualQuantizer with beam 1 (``--faiss-beam``), its default training (progressive-dimension
k-means: ``cp.niter`` = 10 iterations at each of 10 growing dimensions, per level), trained on the same random
sample (``--sample`` rows) as ours, with the same thread count (torch and faiss OpenMP both set to ``--threads``).
Speed-ups are given for the fastest run of each side and for the medians of ``--repeats`` runs, in wall-clock
seconds and in CPU seconds of the process (what the code did, without the time it waited for a core on a busy
machine; with one thread the two agree on an idle one).
``--faiss-variants progressive,plain`` adds faiss with plain k-means (``Train_default``, ``cp.niter`` = 10 full
iterations per level): faster than its default and less accurate, shown so the baseline's training choice is
visible. Ours: the library defaults (``RQKMeansConfig``); the table states each side's iteration budget.

GEMM bound. A plain float32 ``torch.mm`` (the BLAS our encoder calls) timed in this run on the encoder's GEMM work:
N rows against each level's (d, K) codebook, at the same thread count, in the encoder's own row blocks and row
ranges and in 8192-row blocks with torch's own threading (the faster rate is the bound), each timing the GEMM
work of up to 262144 rows, best of 3, measured just before and just after our encode (see ``gemm_bound``). ``enc/GEMM`` is our best-of-3 encode over that bound: 1.0
would mean the argmax, the residual updates and the Python loop cost nothing.
Timings on a shared machine are noisy: compare the ratios of one run (the load average is recorded per case).
"""
from __future__ import annotations

import argparse
import functools
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


def gemm_bound(n: int, d: int, sizes: list[int], *, block_rows: int, repeats: int = 3, device: str = "cpu") -> dict:
    """Seconds a plain float32 GEMM needs for an encoder's GEMM work: n rows times each (d, K_l) codebook.

    Two measurements with torch.mm (the BLAS our encoder calls) on random data, at the current torch thread count
    T, each timing the whole work of min(n, 262144) rows (every level, so a sweep lasts as long as the encode of
    those rows and sees the same machine noise), best of ``repeats``: (a) the encoder's own (block_rows, d)
    blocks, split into T row ranges on T single-threaded workers exactly as the encoder splits them
    (``quant.kmeans.for_row_ranges``); (b) 8192-row blocks with torch's own T-thread GEMM. The faster rate is the
    bound: no argmax, no residual update, no Python between blocks. On a GPU the same two sweeps run on the device
    (the encoder's blocks in one range; timings end after a synchronize).

    Returns:
        {"seconds": bound for n rows, "gflops": the rate it uses, "gflops_encoder_blocks", "gflops_8192_rows"}.
    """
    import torch

    from quant.kmeans import for_row_ranges

    on_gpu = str(device).startswith("cuda")
    sweep = min(n, 262144) if not on_gpu else n  # a GPU sweep of n rows takes milliseconds
    operands = {k: torch.randn(d, k, device=device) for k in set(sizes)}
    rates = {}
    for name, rows in (("gflops_encoder_blocks", min(block_rows, n)), ("gflops_8192_rows", min(8192, n))):
        a = torch.randn(rows, d, device=device)
        sweep_rows = -(-sweep // rows) * rows

        def plain_gemms(lo: int, hi: int) -> None:
            out = torch.empty(rows * max(sizes), device=device)
            for k in sizes:
                for _ in range(lo, hi, rows):
                    torch.mm(a, operands[k], out=out[: rows * k].view(rows, k))
            if on_gpu:
                torch.cuda.synchronize(device)

        if name == "gflops_encoder_blocks":
            run = functools.partial(for_row_ranges, sweep_rows, rows, device, plain_gemms)
        else:
            run = functools.partial(plain_gemms, 0, sweep_rows)
        run()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
        rates[name] = 2.0 * sweep_rows * d * sum(sizes) / best / 1e9
    gflops = max(rates.values())
    return {"seconds": 2.0 * n * d * sum(sizes) / (gflops * 1e9), "gflops": gflops, **rates}


def merge_bounds(a: dict, b: dict) -> dict:
    """The faster of two GEMM-bound measurements (before and after the encode runs), rate by rate."""
    out = {key: max(a[key], b[key]) for key in a if key.startswith("gflops")}
    out["seconds"] = min(a["seconds"], b["seconds"])
    return out


class Stopwatch:
    """Wall-clock and CPU seconds (every thread of this process) of a ``with`` block. On a shared machine the CPU
    seconds are the work the code did; the wall seconds add the time it waited for a core (with T threads, CPU
    seconds are up to T times the wall seconds)."""

    def __enter__(self) -> "Stopwatch":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def rel_mse_chunked(x: np.ndarray, decode, codes, chunk: int = 262144) -> float:
    err = 0.0
    for start in range(0, len(x), chunk):
        diff = x[start:start + chunk] - decode(codes[start:start + chunk])
        err += float(np.einsum("nd,nd->", diff, diff, dtype=np.float64))
    total = float(((x - x.mean(axis=0, dtype=np.float64)) ** 2).sum(dtype=np.float64))
    return err / total


def run_ours(x: np.ndarray, levels: int, k: int, sample_rows: int, seed: int, encode_repeats: int,
             device: str = "cpu") -> dict:
    from quant.kmeans import chunk_rows_for

    with Stopwatch() as fit:
        q = RQKMeans(levels=levels, codebook_size=k, seed=seed, sample=sample_rows, device=device,
                     faiss_gpu=False if device == "cpu" else "auto").fit(x)
    device = q.fit_stats["device"]
    bound_of = functools.partial(gemm_bound, x.shape[0], x.shape[1], q.config.codebook_sizes,
                                 block_rows=chunk_rows_for(k, device=device), device=device)
    before = bound_of()
    encodes = []
    for _ in range(encode_repeats):
        with Stopwatch() as encode:
            codes = q.encode(x)
        encodes.append(encode)
    encode_times = [e.wall for e in encodes]
    bound = merge_bounds(before, bound_of())
    cfg, stats = q.config, q.fit_stats
    budget = (f"{device}: {cfg.init} seeds + <={cfg.niter} Lloyd/level, {stats['joint']['rounds']} joint rounds "
              f"(cap {cfg.refine_iter}, tol {cfg.tol:g})")
    return {"method": "qarm RQKMeans", "fit_s": fit.wall, "encode_s": encode_times[0],
            "total_s": fit.wall + encode_times[0], "fit_cpu_s": fit.cpu, "encode_cpu_s": encodes[0].cpu,
            "total_cpu_s": fit.cpu + encodes[0].cpu,
            "encode_best_s": min(encode_times), "rel_mse": rel_mse_chunked(x, q.decode, codes),
            "collision_rate": M.collision_rate(codes), "budget": budget,
            "lloyd_iterations": [s_["iterations"] for s_ in stats["levels"]], "joint": stats["joint"],
            "gemm_bound": bound, "encode_vs_gemm_bound": min(encode_times) / bound["seconds"], "_codes": codes}


FAISS_VARIANTS = ("progressive", "plain")


def run_faiss(x: np.ndarray, levels: int, k: int, sample_rows: int, seed: int, beam: int,
              variant: str = "progressive") -> dict:
    """faiss.ResidualQuantizer on the same training sample as ours (same seed, same rows).

    variant: 'progressive' is faiss's default training (progressive-dimension k-means); 'plain' is Train_default
    (plain k-means), both with faiss's default ``cp.niter``.
    """
    import faiss

    nbits = int(np.log2(k))
    if 2 ** nbits != k:
        raise SystemExit(f"faiss.ResidualQuantizer needs a power-of-two codebook size, got {k}")
    if variant not in FAISS_VARIANTS:
        raise SystemExit(f"--faiss-variants: unknown {variant!r}; expected {FAISS_VARIANTS}")
    rq = faiss.ResidualQuantizer(x.shape[1], levels, nbits)
    rq.max_beam_size = beam
    rq.cp.seed = seed
    if variant == "plain":
        rq.train_type = faiss.ResidualQuantizer.Train_default
        budget = f"{rq.cp.niter} k-means iters/level"
    else:
        steps = faiss.ProgressiveDimClusteringParameters().progressive_dim_steps
        budget = f"{rq.cp.niter} iters x {steps} dims/level"
    train = sample_rows_of(x, sample_rows, seed)
    with Stopwatch() as fit:
        rq.train(train)
    with Stopwatch() as encode:
        packed = rq.compute_codes(x)  # (N, code_size) uint8
    return {"method": f"faiss.RQ(beam={beam}, {variant})", "fit_s": fit.wall, "encode_s": encode.wall,
            "total_s": fit.wall + encode.wall, "fit_cpu_s": fit.cpu, "encode_cpu_s": encode.cpu,
            "total_cpu_s": fit.cpu + encode.cpu, "rel_mse": rel_mse_chunked(x, rq.decode, packed),
            "collision_rate": M.collision_rate(packed), "budget": budget,
            "settings": {"max_beam_size": beam, "train_type": int(rq.train_type), "cp.niter": int(rq.cp.niter),
                         "cp.max_points_per_centroid": int(rq.cp.max_points_per_centroid), "train_rows": len(train)}}


def sample_rows_of(x: np.ndarray, sample_rows: int, seed: int) -> np.ndarray:
    """The training rows RQKMeans(sample=sample_rows, seed=seed) draws, so both quantizers see the same sample."""
    if sample_rows >= len(x):
        return x
    rng = np.random.default_rng(seed)
    return x[np.sort(rng.choice(len(x), size=sample_rows, replace=False))]


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


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="NxD list (default 1000000x64,100000x256; --quick smaller)")
    parser.add_argument("--configs", default=None, help="LxK list (default 3x256,3x4096; --quick 3x64,3x256)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast smoke run")
    parser.add_argument("--sample", type=int, default=100_000, help="training rows for both quantizers")
    parser.add_argument("--faiss-beam", type=int, default=1, help="faiss.ResidualQuantizer max_beam_size (default 1)")
    parser.add_argument("--faiss-variants", default="progressive",
                        help="faiss training: 'progressive' (its default), 'plain' (Train_default), or both")
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--skip-movielens", action="store_true")
    parser.add_argument("--movielens-embeddings", type=Path, default=None,
                        help="real embeddings Parquet for the MovieLens-scale section (default: synthetic 3k x 64)")
    parser.add_argument("--threads", default="1",
                        help="torch (MKL) and faiss (OpenMP) threads, set explicitly; a list runs each: 1,2")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each method per case, alternating ours / faiss; the fastest total is reported")
    parser.add_argument("--encode-repeats", type=int, default=3, help="our encode runs (best one vs the GEMM bound)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                        help="our quantizer's device (cuda: GEMMs on the GPU, faiss GPU k-means where faiss has one; "
                             "the GEMM bound is measured there too); faiss.ResidualQuantizer runs on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    args = parser.parse_args(argv)
    try:
        args.threads = [int(t) for t in str(args.threads).split(",")]
    except ValueError as exc:
        raise SystemExit(f"--threads: expected N or N,M,..., got {args.threads!r}") from exc
    args.faiss_variants = [v.strip() for v in args.faiss_variants.split(",") if v.strip()]
    return args


def set_threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def best_of(runs: list[dict]) -> dict:
    """The run with the least total time, with every run's fit / encode / total seconds kept beside it and the
    median total (timings on a shared machine are noisy; the results themselves are deterministic and equal across
    runs)."""
    best = dict(min(runs, key=lambda r: r["total_s"]))
    best["runs"] = [{key: r[key] for key in ("fit_s", "encode_s", "total_s", "total_cpu_s")} for r in runs]
    best["median_total_s"] = float(np.median([r["total_s"] for r in runs]))
    best["median_total_cpu_s"] = float(np.median([r["total_cpu_s"] for r in runs]))
    return best


def run_case(x: np.ndarray, levels: int, k: int, args, sample: int, threads: int) -> tuple[dict, np.ndarray]:
    """One size x config x thread count: ours and each faiss variant, ``--repeats`` times in alternation."""
    n, d = x.shape
    case = {"threads": threads, "n": n, "d": d, "levels": levels, "codebook_size": k,
            "train_rows": min(sample, n), "load_avg_start": os.getloadavg()}
    ours_runs, faiss_runs = [], {variant: [] for variant in ([] if args.skip_faiss else args.faiss_variants)}
    for repeat in range(args.repeats):
        log.info("%dx%d %dx%d, %d thread(s), run %d/%d: fitting ours", n, d, levels, k, threads, repeat + 1,
                 args.repeats)
        ours = run_ours(x, levels, k, min(sample, n), args.seed, args.encode_repeats, args.device)
        codes = ours.pop("_codes")
        ours_runs.append(ours)
        case["peak_rss_mib_after_ours"] = peak_rss_mib()  # before faiss runs: our own peak so far
        log.info("ours: fit %.2fs encode %.2fs (best %.2fs) rel_mse %.4f collisions %.4f (encode %.2fx the GEMM "
                 "bound %.2fs, %.1f GFLOP/s)", ours["fit_s"], ours["encode_s"], ours["encode_best_s"],
                 ours["rel_mse"], ours["collision_rate"], ours["encode_vs_gemm_bound"],
                 ours["gemm_bound"]["seconds"], ours["gemm_bound"]["gflops"])
        for variant, runs in faiss_runs.items():
            log.info("fitting faiss.ResidualQuantizer(beam=%d, %s)", args.faiss_beam, variant)
            theirs = run_faiss(x, levels, k, min(sample, n), args.seed, args.faiss_beam, variant)
            runs.append(theirs)
            log.info("faiss %s: fit %.2fs encode %.2fs rel_mse %.4f collisions %.4f", variant, theirs["fit_s"],
                     theirs["encode_s"], theirs["rel_mse"], theirs["collision_rate"])
    ours = best_of(ours_runs)
    ours["encode_best_s"] = min(r["encode_best_s"] for r in ours_runs)
    ours["gemm_bound"] = functools.reduce(merge_bounds, [r["gemm_bound"] for r in ours_runs])
    ours["encode_vs_gemm_bound"] = ours["encode_best_s"] / ours["gemm_bound"]["seconds"]
    case["ours"] = ours
    if faiss_runs:
        case["faiss"] = {}
        for variant, runs in faiss_runs.items():
            theirs = best_of(runs)
            theirs["speedup_total"] = theirs["total_s"] / ours["total_s"]
            theirs["speedup_median"] = theirs["median_total_s"] / ours["median_total_s"]
            theirs["speedup_median_cpu"] = theirs["median_total_cpu_s"] / ours["median_total_cpu_s"]
            theirs["rel_mse_ratio"] = ours["rel_mse"] / theirs["rel_mse"]
            case["faiss"][variant] = theirs
            log.info("best of %d: ours %.2fs vs faiss %s %.2fs -> %.2fx faster (medians %.2fs vs %.2fs: %.2fx), "
                     "rel_mse ratio %.3f", args.repeats, ours["total_s"], variant, theirs["total_s"],
                     theirs["speedup_total"], ours["median_total_s"], theirs["median_total_s"],
                     theirs["speedup_median"], theirs["rel_mse_ratio"])
    case["load_avg_end"] = os.getloadavg()
    case["peak_rss_mib_so_far"] = peak_rss_mib()
    return case, codes


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    import faiss
    import torch

    sizes = parse_pairs(args.sizes or ("20000x64,10000x256" if args.quick else "1000000x64,100000x256"), "sizes")
    configs = parse_pairs(args.configs or ("3x64,3x256" if args.quick else "3x256,3x4096"), "configs")
    sample = min(args.sample, 20_000) if args.quick and args.sample == 100_000 else args.sample
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "faiss": faiss.__version__,
                          "faiss_compile_options": faiss.get_compile_options(),  # DD: SIMD level chosen at run time
                          "load_avg_start": os.getloadavg()},
              "settings": {"sample": sample, "faiss_beam": args.faiss_beam, "faiss_variants": args.faiss_variants,
                           "threads": args.threads, "repeats": args.repeats, "device": args.device, "encode_repeats": args.encode_repeats, "seed": args.seed},
              "cases": []}
    largest_codes = None
    for n, d in sizes:
        log.info("generating %d x %d clustered embeddings", n, d)
        x = clustered_embeddings(n, d, seed=args.seed)
        for threads in args.threads:
            set_threads(threads)
            for levels, k in configs:
                case, codes = run_case(x, levels, k, args, sample, threads)
                result["cases"].append(case)
                if largest_codes is None or codes.shape[0] > largest_codes.shape[0]:
                    largest_codes = codes
        del x
    set_threads(args.threads[0])
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
    head = (f"{'thr':>3} {'size':>12} {'code':>7} {'method':<30} {'fit s':>8} {'enc s':>7} {'total s':>8} "
            f"{'rel_mse':>8} {'collide':>7} {'speedup':>7} {'enc/GEMM':>8}  iteration budget")
    print(head)
    print("-" * len(head))
    for case in result["cases"]:
        size = f"{case['n']}x{case['d']}"
        code = f"{case['levels']}x{case['codebook_size']}"
        rows = [(case["ours"], "", f"{case['ours']['encode_vs_gemm_bound']:.2f}")]
        rows += [(r, f"{r['speedup_total']:.2f}x", "") for r in case.get("faiss", {}).values()]
        for r, speedup, ratio in rows:
            print(f"{case['threads']:>3} {size:>12} {code:>7} {r['method']:<30} {r['fit_s']:8.2f} {r['encode_s']:7.2f} "
                  f"{r['total_s']:8.2f} {r['rel_mse']:8.4f} {r['collision_rate']:7.4f} {speedup:>7} {ratio:>8}  "
                  f"{r['budget']}")
        bound = case["ours"]["gemm_bound"]
        ratios = ", ".join(f"{v}: {r['rel_mse_ratio']:.3f}" for v, r in case.get("faiss", {}).items())
        medians = ", ".join(f"faiss {v} {r['median_total_s']:.2f}s ({r['speedup_median']:.2f}x; CPU seconds "
                            f"{r['median_total_cpu_s']:.2f}, {r['speedup_median_cpu']:.2f}x)"
                            for v, r in case.get("faiss", {}).items())
        print(f"{'':>3} {'':>12} {'':>7} GEMM bound {bound['seconds']:.2f}s at {bound['gflops']:.1f} GFLOP/s (encoder "
              f"blocks {bound['gflops_encoder_blocks']:.1f}, 8192 rows {bound['gflops_8192_rows']:.1f}); our best "
              f"encode {case['ours']['encode_best_s']:.2f}s; rel_mse ours/faiss {ratios or '-'}; load "
              f"{case['load_avg_start'][0]:.1f} -> {case['load_avg_end'][0]:.1f}")
        print(f"{'':>3} {'':>12} {'':>7} median total of {len(case['ours']['runs'])} run(s): ours "
              f"{case['ours']['median_total_s']:.2f}s (CPU seconds {case['ours']['median_total_cpu_s']:.2f})"
              f"{'; ' + medians if medians else ''}")
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
