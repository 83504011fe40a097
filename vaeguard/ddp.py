"""Training across processes with ``torch.distributed``: gloo on CPU, NCCL on CUDA.

A fit inside a process group (launched by ``torchrun --nproc-per-node N`` or by
``vaeguard fit --nproc-per-node N``) trains one model on every rank, each rank computing
the loss of its share of every minibatch. The ranks stay in lock step because they
share every random draw: the permutation of the rows each epoch and the
reparameterisation noise come from generators seeded from ``random_state``, so rank r
takes the r-th contiguous share of the same global batch that a single process would
draw (what ``DistributedSampler`` does with a shared seed and epoch). After the
backward pass one ``all_reduce`` sums the gradients and the loss over the ranks (the
averaging DDP does, over one flat buffer; ``DistributedDataParallel`` itself is not
used because it wraps one ``nn.Module`` and cannot wrap the vectorised stack of models
trained side by side). ``batch_size`` is therefore the global batch, and the rows a
trimmed fit leaves out of a batch are chosen from every rank's losses: a fit on N ranks
takes the steps one process would take, up to float rounding.

After training, the ranks share the scoring of the training rows that set the threshold
(each scores its share, then all hold all the scores); the latent statistics every rank
computes for itself from identical weights.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: How long a collective may wait for the other ranks before the job stops with an error.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
#: torchrun's environment: a process launched by it has these set.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A rank failed or the process group could not be formed; the message says which and why."""


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a ``torch.distributed`` job: its rank of ``world_size``, its rank on this machine."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that reports progress and writes files."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """``device`` as this rank should use it: CUDA ranks take the GPU of their local rank."""
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
        return device

    def share(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` items (shares differ in size by at most one)."""
        return slice(self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size)

    def sum(self, tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
        """Each tensor summed over the ranks (``None``: zeros shaped like ``like``), in one ``all_reduce``."""
        parts = [torch.zeros_like(ref) if t is None else t for t, ref in zip(tensors, like, strict=True)]
        flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in parts])
        _collective(torch.distributed.all_reduce, flat)
        out, start = [], 0
        for p in parts:
            out.append(flat[start : start + p.numel()].view(p.shape).to(p.dtype))
            start += p.numel()
        return out

    def gather_columns(self, values: Tensor, total: int) -> Tensor:
        """``values`` ``(M, share)`` from every rank, joined along the last axis in rank order: ``(M, total)``."""
        width = -(-total // self.world_size)  # the largest share
        padded = torch.zeros(values.shape[0], width, dtype=values.dtype, device=values.device)
        padded[:, : values.shape[1]] = values
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        _collective(torch.distributed.all_gather, parts, padded)
        sizes = [(r + 1) * total // self.world_size - r * total // self.world_size for r in range(self.world_size)]
        return torch.cat([p[:, :size] for p, size in zip(parts, sizes, strict=True)], dim=1)

    def gather_scores(self, scores: np.ndarray, total: int) -> np.ndarray:
        """Every rank's share of ``total`` per-row float64 values (numpy, ``(share,)``) joined in rank order."""
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        mine = torch.as_tensor(np.ascontiguousarray(scores), dtype=torch.float64, device=device)[None]
        return self.gather_columns(mine, total)[0].cpu().numpy()

    def finish(self) -> None:
        """Wait for every rank, then close the group (the end of a job that succeeded on every rank)."""
        _collective(torch.distributed.barrier)
        torch.distributed.destroy_process_group()

    def broadcast_parameters(self, tensors: Sequence[Tensor]) -> None:
        """Every rank's ``tensors`` overwritten by rank 0's (in place)."""
        for t in tensors:
            _collective(torch.distributed.broadcast, t.data, 0)


def same_rows(group: ProcessGroup, tensors: Sequence[Tensor | None]) -> None:
    """Raise unless every rank holds the same training rows (each rank trains on its share of the one set).

    A script that hands each rank its own slice of the data would otherwise train on a
    mix of shares silently; the ranks compare the SHA-256 of their rows.
    """
    digest = hashlib.sha256()
    for t in tensors:
        if t is not None:
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    mine = (digest.hexdigest(), tuple(tensors[0].shape))
    every: list[Any] = [None] * group.world_size
    _collective(torch.distributed.all_gather_object, every, mine)
    differ = [r for r, theirs in enumerate(every) if theirs[0] != every[0][0]]
    if differ:
        raise ValueError(
            f"every process must fit the same rows (each trains on its share of every batch): rank {differ[0]} "
            f"holds {every[differ[0]][1][0]} rows that differ from rank 0's {every[0][1][0]}; "
            "pass the whole data set on every rank"
        )


def _collective(op: Callable[..., Any], *args: Any) -> None:
    try:
        op(*args)
    except RuntimeError as exc:  # a peer left (killed, crashed) or timed out
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DistributedError(f"another training process stopped or stopped answering ({first})") from exc


def current_group(device: torch.device | None = None) -> ProcessGroup | None:
    """The process group this process trains in, or None for a single process.

    An initialised ``torch.distributed`` default group is used as it is. A process that
    ``torchrun`` launched (its environment sets ``WORLD_SIZE`` > 1) but that has not
    initialised a group gets one here: NCCL where ``device`` is CUDA, gloo otherwise.
    """
    if not torch.distributed.is_available():
        return None
    if not torch.distributed.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not all(v in os.environ for v in LAUNCH_VARIABLES):
            return None
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        try:
            with _native_log_held_back():
                torch.distributed.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        except Exception as exc:
            raise DistributedError(f"could not join the process group of this torchrun job: {exc}") from exc
        # a group left for the interpreter's teardown can abort the process ("terminate called
        # without an active exception") after a fit that succeeded: the group formed here is closed here
        atexit.register(_close_group)
    world = torch.distributed.get_world_size()
    if world <= 1:
        return None
    return ProcessGroup(
        rank=torch.distributed.get_rank(),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank())),
        backend=str(torch.distributed.get_backend()),
    )


@contextlib.contextmanager
def _native_log_held_back() -> Iterator[None]:
    """Drop what native code writes to file descriptor 2 while the ranks connect.

    gloo logs every retry while a peer is still starting, and every refused connection
    when a peer died before the group formed. Neither is for the user: a group that
    forms needs no word, and one that does not raises an exception whose message says
    why (reported in one line, as every failure of a rank is).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _close_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch(entrypoint: Callable[..., Any], args: tuple[Any, ...], nproc_per_node: int) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` in ``nproc_per_node`` new processes that form one group on this machine.

    Returns each rank's return value. When any rank fails (an exception, a signal), the
    others are stopped at once and :class:`DistributedError` says which rank failed and why
    in one line. ``entrypoint`` must be importable by name (the processes are spawned).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc_per_node,
        run_id=f"vaeguard-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    # the failure is reported below in one line, not as torch's log records
    quiet = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.CRITICAL)
    try:
        return elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        raise DistributedError(describe_failure(exc.failures)) from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)


def describe_failure(failures: dict[int, Any]) -> str:
    """One line naming the first rank that failed and why (its exception, or the signal that ended it)."""
    rank = min(failures, key=lambda r: (failures[r].timestamp, r))
    failure = failures[rank]
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    if failure.exitcode is not None and failure.exitcode < 0:
        try:
            why = f"killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            why = f"ended by signal {-failure.exitcode}"
    else:
        text = str(message or "").splitlines()
        why = text[0] if text and not text[0].startswith("To enable traceback") else f"exit code {failure.exitcode}"
    return f"training process {rank} failed ({why}); the other processes were stopped"
