"""Review of the flows, the ODE solve, the VAE terms, the likelihoods and the networks: each test
here failed before the fix it names, or covers a case the other flow tests leave out."""

from __future__ import annotations

import pytest
import torch

from vaeflow.flows import FFJORD, FLOWS, Planar, flow_hyperparameters, make_flow

RK4 = dict(method="rk4", solver_options={"step_size": 0.25})


def test_a_fixed_step_solve_keeps_its_grid_on_the_host_under_a_default_device() -> None:
    """Under ``with torch.device(...)`` (how a run builds its model) the fixed-step grid was made
    on that device: its ``.item()`` synchronised a GPU in every solve and failed on meta."""
    with torch.device("meta"):
        flow = FFJORD(3, 2, hidden_dims=(8,), rank=2, **RK4).train()
        z0, h = torch.randn(4, 3, requires_grad=True), torch.randn(4, 2)
        zK, logdet = flow(z0, h)  # any host read of a meta tensor raises
        (zK.sum() + logdet.sum()).backward()
    assert zK.device.type == "meta" and logdet.shape == (4,)
    assert flow.nfe_forward == 4 * 4  # 4 steps of 4 stages: the grid of step_size 0.25


class _PassingPlanar(Planar):
    """A flow of one's own that hands its options on to a built-in one."""

    def __init__(self, dim: int, context_dim: int, **options: object) -> None:
        super().__init__(dim, context_dim, **options)


def test_a_flow_whose_constructor_takes_kwargs_gets_its_options(monkeypatch) -> None:
    """Such a flow was refused every option ('valid ones are options') and listed ``options``
    as a hyperparameter of its own."""
    monkeypatch.setitem(FLOWS, "passing-planar", _PassingPlanar)
    flow = make_flow("passing-planar", 4, 3, num_steps=2)
    assert flow.num_steps == 2
    assert flow_hyperparameters("passing-planar") == {}
    with pytest.raises(TypeError, match="num_step"):  # its constructor refuses what it lacks
        make_flow("passing-planar", 4, 3, num_step=2)
