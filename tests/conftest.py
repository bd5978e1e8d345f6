"""Shared fixtures and helpers: tiny data sets written by the tests themselves (never
downloaded), the ``slow`` marker of the fixtures that train runs, the README's code blocks, and
the toy affine flow of one's own that several test files build on."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from vaeflow.flows import ContextHead, Flow

# The experiment scripts live beside the library, not in it: tests import them by module name
# (`import table`, `import bench`) from this one place.
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

# Tiny tensors run fastest on one thread, and a machine shared with other jobs does not then
# thrash OpenMP's spinning workers.
torch.set_num_threads(1)

TINY_SPLITS = (200, 50, 50)

# Module fixtures that train runs in child processes (the comparison grid, the torchrun
# reference runs): every test that uses one is slow, whether or not it is the first to ask.
SLOW_FIXTURES = {"grid", "reference_runs"}


class AffineFlow(Flow):
    """``zK = z0 * exp(a(h)) + b(h)``, ``logdet = sum a``: an amortized diagonal affine flow of
    one's own, with its exact inverse. One :class:`ContextHead` gives ``a`` (the first ``dim``
    rows of ``head.linear``) and then ``b`` (the next ``dim``).

    Args:
        bound: if given, ``a = bound * tanh(raw a)`` (a log-scale that stays in
            ``+-bound``), else ``a`` is the head's output itself.
        zero: the head starts at zero, so the flow is the identity at initialisation, as many
            flows start.
    """

    has_inverse = True

    def __init__(
        self, dim: int, context_dim: int, bound: float | None = None, zero: bool = False
    ) -> None:
        super().__init__(dim, context_dim)
        self.bound = bound
        self.head = ContextHead(context_dim, {"a": (dim,), "b": (dim,)})
        if zero:
            nn.init.zeros_(self.head.linear.weight)
            nn.init.zeros_(self.head.linear.bias)

    def _params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(a [B, D], b [B, D])`` from the context."""
        p = self.head(h)
        a = p["a"] if self.bound is None else self.bound * torch.tanh(p["a"])
        return a, p["b"]

    def _forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self._params(h)
        return z0 * a.exp() + b, a.sum(-1)

    def _inverse(self, zK: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self._params(h)
        return (zK - b) * (-a).exp(), a.sum(-1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` the tests that use a :data:`SLOW_FIXTURES` fixture; the others that take
    more than ~5 s on 2 cores carry ``@pytest.mark.slow`` themselves. ``pytest -m "not slow"``
    is the quick loop while developing; CI runs everything."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def run_readme(
    section: str, min_blocks: int = 1, skip: tuple[str, ...] = ()
) -> dict[str, object]:
    """Execute the Python blocks of the README's ``## section`` as written, joined, from torch's
    seed 0, and return their namespace; the section must hold at least ``min_blocks`` blocks.
    A block that holds one of the texts of ``skip`` is left out (a GPU job shown as an
    example); each of them must name exactly one block, so that none is skipped unawares."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"\n## {section}\n" in readme, section
    text = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= min_blocks, (section, len(blocks))
    for marker in skip:
        assert sum(marker in block for block in blocks) == 1, (section, marker)
    blocks = [block for block in blocks if not any(marker in block for marker in skip)]
    namespace: dict[str, object] = {"__name__": "docs_" + re.sub(r"\W", "_", section.lower())}
    torch.manual_seed(0)
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    return namespace


def write_structured_mnist(directory: Path, sizes: tuple[int, int, int] = TINY_SPLITS) -> Path:
    """A learnable ``binarized_mnist.npz``: four random 28x28 binary prototypes with 5% of the
    pixels flipped, in the packed-bits layout of shared/data."""
    rng = np.random.default_rng(0)
    prototypes = rng.random((4, 784)) < 0.3
    arrays = {}
    for split, n in zip(("train", "valid", "test"), sizes, strict=True):
        bits = prototypes[rng.integers(0, 4, n)] ^ (rng.random((n, 784)) < 0.05)
        arrays[f"x_{split}"] = np.packbits(bits.astype(np.uint8), axis=1)
        arrays[f"shape_{split}"] = np.array(bits.shape, dtype=np.int64)
    path = directory / "binarized_mnist.npz"
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding the structured tiny static MNIST (splits ``TINY_SPLITS``)."""
    directory = tmp_path_factory.mktemp("data")
    write_structured_mnist(directory)
    return directory
