"""Evaluation and run-directory edge cases found in review: a model with a continuous flow saved
as a run (:func:`vaeflow.evaluate.save_run`), a run directory in use, and the Pyro transform's
memory of its own sample whatever its ``cache_size``."""

from __future__ import annotations

from pathlib import Path

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.conditional import ConditionalComposeTransformModule
from test_train import assert_same_params, tiny_config

from vaeflow.evaluate import save_run
from vaeflow.flows import make_flow
from vaeflow.model import build_model
from vaeflow.pyro import ConditionalFlowTransform
from vaeflow.runs import BEST, CONFIG, RunError, RunLock, load_model, solver_state


def test_save_run_takes_a_model_with_a_continuous_flow(tiny_data_dir: Path,
                                                       tmp_path: Path) -> None:
    """FFJORD's state_dict holds its solver settings (a dict, not a tensor) beside the
    parameters: save_run stores them as they are, and the saved run loads to the same model."""
    config = tiny_config(tiny_data_dir, "ffjord")
    model = build_model(config)
    model.flow.tighten_solver(10.0)  # as a NaN retry does: the saved run keeps it
    assert save_run(tmp_path / "mine", model, config, evaluate=False) is None
    loaded, _ = load_model(tmp_path / "mine")
    assert_same_params(loaded.state_dict(), model.state_dict())
    assert solver_state(loaded) == solver_state(model)
    assert solver_state(loaded)[0]["atol"] == pytest.approx(1e-5)


def test_save_run_does_not_overwrite_a_run_in_use(tiny_data_dir: Path, tmp_path: Path) -> None:
    """``overwrite`` replaces a run's files, but not those of a run that a live process is
    training (it holds the folder's lock): that is refused, as ``vaeflow train --overwrite``
    refuses it, and its files are left alone."""
    config = tiny_config(tiny_data_dir, "planar")
    model = build_model(config)
    directory = tmp_path / "busy"
    save_run(directory, model, config, evaluate=False)
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.name in (BEST, CONFIG)}
    with RunLock(directory), pytest.raises(RunError, match="in use by another vaeflow process"):
        save_run(directory, model, config, evaluate=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.name in before} == before
    save_run(directory, model, config, evaluate=False, overwrite=True)  # free again: replaced


@pytest.mark.parametrize("cache_size", [0, 1])
def test_composed_transforms_score_their_sample_without_running_the_flows_again(
    cache_size: int,
) -> None:
    """Torch's ComposeTransform recomputes each part's image to take its log-determinant. The
    transform remembers its last call whatever ``cache_size`` is: scoring the sample runs no
    flow again (for FFJORD: no second solve, and the Hutchinson estimate of the sample)."""
    torch.manual_seed(0)
    d, h_dim = 2, 4
    flows = [make_flow("ffjord", d, h_dim, hidden_dims=(8,), atol=1e-4, rtol=1e-4).double(),
             make_flow("planar", d, h_dim, num_steps=2).double()]
    calls = [0, 0]
    for i, flow in enumerate(flows):
        flow.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    stack = ConditionalComposeTransformModule(
        [ConditionalFlowTransform(flow, cache_size) for flow in flows]
    )
    mu = torch.zeros(3, d, dtype=torch.float64)
    h = torch.randn(3, h_dim, dtype=torch.float64)
    q = dist.TransformedDistribution(dist.Normal(mu, torch.ones_like(mu)), [stack.condition(h)])
    torch.manual_seed(1)
    zK = q.rsample()
    assert calls == [1, 1]
    log_q = q.log_prob(zK)
    assert calls == [1, 1]

    torch.manual_seed(1)  # the same base noise, then the same Hutchinson noise, by hand
    z0 = dist.Normal(mu, torch.ones_like(mu)).rsample()
    z1, logdet1 = flows[0](z0, h)
    _, logdet2 = flows[1](z1, h)
    expected = dist.Normal(mu, torch.ones_like(mu)).log_prob(z0).sum(-1) - logdet1 - logdet2
    torch.testing.assert_close(log_q, expected)


def test_a_checkpoint_of_a_newer_vaeflow_is_not_to_be_overwritten(tmp_path: Path) -> None:
    """A run written by a newer vaeflow is not an older one's: the advice is to use that
    version, not --overwrite (which would delete the run)."""
    from vaeflow.runs import CHECKPOINT_FORMAT, check_checkpoint_format

    source = tmp_path / "checkpoint.pt"
    with pytest.raises(RunError, match="newer vaeflow") as err:
        check_checkpoint_format({"format": CHECKPOINT_FORMAT + 1}, source)
    assert "--overwrite" not in str(err.value)
    with pytest.raises(RunError, match="older vaeflow.*--overwrite"):
        check_checkpoint_format({}, source)  # format 1: older, afresh is the way
    check_checkpoint_format({"format": CHECKPOINT_FORMAT}, source)


def test_without_a_cache_a_fixed_input_follows_the_flows_parameters() -> None:
    """cache_size=0 asks for no cache: the same z0 tensor pushed through again after the
    parameters changed (an optimizer step; a fixed grid of points drawn each epoch) gets the
    new image, not the remembered one of its last call."""
    torch.manual_seed(0)
    flow = make_flow("planar", 2, 4, num_steps=2).double()
    t = ConditionalFlowTransform(flow, cache_size=0).condition(
        torch.randn(3, 4, dtype=torch.float64))
    z0 = torch.randn(3, 2, dtype=torch.float64)
    first = t(z0).detach().clone()
    assert torch.equal(t(z0), first)  # unchanged parameters: the memory may answer
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1)
    moved = t(z0)
    expected, logdet = flow(z0, t.context.expand(3, -1))
    torch.testing.assert_close(moved, expected)
    assert not torch.equal(moved, first)
    torch.testing.assert_close(t.log_abs_det_jacobian(z0, moved), logdet)


def test_after_a_parameter_change_the_inverse_and_logdet_are_not_remembered() -> None:
    """The memory of the last call answers the inverse of its zK and the log-determinant of
    its pair only while the parameters are unchanged: after an optimizer step the same zK
    inverts under the new flow, and the pair's logdet is the new flow's at z0."""
    torch.manual_seed(0)
    flow = make_flow("iaf", 2, 4, num_steps=2, hidden_dim=8).double()
    t = ConditionalFlowTransform(flow, cache_size=0).condition(
        torch.randn(3, 4, dtype=torch.float64))
    h = t.context.expand(3, -1)
    z0 = torch.randn(3, 2, dtype=torch.float64)
    zK = t(z0)
    assert t.inv(zK) is z0  # unchanged parameters: answered from memory
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.testing.assert_close(t.log_abs_det_jacobian(z0, zK), flow(z0, h)[1])
    back = t.inv(zK)
    assert not torch.allclose(back, z0)
    torch.testing.assert_close(flow(back, h)[0], zK)


def test_save_run_of_a_model_with_non_finite_figures_marks_the_run_failed(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """A model whose test NELBO is NaN is saved, but its run is marked failed (as `vaeflow
    train` marks one), with the reason, and save_run says so: not a finished run of NaNs."""
    from vaeflow.report import compare_rows
    from vaeflow.runs import Run

    config = tiny_config(tiny_data_dir, "planar")
    model = build_model(config)
    with torch.no_grad():
        next(model.decoder.parameters()).fill_(float("nan"))
    with pytest.raises(RunError, match="non-finite figures .*test_nelbo.*vaeflow eval"):
        save_run(tmp_path / "nan", model, config)
    run = Run(tmp_path / "nan")
    assert run.results is None and "test_nelbo" in (run.failure or "")
    assert (tmp_path / "nan" / BEST).is_file()
    row = compare_rows([run])[0]
    assert row["status"] == "failed" and row["test NELBO"] is None
