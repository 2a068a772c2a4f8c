"""Data-parallel alignment training: how one global batch of pairs is split over ranks and put back together.

Every rank draws the same global batch (the pair order is a seeded permutation), encodes only its slice of the
pairs, and all-gathers the slice embeddings *with gradient* so the contrastive loss sees the whole global batch
as in-batch negatives, exactly as one process would. Every rank then computes the same global loss. The gather's
backward sums the ranks' (identical) gradients for each slice (W x dL/de_r) and DDP averages parameter gradients
over the W ranks, so each parameter receives exactly dL/dtheta of the global batch: W processes with global
batch B train like one process with batch B (up to float summation order, and dropout masks, which differ).

    comm = Communicator.from_env(device)     # torchrun sets RANK / WORLD_SIZE; a plain process is rank 0 of 1
    part = comm.local_slice(n)               # this rank's rows of the global batch
    e = comm.gather(embed(ids[part]), n)     # (n, D), rows in global order, differentiable
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ranker.distributed import DistContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Communicator(DistContext):
    """One process (rank 0 of 1): every operation is the identity. (rank, world_size, device, is_main and
    distributed are the ranker's ``DistContext``.)"""

    def local_slice(self, n: int) -> slice:
        """This rank's rows of a global batch of n rows: contiguous chunks of ceil(n / W) (the last may be
        shorter or empty)."""
        chunk = -(-n // self.world_size)
        start = min(n, self.rank * chunk)
        return slice(start, min(n, start + chunk))

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """(m, D) rows of this rank -> (n, D) rows of every rank in global order (differentiable)."""
        return local

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module whose forward runs each step (DDP-wrapped when distributed)."""
        return module

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def from_env(device: str = "cpu") -> "Communicator":
        """A DistributedCommunicator when launched by torchrun (WORLD_SIZE > 1), else one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Communicator()
        return DistributedCommunicator.init(device)


class _Forward(nn.Module):
    """Exposes an embedding closure as ``forward`` so DDP's hooks see every step; ``owner`` holds the
    parameters the closure uses."""

    def __init__(self, owner: nn.Module, fn):
        super().__init__()
        self.owner = owner
        self._fn = fn

    def forward(self, *args):
        return self._fn(*args)


@dataclass(frozen=True)
class DistributedCommunicator(Communicator):
    """Rank ``rank`` of ``world_size`` in the default process group (gloo on CPU, nccl on CUDA)."""

    @staticmethod
    def init(device: str = "cpu") -> "DistributedCommunicator":
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend=backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):  # one GPU per rank
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
            torch.cuda.set_device(device)
        log.info("align: rank %d of %d (%s, %s)", rank, world, dist.get_backend(), device)
        return DistributedCommunicator(rank=rank, world_size=world, device=torch.device(device))

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        from torch.distributed.nn.functional import all_gather

        chunk = -(-n // self.world_size)
        m = local.shape[0]
        # all_gather needs equal shapes: pad to the chunk, then keep each rank's real rows
        padded = torch.cat([local, local.new_zeros((chunk - m, *local.shape[1:]))]) if m < chunk else local
        parts = all_gather(padded)
        sizes = [min(n, (r + 1) * chunk) - min(n, r * chunk) for r in range(self.world_size)]
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # find_unused_parameters: a batch without images leaves the image branch without gradient
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def forward_module(owner: nn.Module, fn, comm: Optional[Communicator]) -> nn.Module:
    """``fn`` (ids -> embeddings, using ``owner``'s parameters) as a module, DDP-wrapped when distributed."""
    comm = comm or Communicator()
    return comm.wrap(_Forward(owner, fn)) if comm.distributed else _Forward(owner, fn)
