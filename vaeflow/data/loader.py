"""Device-resident batching: :class:`DeviceLoader` indexes batches of a tensor where it already
lives (no host round trips), shuffles and binarizes them with a generator on that device, and
saves its position inside an epoch so that a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from vaeflow.checks import check_positive_int

__all__ = ["DeviceLoader"]

logger = logging.getLogger(__name__)


class DeviceLoader:
    """Batches of a tensor that already lives on its device, without host round trips.

    ``data [N, 1, H, W]`` stays where it is; a ``torch.Generator`` on the same device draws the
    permutation (``shuffle``) and the Bernoulli samples (``dynamic_binarization``), so the batch
    stream is a function of ``seed`` alone. Iterating yields ``x [B, 1, H, W]`` (the last batch
    is smaller unless ``drop_last``); ``len()`` is the number of batches per epoch.

    Resuming: ``state_dict()`` holds the generator state and the position inside the current
    epoch (its permutation and the next batch index). After ``load_state_dict`` on a loader over
    the same data, ``iter()`` continues with the remaining batches of the interrupted epoch and
    then draws further epochs exactly as the uninterrupted loader would. Take the state after
    the step on a batch is done: the position already counts the batch last yielded.

    A state taken on another kind of device (a run resumed with another ``--device``) goes on
    with the interrupted epoch in its saved order, but a CPU generator's state means nothing to
    a CUDA one: the draws after it (later shuffles, binarizations) come from a generator
    seeded from the saved state, deterministically, not the stream the other device had.

    One iteration at a time: the position is shared by all iterators of one loader.
    """

    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        dynamic_binarization: bool = False,
        seed: int = 0,
    ) -> None:
        check_positive_int("batch_size", batch_size)
        if data.dim() < 1 or len(data) == 0:
            raise ValueError(f"data must be a non-empty tensor [N, ...], got {tuple(data.shape)}")
        if drop_last and len(data) < batch_size:
            raise ValueError(
                f"drop_last with batch_size {batch_size} > {len(data)} samples gives no batch"
            )
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.dynamic_binarization = dynamic_binarization
        self.seed = seed
        self.generator = torch.Generator(device=data.device)
        self.generator.manual_seed(seed)
        self._perm: Tensor | None = None  # on data.device; None when not shuffling
        self._next = 0  # index of the next batch of the current epoch
        self._active = False  # an epoch has started and not been closed

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def in_epoch(self) -> bool:
        """True when an epoch is under way: the next ``iter()`` continues it."""
        return self._active and self._next < len(self)

    @property
    def batches_left(self) -> int:
        """Batches the next ``iter()`` yields (a full epoch when none is under way)."""
        return len(self) - self._next if self.in_epoch else len(self)

    def _start_epoch(self) -> None:
        if self.shuffle:
            self._perm = torch.randperm(
                len(self.data), generator=self.generator, device=self.data.device
            )
        self._next = 0
        self._active = True

    def _batch(self, i: int) -> Tensor:
        start = i * self.batch_size
        stop = min(start + self.batch_size, len(self.data))
        if self._perm is None:
            x = self.data[start:stop]
        else:
            x = self.data.index_select(0, self._perm[start:stop])
        if self.dynamic_binarization:
            x = torch.bernoulli(x, generator=self.generator)
        return x

    def __iter__(self) -> Iterator[Tensor]:
        if not self.in_epoch:
            self._start_epoch()
        while self._next < len(self):
            i = self._next
            x = self._batch(i)
            # advance before yielding: a checkpoint written while the consumer works on this
            # batch must resume with the next one
            self._next = i + 1
            yield x
        self._active = False
        self._perm = None
        self._next = 0

    def state_dict(self) -> dict[str, Any]:
        """Generator state, position in the epoch and the settings they are only valid for.

        Plain tensors, ints and bools (CPU), so ``torch.load(..., weights_only=True)`` reads it.
        """
        return {
            "generator": self.generator.get_state(),
            "generator_device": self.generator.device.type,
            "perm": None if self._perm is None else self._perm.detach().to("cpu", copy=True),
            "next_batch": self._next,
            "active": self._active,
            "num_samples": len(self.data),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "dynamic_binarization": self.dynamic_binarization,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses a state taken on a differently configured loader."""
        for key in ("num_samples", "batch_size", "shuffle", "drop_last", "dynamic_binarization"):
            mine = len(self.data) if key == "num_samples" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(
                    f"DeviceLoader state has {key}={state[key]!r} but this loader has {mine!r}"
                )
        perm = state["perm"]
        if perm is not None:
            if perm.shape != (len(self.data),):
                raise ValueError(
                    f"DeviceLoader state has a permutation of shape {tuple(perm.shape)}, "
                    f"expected ({len(self.data)},)"
                )
            perm = perm.to(self.data.device)
        next_batch = int(state["next_batch"])
        if not 0 <= next_batch <= len(self):
            raise ValueError(
                f"DeviceLoader state has next_batch={next_batch}, not in [0, {len(self)}]"
            )
        self._set_generator(state)
        self._perm = perm
        self._next = next_batch
        self._active = bool(state["active"])

    def _set_generator(self, state: Mapping[str, Any]) -> None:
        saved, here = state.get("generator_device"), self.generator.device.type
        if saved == here:
            self.generator.set_state(state["generator"])
            return
        if saved is None:  # a state from before the device was recorded: try it
            try:
                self.generator.set_state(state["generator"])
                return
            except RuntimeError:  # the size of another device's generator state
                saved = "another device"
        digest = hashlib.sha256(state["generator"].cpu().numpy().tobytes()).digest()
        self.generator.manual_seed(int.from_bytes(digest[:8], "little"))
        logger.warning(
            "the data loader's state was saved on %s and is loaded on %s: the epoch goes on in "
            "its saved order, and later shuffles and binarizations draw from a new stream",
            saved, here,
        )
