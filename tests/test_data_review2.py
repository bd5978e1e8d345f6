"""Review tests of :mod:`vaeflow.data`: failures that are not the data file's must not be
reported as a damaged file, and a download is not thrown away for split sizes it does not hold.
Small cases, CPU, no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_data import SIZES, write_tiny

from vaeflow.data import DataFileError, load_dataset


def test_a_memory_error_is_not_a_damaged_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every exception of reading an intact member was turned into "the file is damaged ...
    delete it": a MemoryError too, so a good file was to be deleted and the real cause was a
    one-line error without its traceback. A member whose bytes pass their CRC check is not
    damaged: the exception now passes through unchanged."""
    write_tiny("caltech", tmp_path)

    def out_of_memory(*args: object, **kwargs: object) -> np.ndarray:
        raise MemoryError("Unable to allocate 47.0 MiB")

    monkeypatch.setattr(np.lib.format, "read_array", out_of_memory)
    with pytest.raises(MemoryError, match="Unable to allocate") as info:
        load_dataset("caltech", tmp_path, split_sizes=SIZES["caltech"])
    assert not isinstance(info.value, DataFileError)
