"""The whole training step (forward, backward, optimizer step) captured in one CUDA graph and
replayed, after PyTorch's whole-network capture recipe: one launch instead of thousands of
small kernels, which is where a small-batch FFJORD step spends its time on a GPU.

Capture needs static shapes and no host synchronisation inside the step: a fixed-step solver
(which :mod:`vaeflow.ode` integrates without synchronising), no adjoint, a capturable optimizer,
and one process. :func:`graph_unavailable` says why a run cannot use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vaeflow.flows.base import Flow
from vaeflow.rng import fork_rng

__all__ = ["GraphedStep", "capture", "graph_unavailable"]

# Optimizers whose state, when created by their first step, is all zeros (the step counter and
# the moments), so that zeroing it in place is the same as a fresh start.
_ZERO_STATE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax)


def graph_unavailable(
    model: torch.nn.Module, device: torch.device, world_size: int = 1
) -> str | None:
    """Why the training step of ``model`` cannot be captured on ``device`` (None: it can);
    each flow says what in its step a graph cannot hold (:meth:`Flow.graph_blocker`)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, and this run trains on {device}"
    if world_size > 1:
        return "CUDA graphs are not combined with data-parallel training here"
    for module in model.modules():
        reason = module.graph_blocker() if isinstance(module, Flow) else None
        if reason is not None:
            return reason
    return None


class _Snapshot:
    """The parameters, buffers and optimizer state of a model, put back *in place*.

    In place matters twice over: a graph replays on the addresses it captured, so the restored
    tensors must be the ones the capture will use; and an optimizer whose state was empty before
    the warm-up must not find it empty at the capture, or the capture would record the state's
    creation (zero moments, step 0) and every replay would start the optimizer afresh. State
    created by the warm-up is zeroed, which is its fresh value for the Adam family.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.tensors = {k: v.clone() for k, v in model.state_dict().items()
                        if isinstance(v, Tensor)}
        self.state = {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()}
                      for p, s in optimizer.state.items()}

    def restore(self) -> None:
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                if name in self.tensors:
                    value.copy_(self.tensors[name])
            for p, state in self.optimizer.state.items():
                before = self.state.get(p)
                if before is None and not isinstance(self.optimizer, _ZERO_STATE_OPTIMIZERS):
                    raise TypeError(
                        f"a CUDA-graphed step needs an optimizer whose fresh state is zeros "
                        f"(Adam, AdamW, Adamax), or one that has stepped; got "
                        f"{type(self.optimizer).__name__}"
                    )
                if before is None:  # created by the warm-up: back to its fresh value
                    for value in state.values():
                        if isinstance(value, Tensor):
                            value.zero_()
                    continue
                for key, old in before.items():
                    if isinstance(old, Tensor):
                        state[key].copy_(old)
                    else:
                        state[key] = old


class GraphedStep:
    """``step(x, beta) -> terms``: ``train_step`` on a static input buffer, replayed.

    The capture runs three warm-up steps on a side stream (the recipe), then puts the model,
    the optimizer and the RNG back as they were, in place (:class:`_Snapshot`), so that
    capturing changes no parameter: the run goes on as if the step had been eager.

    Args:
        step: ``step(x, beta) -> dict of 0-dim tensors`` (the training step to capture).
        model, optimizer: what ``step`` updates (restored after the warm-up).
        x: a batch of the static shape ``[B, C, H, W]`` on the CUDA device.
    """

    def __init__(
        self,
        step: Callable[[Tensor, Tensor], dict[str, Tensor]],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        x: Tensor,
    ) -> None:
        self.x = x.clone()
        self.beta = torch.ones((), device=x.device)
        snapshot = _Snapshot(model, optimizer)
        try:
            with fork_rng(x.device, int(torch.initial_seed()) % 2**31):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                try:
                    # warm up the allocator and autograd off the capture stream
                    with torch.cuda.stream(side):
                        for _ in range(3):
                            step(self.x, self.beta)
                finally:
                    # Also after a warm-up step raised (out of memory, at an allocation, on the
                    # host): the earlier steps' kernels may still be queued on the side stream,
                    # and the restore below, on this stream, must come after their writes to
                    # the weights, or they would land on the restored weights.
                    torch.cuda.current_stream().wait_stream(side)
        finally:
            # Also when a warm-up step raised (out of memory, say): :func:`capture` then goes on
            # eagerly, and must do so from the run's own weights, not from a warm-up's.
            snapshot.restore()
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step(self.x, self.beta)

    def __call__(self, x: Tensor, beta: float | Tensor = 1.0, copy: bool = True) -> dict[str, Any]:
        """Replay on ``x`` (same shape as the captured batch). With ``copy`` the terms are
        cloned (device copies, no synchronisation), so that they outlive the next replay."""
        self.x.copy_(x)
        if isinstance(beta, Tensor):
            self.beta.copy_(beta)
        else:
            self.beta.fill_(beta)
        self.graph.replay()
        return {k: v.clone() for k, v in self.out.items()} if copy else self.out


def capture(
    step: Callable[[Tensor, Tensor], dict[str, Tensor]],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
) -> tuple[GraphedStep | None, str | None]:
    """``(GraphedStep(...), None)``, or ``(None, why)`` when the capture fails on something that
    :func:`graph_unavailable` could not foresee (an operation a graph cannot hold); the model,
    the optimizer and the device are then left as they were, for eager steps.

    Raises:
        RuntimeError: when the failed capture left the device unusable (then the run must
            start again without ``cuda_graph``).
    """
    stream = torch.cuda.current_stream(x.device) if x.device.type == "cuda" else None
    try:
        return GraphedStep(step, model, optimizer, x), None
    except RuntimeError as err:
        why = _why(err)
    if stream is not None:
        # Only a GPU shows this: when capture_end raises (as it does after any error inside the
        # capture), torch.cuda.graph's __exit__ never leaves its capture stream, which stays
        # current and whose allocations still go to the failed graph's pool; the eager steps
        # go back to the stream they ran on.
        torch.cuda.set_stream(stream)
    # Nothing captured ran: the parameters and the optimizer state are those the warm-up
    # restored; only the gradients the capture allocated are dropped.
    optimizer.zero_grad(set_to_none=True)
    try:
        # The generator must have left capture mode; its draw is given back, or the eager
        # steps' noise would be one draw on from a run's that captured nowhere or at another
        # step (a resume captures again at its first batch): no exact resume.
        cuda = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type=x.device.type):
            torch.randn(1, device=x.device)
        torch.cuda.synchronize(x.device)
    except RuntimeError as err:
        raise RuntimeError(
            f"capturing the training step in a CUDA graph failed ({why}) and left the device "
            f"unusable ({err}); train again with --set cuda_graph=false"
        ) from err
    return None, why


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _why(err: BaseException) -> str:
    """The first line of the error that made the capture fail: an error inside the capture
    (a host read, say) makes ``torch.cuda.graph``'s ``capture_end`` raise again ("operation
    failed due to a previous error during capture"), with the first as its ``__context__``."""
    first = err.__context__
    if not isinstance(first, Exception):
        return _first_line(err)
    return f"{_first_line(first)} (then: {_first_line(err)})"
