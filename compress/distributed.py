"""Data-parallel training under torchrun: PyTorch's own launcher, process group and DistributedDataParallel.

``torchrun --nproc-per-node N -m compress train ...`` starts N processes; each calls ``launched``, which joins
the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU). Every rank runs the same
deterministic pipeline on the same seed: it scores and selects the same masks, and trains on its shard of every
global batch (``shard``), its gradients averaged by DistributedDataParallel, so all ranks hold the same weights.
``agree`` compares a hash of the masks (at the start and after every mask change) and of the final weights
across ranks, and stops the run on a mismatch. Rank 0 writes the run directory; the others write theirs into a
private scratch directory that is removed at the end (``rank_directory``), so no code path needs to know its rank
to stay out of rank 0's files.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from compress.errors import UserError

TIMEOUT = timedelta(minutes=30)  # how long a rank waits for the others in one collective
SCRATCH_PREFIX = "compress-rank"  # scratch directories: compress-rank<rank>-<pid>-<random>


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes (``local_rank`` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's disjoint share of a global batch: samples rank, rank + size, rank + 2 size, ..."""
        if not self.active:
            return inputs, labels
        return inputs[self.rank :: self.size], labels[self.rank :: self.size]


def requested_world() -> World:
    """The world torchrun describes in the environment (one process without it)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun); unset them to train "
                        "in one process") from None
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK {rank} is outside WORLD_SIZE {size}: start the run with torchrun")
    return World(rank, size, local_rank)


def current_world() -> World:
    """The world of the initialised process group (one process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def launched(device: str | None) -> Iterator[World]:
    """Join torchrun's process group for the duration (gloo on CPU, NCCL for ``cuda`` devices), then leave it."""
    world = requested_world()
    if not world.active or dist.is_initialized():
        yield current_world() if world.active else world
        return
    cuda = device is not None and device.startswith("cuda") or device in (None, "auto") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        yield current_world()
    finally:
        dist.destroy_process_group()


def device_for(world: World, device: str | None) -> str | None:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a cuda run of several processes, else ``device``."""
    if world.active and (device in (None, "auto") and torch.cuda.is_available() or device == "cuda"):
        return f"cuda:{world.local_rank}"
    return device


@contextmanager
def rank_directory(world: World, run_dir: str | Path, copy: bool) -> Iterator[Path]:
    """Where this rank writes the run: ``run_dir`` on rank 0; on the others a scratch directory (a copy of
    ``run_dir`` with ``copy``, to resume from), removed afterwards. Every rank waits until the copies are made."""
    if world.rank == 0:
        if world.active:
            dist.barrier()
        yield Path(run_dir)
        return
    remove_stale_scratch()
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{world.rank}-{os.getpid()}-"))
    try:
        target = scratch / Path(run_dir).name
        if copy and Path(run_dir).is_dir():
            shutil.copytree(run_dir, target)
        dist.barrier()
        yield target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_stale_scratch(root: str | None = None) -> None:
    """Remove the scratch directories of ranks that no longer run (a rank killed with kill -9 leaves its own)."""
    for path in Path(root or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*-*"):
        try:
            pid = int(path.name[len(SCRATCH_PREFIX):].split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue  # not ours, or a live process of another user


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the names, shapes, dtypes and bytes of ``tensors``, in name order."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.hexdigest()


def agree(what: str, tensors: dict[str, torch.Tensor], when: str) -> None:
    """Check that every rank holds the same ``tensors`` (their digests compared; a UserError naming the ranks
    that differ otherwise). Nothing to check, and nothing hashed, in one process."""
    world = current_world()
    if world.active:
        digest = tensors_digest(tensors)
        digests: list = [None] * world.size
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            differ = [rank for rank, other in enumerate(digests) if other != digests[0]]
            raise UserError(f"the ranks hold different {what} {when} (ranks {differ} differ from rank 0): a "
                            "nondeterministic kernel on this device, or processes of different versions; train "
                            "with --device cpu, or in one process")


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank: DistributedDataParallel broadcasts them
    before each forward, so after the last one each rank holds its own shard's update."""
    if current_world().active:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, 0)


def all_sum(values: list[float]) -> list[float]:
    """``values`` summed over the ranks (as is in one process)."""
    if not current_world().active:
        return values
    total = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
        total = total.cuda()
    dist.all_reduce(total)
    return total.tolist()
