"""torchrun / DistributedModelParallel plumbing: process group, sharding plan, full <-> sharded state.

Single process (no WORLD_SIZE or WORLD_SIZE=1) runs the unsharded TorchRec model; under
`torchrun --nproc_per_node=N` tables are sharded by DistributedModelParallel (gloo + table_wise on CPU,
nccl on GPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cpu")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device(f"cuda:{local}")
    return DistContext(rank=rank, world_size=dist.get_world_size(), device=device)


def shard_model(module: nn.Module, sharding: str, ctx: DistContext) -> nn.Module:
    """Wrap `module` (tables already carrying in-backward optimizers) in DistributedModelParallel
    with every table constrained to `sharding`."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    from ranker.model import embedding_tables

    tables = embedding_tables(module)
    constraints = {name: ParameterConstraints(sharding_types=[sharding]) for name in tables}
    sharders = [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()]
    topology = Topology(world_size=ctx.world_size, compute_device=ctx.device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(module, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(module, device=ctx.device, plan=plan, sharders=sharders)


def _is_sharded(t) -> bool:
    return hasattr(t, "local_shards")


def full_state_dict(module: nn.Module, ctx: DistContext) -> dict | None:
    """Unsharded {name: tensor} on rank 0 (None elsewhere). Every rank must call it."""
    out = {}
    for name, tensor in module.state_dict().items():
        if _is_sharded(tensor):
            full = torch.zeros(tensor.size(), dtype=tensor.dtype) if ctx.is_main else None
            tensor.gather(dst=0, out=full)
            if ctx.is_main:
                out[name] = full
        elif ctx.is_main:
            out[name] = tensor.detach().cpu().clone()
    return out if ctx.is_main else None


def load_full_state(module: nn.Module, state: dict) -> None:
    """Copy an unsharded state into `module`, each rank writing only its own shards."""
    own = module.state_dict()
    missing = set(own) - set(state)
    if missing:
        raise ValueError(f"checkpoint lacks {sorted(missing)[:5]} (feature set or table sizes differ?)")
    with torch.no_grad():
        for name, target in own.items():
            source = state[name]
            if tuple(source.shape) != tuple(target.size()):
                raise ValueError(f"checkpoint tensor {name}: shape {tuple(source.shape)} != model {tuple(target.size())}")
            if _is_sharded(target):
                for shard in target.local_shards():
                    index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                    shard.tensor.copy_(source[index].to(shard.tensor.device))
            else:
                target.copy_(source.to(target.device))


def local_snapshot(module: nn.Module) -> dict:
    """This rank's tensors (local shards for sharded ones), cloned: a cheap in-memory 'best model'."""
    snap = {}
    for name, tensor in module.state_dict().items():
        if _is_sharded(tensor):
            snap[name] = [s.tensor.detach().clone() for s in tensor.local_shards()]
        else:
            snap[name] = tensor.detach().clone()
    return snap


def restore_snapshot(module: nn.Module, snap: dict) -> None:
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if _is_sharded(tensor):
                for shard, saved in zip(tensor.local_shards(), snap[name]):
                    shard.tensor.copy_(saved)
            else:
                tensor.copy_(snap[name])


def all_gather_rows(local: torch.Tensor, sizes: list, ctx: DistContext) -> torch.Tensor:
    """Concatenate per-rank 1-D tensors of known `sizes` in rank order (gloo needs equal shapes: pad)."""
    if not ctx.distributed:
        return local
    width = max(sizes)
    padded = torch.zeros(width, dtype=local.dtype)
    padded[: len(local)] = local
    parts = [torch.zeros(width, dtype=local.dtype) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])
