"""Review of the training loop's bookkeeping: resumes across devices and options, budgets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import Crash, assert_same_params, crash_at, params, tiny_config

from vaeflow.train import train


def test_a_checkpoint_of_a_captured_step_resumes_on_a_cpu(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cuda_graph run on a GPU makes its optimizer capturable, and its checkpoint says so in
    # the param groups; resumed with --device cpu (as the README allows), the optimizer must
    # step as this session's (not capturable: a capturable Adamax refuses CPU tensors).
    config = tiny_config(tiny_data_dir, max_steps=15)
    reference = train(config, tmp_path / "a", progress=False)
    crash_at(monkeypatch, 13)  # the last checkpoint: step 10, the end of epoch 1
    with pytest.raises(Crash):
        train(config, tmp_path / "b", progress=False)
    monkeypatch.undo()
    path = tmp_path / "b" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:
        group["capturable"] = True  # as the GPU's captured run wrote it
    torch.save(ckpt, path)
    assert train(resume=tmp_path / "b", progress=False) == reference
    assert_same_params(params(tmp_path / "a"), params(tmp_path / "b"))
    saved = torch.load(path, weights_only=True)["optimizer"]["param_groups"]
    assert not any(group["capturable"] for group in saved)
