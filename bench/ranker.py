"""Ranker training throughput: TorchRec vs plain PyTorch, 1 vs 2 processes, on the same batches.

Variants (same model, same toy data, same global batches; Adagrad on tables, Adam on the rest):
  plain        nn.Embedding / nn.EmbeddingBag tables, torch.optim.Adagrad (the baseline)
  torchrec     EmbeddingCollection / EmbeddingBagCollection, Adagrad applied in backward, unsharded
  dmp-1proc    DistributedModelParallel, fused TBE kernels, 1 process (torchrun --nproc_per_node=1)
  dmp-2proc    the same with 2 processes (gloo on CPU; nccl with one GPU per rank, so it needs 2 GPUs)
Tables are sharded ``--sharding`` (table_wise by default; row_wise splits every table's rows over the ranks).
Where torch sees CUDA the DMP variants train on the GPU (nccl, also for one rank); plain and torchrec stay on CPU.
Each figure is training samples/s after warm-up; ratios are against `plain` and against `dmp-1proc`.

    python bench/ranker.py --json
    python bench/ranker.py --features vq+rq --steps 30 --batch-size 1024 --json
    python bench/ranker.py --sharding row_wise --skip-single --json      # a GPU machine: DMP on CUDA only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the oracle world lives with the tests

from ranker.batch import build_batch  # noqa: E402
from ranker.config import RankerConfig  # noqa: E402
from ranker.data import prepare_examples  # noqa: E402
from ranker.features import build_schema, table_configs  # noqa: E402
from oracle_world import oracle_world  # noqa: E402


class PlainSparseArch(nn.Module):
    """SparseArch built from plain torch modules; same inputs (KJTs) and outputs."""

    def __init__(self, schema, embedding_dim: int):
        super().__init__()
        seq_cfgs, bag_cfgs = table_configs(schema, embedding_dim)
        self.schema = schema
        self.seq_tables = nn.ModuleDict({c.name: nn.Embedding(c.num_embeddings, embedding_dim) for c in seq_cfgs})
        self.seq_table_of = {f: c.name for c in seq_cfgs for f in c.feature_names}
        self.bag_tables = nn.ModuleDict({c.name: nn.EmbeddingBag(c.num_embeddings, embedding_dim,
                                                                 mode=c.pooling.name.lower()) for c in bag_cfgs})
        self.bag_table_of = {f: c.name for c in bag_cfgs for f in c.feature_names}

    def forward(self, seq, bag):
        seq_out = {}
        for name, jt in seq.to_dict().items():
            length = self.schema.history_len if name.startswith("hist_") else 1
            lengths = jt.lengths().long()
            emb = self.seq_tables[self.seq_table_of[name]](jt.values())  # (nnz, D)
            offsets = torch.cumsum(lengths, 0) - lengths
            row = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            pos = torch.arange(len(row)) - offsets[row]
            out = emb.new_zeros(len(lengths), length, emb.shape[1])
            out[row, pos] = emb
            seq_out[name] = out  # (B, length, D)
        bag_out = {}
        for name, jt in bag.to_dict().items():
            offsets = torch.cumsum(jt.lengths().long(), 0) - jt.lengths().long()
            bag_out[name] = self.bag_tables[self.bag_table_of[name]](jt.values(), offsets)  # (B, D)
        return seq_out, bag_out


def make_batches(args, world_size: int = 1, rank: int = 0):
    world = oracle_world(n_items=args.items, n_users=args.users, n_events=args.events, sub_codes=64, seed=0)
    data = prepare_examples(world.interactions, world.item_ids, history_len=args.history_len)
    items = world.item_features()
    cfg = RankerConfig(features=args.features, history_len=args.history_len, embedding_dim=args.dim,
                       batch_size=args.batch_size, num_threads=args.threads, sharding=args.sharding)
    schema = build_schema(cfg, data.users.n_rows, items)
    order = np.random.default_rng(0).permutation(len(data.train))
    batches = []
    for step in range(args.steps + args.warmup):
        idx = order[(step * args.batch_size) % (len(order) - args.batch_size):][: args.batch_size]
        local = np.array_split(idx, world_size)[rank]
        batches.append(build_batch(data.train.take(local), schema, items))
    return cfg, schema, items, batches


def time_steps(module, dense_opt, batches, warmup: int, sparse_opt=None) -> float:
    """Seconds for the post-warm-up steps (CUDA work synchronised at both ends: its kernels run asynchronously)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for i, batch in enumerate(batches):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        loss, _ = module(batch)
        dense_opt.zero_grad()
        if sparse_opt is not None:
            sparse_opt.zero_grad()
        loss.backward()
        dense_opt.step()
        if sparse_opt is not None:
            sparse_opt.step()
    sync()
    return time.perf_counter() - t0


def run_single(args) -> dict:
    """plain and torchrec (unsharded) in this process, same batches."""
    from ranker.distributed import DistContext
    from ranker.model import RankerModel, RankerTrain
    from ranker.train import attach_optimizers, build_train_model

    torch.set_num_threads(args.threads)
    cfg, schema, items, batches = make_batches(args)
    out = {}
    torch.manual_seed(0)
    plain = RankerModel(schema, cfg)
    plain.sparse_arch = PlainSparseArch(schema, cfg.embedding_dim)
    plain_train = RankerTrain(plain)
    sparse = list(plain.sparse_arch.parameters())
    dense = [p for n, p in plain_train.named_parameters() if "sparse_arch" not in n]
    seconds = time_steps(plain_train, torch.optim.Adam(dense, lr=cfg.lr_dense), batches, args.warmup,
                         torch.optim.Adagrad(sparse, lr=cfg.lr_sparse))
    out["plain"] = args.steps * args.batch_size / seconds
    module, dense_opt = attach_optimizers(build_train_model(cfg, schema, items), cfg, DistContext())
    seconds = time_steps(module, dense_opt, batches, args.warmup)
    out["torchrec"] = args.steps * args.batch_size / seconds
    return out


def run_worker(args) -> None:
    """Under torchrun: DMP training steps; rank 0 writes global samples/s to --worker-out."""
    import torch.distributed as dist

    from ranker.distributed import setup_distributed
    from ranker.train import attach_optimizers, build_train_model

    torch.set_num_threads(args.threads)
    os.environ.setdefault("WORLD_SIZE", "1")
    use_cuda = torch.cuda.is_available()
    if int(os.environ["WORLD_SIZE"]) == 1 and not dist.is_initialized():
        # DMP with one rank: the fused-kernel path without a second process
        dist.init_process_group("nccl" if use_cuda else "gloo")
    from ranker.distributed import DistContext

    ctx = (setup_distributed() if int(os.environ["WORLD_SIZE"]) > 1
           else DistContext(device=torch.device("cuda:0" if use_cuda else "cpu")))
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, schema, items, batches = make_batches(args, world, rank)
    batches = [b.to(ctx.device) for b in batches]
    model = build_train_model(cfg, schema, items)
    if world == 1:
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        from ranker.distributed import DistContext as _Ctx, shard_model
        from ranker.model import embedding_tables

        apply_optimizer_in_backward(torch.optim.Adagrad, list(embedding_tables(model).values()), {"lr": cfg.lr_sparse})
        module = shard_model(model, cfg.sharding, _Ctx(0, 1, ctx.device))
        dense_opt = torch.optim.Adam([p for _, p in in_backward_optimizer_filter(module.named_parameters())],
                                     lr=cfg.lr_dense)
    else:
        module, dense_opt = attach_optimizers(model, cfg, ctx)
    dist.barrier()
    seconds = time_steps(module, dense_opt, batches, args.warmup)
    times = [torch.zeros(1, device=ctx.device) for _ in range(world)]  # nccl gathers device tensors
    dist.all_gather(times, torch.tensor([seconds], device=ctx.device))
    if rank == 0:
        slowest = max(float(t) for t in times)
        Path(args.worker_out).write_text(json.dumps({"samples_per_s": args.steps * args.batch_size / slowest}))
    dist.destroy_process_group()


def run_torchrun(args, nproc: int) -> float | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "w.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--worker", "--worker-out", str(out)] + _passthrough(args)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not out.exists():
            print(proc.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(out.read_text())["samples_per_s"]


def _passthrough(args) -> list:
    return ["--features", args.features, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch-size", str(args.batch_size), "--history-len", str(args.history_len), "--dim", str(args.dim),
            "--items", str(args.items), "--users", str(args.users), "--events", str(args.events),
            "--torch-threads", str(args.threads)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", default="vq+rq")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--history-len", type=int, default=20)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--events", type=int, default=60000)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--sharding", default="table_wise", help="TorchRec sharding of every table (ranker.config)")
    p.add_argument("--skip-single", action="store_true", help="skip plain / torchrec (single process, CPU)")
    p.add_argument("--skip-distributed", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    result = {"features": args.features, "batch_size": args.batch_size, "steps": args.steps,
              "threads_per_process": args.threads, "sharding": args.sharding,
              "device": "cuda" if torch.cuda.is_available() else "cpu",
              "samples_per_s": {} if args.skip_single else run_single(args), "skipped": {}}
    if not args.skip_distributed:
        result["samples_per_s"]["dmp-1proc"] = run_torchrun(args, 1)
        if torch.cuda.is_available() and torch.cuda.device_count() < 2:
            result["skipped"]["dmp-2proc"] = "nccl needs one GPU per rank; this machine has 1"
        else:
            result["samples_per_s"]["dmp-2proc"] = run_torchrun(args, 2)
    sps = result["samples_per_s"]
    result["ratios"] = {f"{k}/plain": (v / sps["plain"] if v else None) for k, v in sps.items()
                        if k != "plain" and "plain" in sps}
    if sps.get("dmp-1proc") and sps.get("dmp-2proc"):
        result["ratios"]["dmp-2proc/dmp-1proc"] = sps["dmp-2proc"] / sps["dmp-1proc"]
    for k, v in sps.items():
        print(f"{k:10s} {v:10.0f} samples/s" if v else f"{k:10s}     failed")
    for k, v in result["ratios"].items():
        print(f"{k:22s} {v:.2f}x" if v else f"{k:22s} n/a")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
