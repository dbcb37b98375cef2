"""Multi-process training on PyTorch's own engine (torch.distributed + DistributedDataParallel).

Launch any stage with `torchrun --nproc_per_node=N -m trainer train-... ` (or `accelerate launch`, or
`torchrun --no-python mole-train ...`): the launcher sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
address, and `World.from_env` joins the group (gloo on CPU, nccl on GPUs). Without a launcher the run is one
process and nothing here talks to anyone.

The division of work follows kohya: `--train_batch_size` is per process, so the global batch is
batch x processes x accumulation. Every process draws the same global batch, noise and timesteps from the same
seeded generator and keeps its own rows (`World.rows`); DDP averages the gradients, and the loss of each process
is weighted so that the average is the global batch's mean loss. A 2-process run is thus the 1-process run with
the same global batch, up to the order of floating-point sums. Only rank 0 writes files and logs.
"""
from __future__ import annotations

import datetime
import logging
import os
import resource
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("mole.trainer")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @staticmethod
    def from_env() -> "World":
        """The process group the launcher describes in the environment (joined once), or a world of one."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return World()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        if not rank == 0:
            logging.getLogger("mole").setLevel(logging.WARNING)     # one voice: rank 0 logs
        return World(rank, size, local)

    # -- data --------------------------------------------------------------------------------------------------
    def rows(self, n: int) -> tuple[list[int], float]:
        """This process's rows of a global batch of n, and the factor f of its loss sum(per-sample losses) / n * f,
        chosen so that the average over processes (DDP's gradient average) is the mean over the n rows: f is the
        number of processes (1 in a single process: exactly the batch mean). A process left without rows (a
        last batch smaller than the world) computes row 0 with f = 0: DDP needs every process in every
        backward."""
        mine = list(range(self.rank, n, self.size))
        if not mine:
            return [0], 0.0
        return mine, float(self.size)

    # -- collectives ---------------------------------------------------------------------------------------------
    def mean(self, value: float) -> float:
        """The mean over processes of a number (for logging)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.size

    def gather(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def wrap(self, module: torch.nn.Module, unused_parameters: bool = False) -> torch.nn.Module:
        """DistributedDataParallel around the module that holds every trainable tensor (rank 0's values are
        broadcast to all)."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        devices = [self.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(module, device_ids=devices, find_unused_parameters=unused_parameters)

    def close(self) -> None:
        """Leave the group once every process is done with it (call after DistributedDataParallel is gone)."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
