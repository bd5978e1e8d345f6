"""Random-number state: saved and restored for an exact resume, and seeded blocks that leave
the global streams as they were (so an evaluation never shifts the training noise)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["fork_rng", "rng_state", "set_rng_state"]


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """The global RNG states: the CPU's, and ``device``'s when it is a CUDA device."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Tensor], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def fork_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run the block with the global RNGs (CPU, and ``device``'s when CUDA) seeded with
    ``seed``; the previous states are restored after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield
