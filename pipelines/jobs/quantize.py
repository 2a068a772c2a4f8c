"""`qarm quantize`: embeddings Parquet -> semantic-ID codes, the saved quantizer and codebook metrics.

    qarm quantize --embeddings emb.parquet --method rq-kmeans --levels 3 --codebook-size 256 --out DIR --json

Writes into --out (each file atomically): codes.parquet (item_id, rq list<int32> | vq list<int64> of neighbour
item ids), quantizer/ (safetensors + quantizer.json, loadable with quant.load_quantizer) and metrics.json.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

METHODS = ("rq-kmeans", "vq", "res-kmeans-fsq", "rq-vae")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input / output")
    io.add_argument("--embeddings", required=True, type=Path, help="Parquet: item_id, embedding list<float>[d]")
    io.add_argument("--id-column", default="item_id")
    io.add_argument("--embedding-column", default="embedding")
    io.add_argument("--out", required=True, type=Path, help="output folder (created)")
    q = parser.add_argument_group("quantizer")
    q.add_argument("--method", choices=METHODS, default="rq-kmeans")
    q.add_argument("--levels", type=int, default=3, help="code levels L (res-kmeans-fsq: L-1 k-means + FSQ)")
    q.add_argument("--codebook-size", type=int, default=256, help="centroids per level K")
    q.add_argument("--vq-k", type=int, default=25, help="neighbours per item for --method vq")
    q.add_argument("--vq-index", choices=("flat", "ivf"), default="flat")
    q.add_argument("--nprobe", type=int, default=16, help="IVF cells visited (--vq-index ivf)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--sample", type=int, default=None, help="train k-means on this many rows")
    q.add_argument("--balanced", action="store_true", help="size-constrained (balanced) k-means assignment")
    q.add_argument("--niter", type=int, default=10,
                   help="faiss k-means iterations before the converging Lloyd refinement")
    q.add_argument("--init-from", type=Path, default=None,
                   help="warm start from a saved rq-kmeans / res-kmeans-fsq quantizer folder (stable codes)")
    q.add_argument("--fsq-levels", default=None, help="FSQ bins per dimension, e.g. 4,4,4,4")
    q.add_argument("--fsq-grid", choices=("quantile", "uniform"), default="quantile")
    q.add_argument("--epochs", type=int, default=50, help="rq-vae epochs")
    q.add_argument("--latent-dim", type=int, default=32, help="rq-vae latent width")
    q.add_argument("--gradient", choices=("rotation", "ste"), default="rotation", help="rq-vae gradient estimator")
    q.add_argument("--batch-size", type=int, default=1024, help="rq-vae batch size")
    q.add_argument("--lr", type=float, default=1e-3, help="rq-vae learning rate")
    q.add_argument("--device", default="auto", help="auto | cpu | cuda")
    q.add_argument("--torch-threads", type=int, default=None, help="torch / faiss threads (default: library default)")
    c = parser.add_argument_group("codes")
    c.add_argument("--resolve-collisions", action="store_true",
                   help="append a suffix level so every item's code is unique")
    c.add_argument("--suffix-size", type=int, default=None,
                   help="suffix codebook size; error if a code is shared by more items (default: as needed)")
    m = parser.add_argument_group("metrics")
    m.add_argument("--hr-queries", type=int, default=2000,
                   help="items sampled as queries for hr@1 / hr@10, each ranked against the whole catalog "
                        "(cost: queries x N x d); 0 = all")


def _build(args, dim: int):
    from quant import RQVAE, ResKMeansFSQ, RQKMeans, VQNeighbors, load_quantizer

    if args.method == "vq":
        return VQNeighbors(k=args.vq_k, index=args.vq_index, nprobe=args.nprobe, seed=args.seed)
    init = None
    if args.init_from is not None:
        if args.method not in ("rq-kmeans", "res-kmeans-fsq"):
            raise ValueError(f"--init-from: warm start is supported for rq-kmeans and res-kmeans-fsq, "
                             f"not {args.method}")
        previous = load_quantizer(args.init_from)
        if previous.method != args.method:
            raise ValueError(f"--init-from {args.init_from}: saved quantizer is {previous.method}, "
                             f"not {args.method}")
        init = previous.codebooks if args.method == "rq-kmeans" else previous.rq.codebooks
        if init[0].shape[1] != dim:
            raise ValueError(f"--init-from {args.init_from}: codebooks have dimension {init[0].shape[1]}, "
                             f"embeddings have {dim}")
    if args.method == "rq-kmeans":
        return RQKMeans(levels=args.levels, codebook_size=args.codebook_size, seed=args.seed,
                        balanced=args.balanced, sample=args.sample, init_codebooks=init, niter=args.niter,
                        device=args.device)
    if args.method == "res-kmeans-fsq":
        fsq_levels = None
        if args.fsq_levels:
            try:
                fsq_levels = tuple(int(v) for v in args.fsq_levels.split(","))
            except ValueError as exc:
                raise ValueError(f"--fsq-levels {args.fsq_levels!r}: expected comma-separated ints") from exc
        return ResKMeansFSQ(levels=args.levels, codebook_size=args.codebook_size, fsq_levels=fsq_levels,
                            seed=args.seed, fsq_grid=args.fsq_grid, balanced=args.balanced, sample=args.sample,
                            niter=args.niter, device=args.device, init_codebooks=init)
    return RQVAE(levels=args.levels, codebook_size=args.codebook_size, seed=args.seed, epochs=args.epochs,
                 latent_dim=args.latent_dim, gradient=args.gradient, batch_size=args.batch_size, lr=args.lr,
                 device=args.device)


def code_metrics(x: np.ndarray, codes: np.ndarray, x_hat: np.ndarray, codebook_sizes: list[int], *,
                 hr_queries: int, seed: int, per_level: bool = True) -> dict:
    """The codebook metrics the command reports.

    Args:
        x: (N, d) embeddings; codes: (N, L); x_hat: (N, d) decoded codes.
        codebook_sizes: K per level.
        hr_queries: items sampled as hr@k queries (0: all).
        per_level: also utilization / entropy per level and prefix consistency (rq-style codes).
    """
    from quant import metrics as M

    n = x.shape[0]
    queries = None
    if hr_queries and hr_queries < n:
        queries = np.sort(np.random.default_rng(seed).choice(n, size=hr_queries, replace=False))
    hits = M.hr_at_k(x, x_hat, (1, 10), queries=queries)
    out = {
        "collision_rate": M.collision_rate(codes),
        "items_per_code": M.items_per_code(codes),
        "max_items_per_code": M.max_items_per_code(codes),
        "rel_mse": M.rel_mse(x, x_hat),
        "hr@1": hits[1],
        "hr@10": hits[10],
        "hr_queries": int(n if queries is None else queries.size),
    }
    if per_level:
        out["utilization"] = M.utilization(codes, codebook_sizes)
        out["entropy"] = M.entropy(codes, codebook_sizes)
        out["prefix_consistency"] = M.prefix_consistency(x, codes)
    return out


def run(args: argparse.Namespace) -> dict:
    from quant import resolve_collisions
    from quant import metrics as M
    from feature_store.io import atomic_write_json
    from feature_store.progress import Progress
    from feature_store.tables import read_embeddings, write_codes

    if args.torch_threads:
        import faiss
        import torch

        torch.set_num_threads(args.torch_threads)
        faiss.omp_set_num_threads(args.torch_threads)
    if args.suffix_size is not None and not args.resolve_collisions:
        raise ValueError("--suffix-size needs --resolve-collisions")
    item_ids, x = read_embeddings(args.embeddings, id_column=args.id_column, embedding_column=args.embedding_column)
    n, dim = x.shape
    log.info("quantize: %d items x %d dims from %s, method %s", n, dim, args.embeddings, args.method)
    quantizer = _build(args, dim)
    t0 = time.perf_counter()
    if args.method == "rq-kmeans":
        with Progress("rq-kmeans levels", args.levels, unit="level", logger=log, final_line=False) as bar:
            quantizer.fit(x, progress=bar.callback())
    else:
        quantizer.fit(x)
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.method == "vq":
        with Progress("vq search", n, logger=log, final_line=False) as bar:
            codes = quantizer.encode(x, progress=bar.callback())
    else:
        codes = quantizer.encode(x)
    encode_seconds = time.perf_counter() - t0
    x_hat = quantizer.decode(codes)
    if args.method == "vq":
        levels, codebook_size = args.vq_k, n
        # one "level" of n_items codes: how many items serve as somebody's neighbour, and how evenly
        metrics = code_metrics(x, codes, x_hat, [n] * args.vq_k, hr_queries=args.hr_queries, seed=args.seed,
                               per_level=False)
        metrics["utilization"] = M.utilization(codes.reshape(-1, 1), n)
        metrics["entropy"] = M.entropy(codes.reshape(-1, 1), n)
        stored, column = item_ids[codes], "vq"  # neighbour rows -> neighbour item ids
    else:
        levels, codebook_size = args.levels, args.codebook_size
        sizes = quantizer.codebook_sizes if hasattr(quantizer, "codebook_sizes") else [codebook_size] * levels
        metrics = code_metrics(x, codes, x_hat, sizes, hr_queries=args.hr_queries, seed=args.seed)
        stored, column = codes, "rq"
    result = {"method": args.method, "n_items": n, "dim": dim, "levels": levels, "codebook_size": codebook_size,
              **metrics, "fit_seconds": round(fit_seconds, 4), "encode_seconds": round(encode_seconds, 4),
              "seed": args.seed}
    if args.resolve_collisions:
        if column != "rq":
            raise ValueError("--resolve-collisions applies to rq-style codes, not --method vq")
        # the item nearest its decoded vector keeps suffix 0: the most typical member of a code
        priority = ((x - x_hat) ** 2).sum(axis=1)
        t0 = time.perf_counter()
        stored = resolve_collisions(codes, args.suffix_size, priority=priority)
        result["collision_rate_before"] = result["collision_rate"]
        result["collision_rate"] = M.collision_rate(stored)
        result["suffix_size"] = int(stored[:, -1].max()) + 1 if args.suffix_size is None else args.suffix_size
        result["resolve_seconds"] = round(time.perf_counter() - t0, 4)
        result["levels_stored"] = stored.shape[1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if column == "vq":  # the contract codes table; the unused column holds empty lists
        write_codes(out / "codes.parquet", item_ids, np.zeros((n, 0), np.int32), stored)
    else:
        write_codes(out / "codes.parquet", item_ids, stored)
    quantizer.save(out / "quantizer")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("json", "extra_args")}
    result["files"] = {"codes": str(out / "codes.parquet"), "quantizer": str(out / "quantizer"),
                       "metrics": str(out / "metrics.json")}
    atomic_write_json(out / "metrics.json", {**result, "config": config, "fit_stats": quantizer.fit_stats})
    return result
