"""Several processes under torchrun: the process group, rank helpers and the sharded shuffle.

``torchrun --nproc_per_node N -m aimonk train ...`` starts N copies of the same training code;
torchrun tells each one its place through the ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
environment variables. Without them every helper here acts as rank 0 of a world of one, so a
plain ``python -m aimonk train`` runs exactly as it would without this module.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """True when torchrun (``python -m torch.distributed.run``) started this process."""
    return all(v in os.environ for v in TORCHRUN_VARIABLES)


def active() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without torchrun)."""
    if active():
        return dist.get_rank()
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def local_rank() -> int:
    """This process's rank on its own machine (0 without torchrun)."""
    return int(os.environ["LOCAL_RANK"]) if launched_by_torchrun() else 0


def world_size() -> int:
    """How many processes train together (1 without torchrun)."""
    if active():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def is_main() -> bool:
    """True on rank 0, the process that writes files and shows progress."""
    return rank() == 0


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join the process group torchrun describes for the duration of the block.

    The backend follows the device: nccl for CUDA, where each process takes ``cuda:LOCAL_RANK``
    (unless ``device`` already names an index), gloo otherwise. A group that already exists is
    used as is and left alone on exit. Without torchrun this does nothing.

    Args:
        device: the device chosen for a single process.
    Yields:
        The device this process trains on.
    """
    if not launched_by_torchrun():
        yield device
        return
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = not active()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        if created:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here (no-op in one process)."""
    if active() and world_size() > 1:
        dist.barrier()


@contextmanager
def local_main_first() -> Iterator[None]:
    """Run the block on each machine's first process, then on the others.

    Used for the decoded-image cache: one process per machine decodes, the others then find
    every entry already there. If the block raises on the first process, the others stay at the
    barrier until torchrun stops them (it stops every process once one fails).
    """
    first = local_rank() == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()


def global_mean_loss(loss: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn this process's mean loss into its part of the global batch's mean loss.

    Each process's loss is a mean over ``weight`` items of its share (known labels, for the masked
    BCE); DistributedDataParallel averages gradients over processes, so the loss is rescaled by
    ``weight * world_size / total weight``. The gradient is then that of the mean over the global
    batch, exactly as one process with the whole batch would compute it, and so is the value.

    Args:
        loss: this process's mean loss (a scalar with a graph).
        weight: how many items it averages over.
    Returns:
        ``(loss to back-propagate, global mean loss)``; the second is detached and the same on
        every process. In one process: ``(loss, loss.detach())``.
    """
    if not active() or world_size() == 1:
        return loss, loss.detach()
    w = weight.detach().to(loss.dtype)
    sums = torch.stack([w, loss.detach() * w])
    dist.all_reduce(sums)  # (total weight, total summed loss)
    total = sums[0].clamp(min=1)
    return loss * (w * world_size() / total), sums[1] / total


def from_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` evaluated on rank 0 only and sent to every process (plain ``fn()`` in one process)."""
    if not active() or world_size() == 1:
        return fn()
    box = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same(value: Any, what: str) -> None:
    """Raise on every process whose ``value`` differs from rank 0's.

    Args:
        value: anything picklable that compares with ``==`` (lists, tuples, numbers, strings).
        what: names the value in the error.
    """
    reference = from_main(lambda: value)
    if reference != value:
        raise RuntimeError(f"rank {rank()}: {what} differs from rank 0's; every process must see the same data "
                           "folder and configuration")


def rank_seed(seed: int) -> int:
    """``seed`` itself on rank 0 and a distinct seed derived from ``(seed, rank)`` on the others.

    Rank 0 keeps the single-process random stream; the other ranks draw different augmentations.
    """
    r = rank()
    return seed if r == 0 else int(np.random.SeedSequence([seed % 2**64, r]).generate_state(1)[0])


def per_rank_batch(batch_size: int) -> int:
    """Each process's share of the global ``batch_size``.

    Raises:
        ValueError: if the processes cannot share it equally.
    """
    w = world_size()
    if batch_size < w or batch_size % w:
        raise ValueError(f"batch_size {batch_size} is the global batch size and must be a multiple of the "
                         f"{w} processes (e.g. {max(1, batch_size // w) * w})")
    return batch_size // w


def epoch_sampler(dataset: Dataset, seed: int) -> DistributedSampler:
    """The training shuffle for this process: its share of ``randperm(len(dataset))``.

    Epoch e's order is ``torch.randperm(n, generator=Generator().manual_seed(seed + e))`` (call
    ``set_epoch(e)`` first), padded to a multiple of the world size by repeating its start; rank r
    takes every world_size-th index from r. With per-process batches of ``B / world_size``, rank r's
    k-th batch is therefore its interleaved share of the single-process k-th batch of ``B``: the
    processes together see the same global batches as one process would, except that the last one
    is padded with repeated images when the count does not divide evenly. In a single process this
    is the whole permutation.
    """
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed,
                              drop_last=False)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the incoming gradients over processes too."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(t)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the global batch, over every process.

    ``nn.SyncBatchNorm`` does this on CUDA only; this works on any device (gloo on the CPU) with two
    differentiable all-reduces per layer (the mean, then the variance around it). Outside a process
    group, or in eval mode, it is an ordinary ``BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (B, C, H, W) with the statistics of the batch gathered from every process."""
        if not (self.training and active() and world_size() > 1):
            return super().forward(x)
        dims = (0, 2, 3)
        xf = x.float()
        total = _all_reduce_sum(torch.cat([xf.sum(dims), xf.new_tensor([x.numel() // x.shape[1]])]))  # (C + 1,)
        n = total[-1]
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        mean = total[:-1] / n  # (C,)
        centred = xf - mean[None, :, None, None]
        var = _all_reduce_sum(centred.square().sum(dims)) / n  # (C,), biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), factor)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Make every ``BatchNorm2d`` in ``model`` a ``GlobalBatchNorm2d``, in place (same parameters and buffers)."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d  # adds behaviour only, no state
    return model


def wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a process group, else ``model`` itself.

    BatchNorm layers are switched to ``GlobalBatchNorm2d`` first (in place), so N processes with
    per-process batches of B / N compute the same statistics as one process with batch B: with the
    project's small batches (16 or 32), statistics over each process's share alone would make the
    result depend on the number of processes. Use ``find_unused_parameters`` when some parameters
    are frozen for part of training: their gradients then stay None, as in a single process.
    """
    if not active():
        return model
    sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=find_unused_parameters
    )


def weights_digest(model: nn.Module) -> list[float]:
    """One float64 sum per parameter: cheap to compare across processes."""
    return [float(p.detach().double().sum()) for p in model.parameters()]
