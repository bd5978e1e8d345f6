"""``torch.distributed`` glue: one model trained data-parallel by ``torchrun`` processes.

``torchrun --standalone --nproc_per_node=N --no-python vaeflow train ...`` starts N processes
(ranks) with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in their environment; :func:`start`
reads them and joins the job (NCCL for CUDA tensors, gloo for CPU tensors, so the same group
serves a CUDA run and its CPU-side object exchanges). Without that environment (or with
``WORLD_SIZE=1``) it returns :data:`SINGLE`, whose every method is the identity: a plain
``vaeflow train`` takes exactly the code path it always took.

The rules a :class:`World` implements:

- **Batches.** Every rank draws the same global batch of ``batch_size`` rows (the same loader,
  seed and shuffled order as one process) and keeps its rows: rank ``r`` takes the ``r``-th block
  of ``torch.tensor_split(batch, world_size)``, i.e. the first ``rows % world_size`` ranks take
  one row more. Its loss is weighted by ``rows_r * world_size / rows`` so that DDP's average of
  the ranks' gradients is the gradient of the global batch mean. A rank left without a row (a
  last batch with fewer rows than ranks) computes on a copy of the first row with weight 0, so
  that every rank runs the same collectives and the gradient is that of the real rows.
- **Noise.** Rank 0 keeps the stream a single process would have; the other ranks reseed theirs
  (from the seed and the rank), so their posterior and Hutchinson noise is independent. The
  evaluation (validation and test) instead draws each batch's posterior noise at the global
  shape on every rank and keeps the rank's rows: the figures equal one process's to
  floating-point tolerance (for FFJORD, to the solver tolerance: each rank's adaptive solve
  takes its own steps; and a Hutchinson validation draws rank-local probes).
- **Decisions.** Everything that stops or saves a run (a signal, the time budget, a NaN) is
  decided on values every rank agrees on: the loss terms and NFE of a logging window are
  all-reduced at its read-back, signals are pooled there, and rank 0's clock is the run's.
- **Files.** Only rank 0 reads or writes the run directory; what the other ranks need from it
  (the config when resuming, checkpoints, ``best.pt``; for ``vaeflow eval``, the config and
  the parameters evaluated) is broadcast from rank 0, so the ranks need no shared file system.
- **Data.** A missing data file is downloaded once per machine, by its ``LOCAL_RANK`` 0 (a
  machine's data directory may not be shared with the others), while the machine's other ranks
  wait; then every rank reads it. A download that fails stops every rank with its message.
- **Faults.** Collectives time out after ``VAEFLOW_DIST_TIMEOUT`` seconds (default 300): a rank
  that died or hangs ends the others with a message instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vaeflow.checks import InputError
from vaeflow.data.base import ChecksumError, DataNotFoundError
from vaeflow.runs import RunError

__all__ = [
    "SINGLE",
    "TIMEOUT_ENV",
    "PeerError",
    "USER_ERRORS",
    "World",
    "WindowSync",
    "check_world_size",
    "session",
    "shard_bounds",
    "start",
    "stop",
    "timeout_seconds",
]

TIMEOUT_ENV = "VAEFLOW_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds: long enough for a slow evaluation on rank 0's side
# The range torch can take: its c10d store counts the timeout in nanoseconds (int64, about 9.2e9
# s: with 1e10 s the store timed out at once, with 1e13 s it read a negative time-out), and
# below a millisecond it is zero.
TIMEOUT_RANGE = (1e-3, 1e9)
T = TypeVar("T")


class PeerError(RuntimeError):
    """Another rank failed; this one stops with it (the message names the rank and why)."""


def timeout_seconds() -> float:
    """The collective timeout: ``$VAEFLOW_DIST_TIMEOUT`` seconds, else 300.

    Raises:
        InputError: the value is not a number of seconds in :data:`TIMEOUT_RANGE` (``inf`` or
            ``1e20`` overflowed inside ``datetime.timedelta`` or torch's store).
    """
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    low, high = TIMEOUT_RANGE
    if not low <= value <= high:  # NaN fails both
        raise InputError(f"{TIMEOUT_ENV} must be a number of seconds from {low:g} to {high:g}, "
                         f"got {text!r}")
    return value


def shard_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s rows out of ``rows``: the blocks of ``tensor_split``,
    the first ``rows % world_size`` ranks holding one row more."""
    base, extra = divmod(rows, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


@dataclass(frozen=True)
class WindowSync:
    """What the ranks agree on at a logging window's read-back (see :meth:`World.sync_window`)."""

    values: Tensor  # [steps, terms] on the CPU: the global-batch means of each step's terms
    nfe: tuple[float, float]  # forward and backward NFE summed over the window, mean over ranks
    signal: int | None  # a signal some rank received, or None
    seconds: float  # rank 0's training seconds


class _Loss(nn.Module):
    """``VAE.loss`` as a module's ``forward``: DDP synchronises gradients only of what runs
    through the wrapped module's ``forward``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, beta: float | Tensor) -> dict[str, Tensor]:
        return self.model.loss(x, beta)


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job: ``rank`` of ``size``, on GPU ``local_rank``.

    ``World()`` (:data:`SINGLE`) is one process alone: every method then returns its input.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owned: bool = False  # :func:`start` joined the job and :func:`stop` leaves it

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that owns the run directory, TensorBoard and progress bars."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """``LOCAL_RANK`` 0: the first rank of its machine, which downloads a missing data file
        for the machine's ranks (another machine's data directory may not be shared)."""
        return self.local_rank == 0

    # ---- placement

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run under torchrun."""
        if not self.distributed or device.type != "cuda":
            return device
        if device.index is not None and device.index != self.local_rank:
            raise InputError(
                f"under torchrun each rank trains on cuda:LOCAL_RANK; --device {device} names "
                "one GPU: pass --device cuda (or auto), and choose the GPUs with "
                "CUDA_VISIBLE_DEVICES"
            )
        visible = torch.cuda.device_count()
        if self.local_rank >= visible:
            # else torch.cuda.set_device's "invalid device ordinal", a traceback per rank
            raise InputError(
                f"rank {self.rank} has LOCAL_RANK {self.local_rank}, but this machine shows "
                f"{visible} GPU(s) to it: start at most {visible} process(es) per machine "
                "(torchrun --nproc_per_node), or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
            )
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def map_location(self, device: torch.device) -> torch.device:
        """Where rank 0 loads a file that it then broadcasts: the CPU, since each rank moves
        the state to its own device (a pickled CUDA tensor would land on rank 0's GPU)."""
        return torch.device("cpu") if self.distributed else device

    def seed(self, seed: int) -> None:
        """Give ranks other than 0 their own noise stream; rank 0 keeps one process's."""
        if self.rank > 0:
            import numpy as np

            torch.manual_seed(int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0]))

    # ---- batches

    def shard(self, batch: Tensor) -> tuple[Tensor, float]:
        """This rank's rows of a global training batch ``[B, ...]`` and their loss weight
        ``rows_r * size / B`` (0 for the stand-in row of a rank left without one); see the
        module docstring. One process: ``(batch, 1.0)``."""
        if not self.distributed:
            return batch, 1.0
        lo, hi = shard_bounds(len(batch), self.rank, self.size)
        if lo == hi:
            return batch[:1], 0.0
        return batch[lo:hi], (hi - lo) * self.size / len(batch)

    @contextlib.contextmanager
    def eval_rows(self, model: nn.Module, rows: int) -> Iterator[tuple[slice, bool]]:
        """This rank's rows of an evaluation batch of ``rows`` rows, and whether they count
        (False for the stand-in row of a rank left without one). Inside the block ``model``
        (a :class:`~vaeflow.vae.VAE`) draws its posterior noise for all ``rows`` rows and keeps
        this rank's, so that every rank's stream stays where one process's would be."""
        if not self.distributed:
            yield slice(None), True
            return
        lo, hi = shard_bounds(rows, self.rank, self.size)
        counted = hi > lo
        keep = slice(lo, hi) if counted else slice(0, 1)

        def noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
            full = torch.randn((rows, *like.shape[1:]), generator=generator, device=like.device,
                               dtype=like.dtype)
            return full[keep]

        # An instance attribute shadows VAE._noise, the one place the posterior noise is drawn.
        model._noise = noise  # type: ignore[method-assign]
        try:
            yield keep, counted
        finally:
            del model._noise

    # ---- collectives

    def sum(self, value: Tensor) -> Tensor:
        """``value`` summed over the ranks (a new tensor; ``value`` itself for one process)."""
        if not self.distributed:
            return value
        out = value.clone()
        dist.all_reduce(out)
        return out

    def main_value(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (its clock decides a time budget)."""
        return self.from_main(lambda: value) if self.distributed else value

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` in rank order on rank 0, None on the others."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 (the run directory's owner), its result sent to every rank.

        An exception on rank 0 is raised there and, as an error of the same class when it is
        one that a user fixes (an :class:`InputError`, a data file missing or that failed its
        checksum), else as a :class:`PeerError`, on the other ranks, so no rank waits for a
        result that never comes."""
        if not self.distributed:
            return fn()
        box: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except BaseException as err:  # noqa: BLE001 - every rank must hear of it
                error = err
                box[0] = ("error", *_report(err))
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0][0] == "error":
            _, kind, what = box[0]
            raise _peer_error(0, kind, what)
        return box[0][1]

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Run the block on every rank; if it raised on any rank, raise on all of them (the
        rank's own exception where it failed, elsewhere as :meth:`from_main` says). The block
        must not use collectives itself; its end is a meeting of every rank."""
        if not self.distributed:
            yield
            return
        error: BaseException | None = None
        try:
            yield
        except BaseException as err:  # noqa: BLE001 - every rank must hear of it
            error = err
        mine = None if error is None else _report(error)
        reports: list[Any] = [None] * self.size
        dist.all_gather_object(reports, mine)
        if error is not None:
            raise error
        for rank, report in enumerate(reports):
            if report is not None:
                raise _peer_error(rank, *report)

    def sync_window(
        self, values: Tensor, nfe: Sequence[float], signal: int | None, seconds: float
    ) -> WindowSync:
        """The one read-back of a logging window, agreed by all ranks in one all-reduce.

        Args:
            values: ``[steps, terms]`` on the device: each step's weighted loss terms (see
                :meth:`shard`), so their mean over ranks is the global batch's mean.
            nfe: the window's forward and backward NFE totals on this rank.
            signal: a signal this rank received and has not acted on, or None.
            seconds: this rank's training seconds.
        """
        if not self.distributed:
            return WindowSync(values.cpu(), (float(nfe[0]), float(nfe[1])), signal, seconds)
        control = [float(nfe[0]), float(nfe[1]), float(signal or 0), seconds * self.is_main]
        flat = torch.cat([values.double().flatten(),
                          torch.tensor(control, dtype=torch.float64, device=values.device)])
        dist.all_reduce(flat)  # SUM: signal numbers only need to be non-zero
        host = flat.cpu()  # the one host synchronisation per window, as for one process
        n = values.numel()
        f, b, sig, main_seconds = host[n:].tolist()
        agreed = None if sig == 0 else (signal or _SIGTERM)
        return WindowSync(host[:n].view(values.shape) / self.size,
                          (f / self.size, b / self.size), agreed, main_seconds)

    # ---- the model

    def replicate(self, model: nn.Module, probe: Tensor) -> nn.Module | None:
        """The DDP module whose ``forward(x, beta)`` is ``model.loss`` with gradients averaged
        over the ranks, or None for one process.

        One forward and backward on the ``probe`` rows (noise forked, gradients cleared after)
        finds whether some parameter gets no gradient (the encoder's context head without a
        flow): DDP then needs ``find_unused_parameters``, which costs a graph walk per step, so
        it is asked for only then. Buffers are constants here (masks, a fixed FFJORD end
        time): they are not broadcast each step."""
        if not self.distributed:
            return None
        devices = [probe.device] if probe.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=probe.device.type):
            model.loss(probe, 1.0)["loss"].backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        model.zero_grad(set_to_none=True)
        from torch.nn.parallel import DistributedDataParallel

        # torch 2.14 renamed broadcast_buffers (now deprecated) to forward_sync_buffers; the
        # GPU machines run 2.11, which knows only the old name.
        no_sync = "forward_sync_buffers"
        if no_sync not in inspect.signature(DistributedDataParallel.__init__).parameters:
            no_sync = "broadcast_buffers"
        return DistributedDataParallel(
            _Loss(model),
            device_ids=[probe.device.index] if probe.device.type == "cuda" else None,
            find_unused_parameters=bool(unused),
            **{no_sync: False},
        )

    # ---- faults

    def lost_contact(self, err: BaseException) -> bool:
        """Whether ``err`` is a collective that failed because another rank died or hangs."""
        if not self.distributed or not isinstance(err, RuntimeError):
            return False
        if isinstance(err, (dist.DistError, PeerError)):
            return True
        text = str(err)
        return any(s in text for s in ("gloo", "NCCL", "Connection closed", "Connection reset",
                                        "Timed out", "timed out", "Broken pipe"))

    def lost_contact_reason(self, err: BaseException) -> str:
        """Why this rank stopped, when :meth:`lost_contact` is true of ``err``: the peer's
        report, or which rank lost contact and the collective timeout."""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, PeerError):
            return first
        return (
            f"rank {self.rank} of {self.size} lost contact with the other ranks ({first[:300]}):"
            " another rank died, hung or was stopped (collectives time out after "
            f"{timeout_seconds():g} s, ${TIMEOUT_ENV})"
        )

    def lost_contact_message(self, err: BaseException, run_dir: Path, saved: int | None) -> str:
        """What a training rank says when :meth:`lost_contact` is true of ``err``."""
        return f"{self.lost_contact_reason(err)}. {self.resume_hint(run_dir, saved)}"

    def resume_hint(self, run_dir: Path, saved: int | None) -> str:
        step = "" if saved is None else f" (step {saved})"
        return (
            f"The last checkpoint{step} is kept in {run_dir}: continue with "
            f"`vaeflow train --resume {run_dir}` under the same torchrun command"
        )


SINGLE = World()
_SIGTERM = 15


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# The failures that a user fixes (bad input, a folder in the way, a data file missing or that
# failed its checksum), which a command prints as one line (the CLI catches these; anything
# else is a bug and shows its traceback). They are defined here, below the CLI, because a rank
# that hears of one raises the same class, so that it stops with that line too, not as a lost
# peer (whose advice is to resume the run).
USER_ERRORS: tuple[type[Exception], ...] = (
    InputError, FileExistsError, DataNotFoundError, ChecksumError
)


def _report(err: BaseException) -> tuple[int, str]:
    """What the other ranks hear of ``err``: the index of its class in :data:`USER_ERRORS`
    (-1 for any other error) and its description."""
    kind = next((i for i, cls in enumerate(USER_ERRORS) if isinstance(err, cls)), -1)
    return kind, _describe(err)


def _peer_error(rank: int, kind: int, what: str) -> Exception:
    """The error a rank raises when rank ``rank`` reported ``(kind, what)`` (:func:`_report`)."""
    cls = USER_ERRORS[kind] if kind >= 0 else PeerError
    return cls(f"rank {rank} stopped: {what}")


def check_world_size(saved: int, world: World, source: str | Path) -> None:
    """Refuse to resume a checkpoint written at another world size.

    Each rank's RNG state is saved (its posterior and Hutchinson noise), and the time budget and
    the batch shards depend on the rank count: at another world size the run could go on, but
    it would not be the run that was started, and it would not end as an uninterrupted run."""
    if saved == world.size:
        return
    how = ("a plain `vaeflow train --resume` (no torchrun)" if saved == 1 else
           f"torchrun with {saved} processes in all (e.g. --nproc_per_node={saved})")
    raise RunError(
        f"{source} was written by {saved} process(es) (world size {saved}) and this job has "
        f"{world.size}: each rank's random-number state is in the checkpoint, so a run resumes "
        f"exactly only at the world size that wrote it. Resume it with {how}, or start a new "
        "run with --out"
    )


@contextlib.contextmanager
def session() -> Iterator[World]:
    """:func:`start`, and :func:`stop` after the block."""
    world = start()
    try:
        yield world
    except BaseException:
        stop(world)  # no meeting: a peer that failed would never come to it
        raise
    if world.owned and dist.is_initialized():
        # Every rank ends the block after the same collectives, but the fastest one would tear
        # down its connections while a peer still reads the last result from them; gloo reports
        # that as a peer that hung up, and can abort the process. One more meeting first.
        dist.barrier()
        # The block's objects that hold the group (a DDP module) should be gone by now: one
        # alive keeps the group's gloo threads past destroy_process_group, to the interpreter's
        # exit, where their end can abort the process after its work is done ("terminate
        # called without an active exception"). A collection frees those left in cycles. (Not
        # after a failure: a DDP module freed then may wait on a collective that never ends.)
        gc.collect()
    stop(world)


def start() -> World:
    """This process's :class:`World`: the process group a caller already set up, else the
    torchrun job its environment describes (joined here), else :data:`SINGLE`."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return World(dist.get_rank(), dist.get_world_size(), local)
    env = os.environ
    if not all(k in env for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")):
        return SINGLE
    try:
        size, rank, local = int(env["WORLD_SIZE"]), int(env["RANK"]), int(env["LOCAL_RANK"])
    except ValueError as err:
        raise InputError(f"torchrun's WORLD_SIZE/RANK/LOCAL_RANK are not integers: {err}") from err
    if size <= 1:
        return SINGLE  # one process: nothing to join, the plain code path
    # NCCL moves CUDA tensors, gloo CPU ones: the same group serves a CUDA or a CPU run and the
    # CPU-side object exchanges of both.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
    return World(rank, size, local, owned=True)


def stop(world: World) -> None:
    """Leave the job that :func:`start` joined (nothing otherwise)."""
    if world.owned and dist.is_initialized():
        dist.destroy_process_group()
