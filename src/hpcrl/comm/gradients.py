"""Collectives for data-parallel torch learners: one flat-gradient `Allreduce` per update,
parameter broadcast, globally merged statistics, and a parameter-consistency check.

As in CleanRL's multi-GPU PPO and Baselines' `MpiAdam`: every gradient is copied into one
contiguous float32 host buffer, summed with a single `Allreduce` and divided by the world
size, so every rank applies the same averaged gradient and takes an identical optimizer
step; the parameters never drift apart (checked by `check_parameters_in_sync`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from mpi4py import MPI

from hpcrl.comm.waits import allreduce_sum, bcast


class FlatGradients:
    """Averages the gradients of `parameters` over `comm` with one `Allreduce`, and clips
    their global norm.

    The gradients of CPU parameters are views into the flat buffer, as DDP's
    `gradient_as_bucket_view`: `backward` accumulates into the buffer in place, so neither
    the average nor the clip copies anything. A learner keeps them attached by zeroing
    with `zero_grad(set_to_none=False)`; a gradient that is None or was replaced (a learner
    that sets `p.grad` itself, a GPU model) is copied in and out, and the view re-attached
    where the parameter is on the CPU.

    Args:
        parameters: the model's parameters, in a fixed order (the same on every rank).
    """

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.sizes = [p.numel() for p in self.parameters]
        self.buffer = np.zeros(sum(self.sizes), dtype=np.float32)
        self.view = torch.from_numpy(self.buffer)  # shares memory with `buffer`
        offsets = np.cumsum([0, *self.sizes])
        self.chunks = [
            self.view[offsets[i] : offsets[i + 1]].view_as(p) for i, p in enumerate(self.parameters)
        ]
        for p, chunk in zip(self.parameters, self.chunks, strict=True):
            if p.grad is None and self._can_attach(p):
                p.grad = chunk

    @staticmethod
    def _can_attach(p: torch.nn.Parameter) -> bool:
        return p.device.type == "cpu" and p.dtype == torch.float32

    def _attached(self) -> list[bool]:
        return [
            p.grad is not None and p.grad.data_ptr() == chunk.data_ptr()
            for p, chunk in zip(self.parameters, self.chunks, strict=True)
        ]

    def average(self, comm: MPI.Comm, watchdog_s: float, contributors: int = 0) -> None:
        """Replace every `p.grad` by its mean over the ranks of `comm` (a missing gradient
        counts as zeros).

        Args:
            contributors: divide the sum by this many ranks instead of the world size (a
                learner group where only some ranks had a batch: the others pass
                `p.grad = None`, i.e. zeros).
        """
        attached = self._attached()
        for p, chunk, done in zip(self.parameters, self.chunks, attached, strict=True):
            if done:
                continue
            if p.grad is None:
                chunk.zero_()
            else:
                chunk.copy_(p.grad.detach().reshape(chunk.shape))
        if comm.Get_size() > 1:
            allreduce_sum(comm, self.buffer, watchdog_s)
            self.view.div_(contributors or comm.Get_size())
        for p, chunk, done in zip(self.parameters, self.chunks, attached, strict=True):
            if done:
                continue
            if self._can_attach(p):
                p.grad = chunk
            elif p.grad is None:
                p.grad = chunk.to(p.device).clone()
            else:
                p.grad.copy_(chunk)

    def clip(self, max_norm: float) -> None:
        """Scale the gradients so that their global L2 norm is at most `max_norm` (torch's
        `clip_grad_norm_` rule, coefficient max_norm / (norm + 1e-6) capped at 1): in
        place on the flat buffer when every gradient is a view into it."""
        if not all(self._attached()):
            torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)
            return
        norm = torch.linalg.vector_norm(self.view)
        self.view.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


def broadcast_parameters(
    comm: MPI.Comm, module: torch.nn.Module, watchdog_s: float, root: int = 0
) -> None:
    """Give every rank `root`'s parameters and buffers (at start and after a restore)."""
    tensors = list(module.parameters()) + list(module.buffers())
    if comm.Get_size() == 1 or not tensors:
        return
    flat = np.concatenate([t.detach().cpu().reshape(-1).double().numpy() for t in tensors])
    bcast(comm, flat, root, watchdog_s)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(torch.from_numpy(flat[offset : offset + n]).view_as(t).to(t.dtype))
            offset += n


def parameters_digest(module: torch.nn.Module) -> int:
    """A 63-bit digest of the exact bytes of every parameter (bit-identical <=> equal)."""
    digest = hashlib.blake2b(digest_size=8)
    for p in module.parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


class ParametersOutOfSync(RuntimeError):
    """Data-parallel ranks hold different parameters (a bug, or a non-deterministic op)."""


def check_parameters_in_sync(comm: MPI.Comm, module: torch.nn.Module, watchdog_s: float) -> int:
    """Collective: compare every rank's parameter digest (one small `Allreduce`).

    Returns:
        The digest (the same on every rank).

    Raises:
        ParametersOutOfSync: on every rank, naming the ranks whose digest differs from
            rank 0's.
    """
    digests = np.zeros(comm.Get_size(), dtype=np.float64)
    mine = parameters_digest(module)
    # float64 holds the digest's top 53 bits exactly enough to compare; keep the raw value
    # too so the message can show it.
    digests[comm.Get_rank()] = float(mine >> 10)
    allreduce_sum(comm, digests, watchdog_s)
    bad = [k for k in range(comm.Get_size()) if digests[k] != digests[0]]
    if bad:
        raise ParametersOutOfSync(
            f"parameters of ranks {bad} differ from rank 0's after the same updates "
            f"(digests {[int(d) for d in digests]}): the ranks no longer learn the same model"
        )
    return mine


def global_mean_std(comm: MPI.Comm, values: np.ndarray, watchdog_s: float) -> tuple[float, float]:
    """Mean and standard deviation of `values` pooled over every rank of `comm` (one
    `Allreduce` of [count, sum, sum of squares] in float64), e.g. for PPO's advantage
    normalization over the global batch.

    Args:
        values: any shape; all entries count.

    Returns:
        (mean, std) with the population variance (ddof 0).
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    stats = np.array([values.size, values.sum(), np.square(values).sum()], dtype=np.float64)
    allreduce_sum(comm, stats, watchdog_s)
    count = max(stats[0], 1.0)
    mean = stats[1] / count
    var = max(stats[2] / count - mean * mean, 0.0)
    return float(mean), float(np.sqrt(var))
