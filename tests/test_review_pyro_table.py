"""Review of the Pyro integration and the comparison table: the bugs found, one test each.

Fast and CPU-only: no grid is trained here, the table's commands are read back by its own
parser, and the Pyro checks use tiny flows on tensors made here.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pyro.distributions as dist
import pyro_vae
import pytest
import table
import table_grid
import table_options
import table_report
import torch
from pyro.optim.clipped_adam import ClippedAdam

from vaeflow.flows import make_flow
from vaeflow.pyro import ConditionalFlowTransform


def options_of_command(command: str) -> table_options.TableOptions:
    """What a printed ``experiments/table.py`` command asks for, read by the table's own
    parser."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "experiments/table.py"], command
    return table.options_from_args(argv[2:])


def seeds_of_command(command: str) -> list[int]:
    """The seeds that a printed ``experiments/table.py`` command runs."""
    return options_of_command(command).seed_list


@pytest.mark.parametrize("seeds", [[0], [4], [0, 1, 2], [1, 2], [2, 0], [7, 3, 5]])
def test_a_printed_table_command_runs_the_seeds_of_the_grid(seeds: list[int]) -> None:
    # A report prints the command that runs a missing data set or resumes unfinished cells; a
    # grid of the one seed 4 was printed as `--seeds 4`, which is a count: seeds 0 1 2 3.
    options = table_options.TableOptions(seeds=seeds, budget_minutes=5.0)
    command = table_options.table_command(options, ["caltech"], download=False)
    assert seeds_of_command(command) == seeds, command
    # the same through the last invocation's record, as --report-only takes it
    report_only = table_options.TableOptions(report_only=True)
    invocation = {"seeds": seeds, "budget_minutes": 5.0}
    command = table_options.table_command(report_only, ["caltech"], False, invocation)
    assert seeds_of_command(command) == seeds, command


# --------------------------------------------------------------------------------------------
# experiments/pyro_vae.py


@pytest.mark.parametrize(
    ("device", "message"),
    [("nope", "invalid device 'nope'"), ("cuda:7", "device 'cuda:7' asked for")],
)
def test_the_pyro_experiment_refuses_a_bad_device_on_entry(
    device: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # It ended in a RuntimeError traceback from torch.device (or from run(), for CUDA on a
    # machine without it) after parsing; now an argparse error, as for every other option.
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as exit_info:
        pyro_vae.parse_args(["--device", device, "--out", "unused"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# vaeflow.pyro: a conditioned transform kept across optimizer steps


def fit_fixed_data(cache_size: int, optimizer: str, steps: int = 3) -> list[tuple[float, float]]:
    """Fit ``q = flow_h(N(0, I))`` (one IAF, one fixed context ``h [H]``) to fixed data
    ``X [N, D]`` by maximum likelihood, ``q`` built once and ``q.log_prob(X)`` scored on the
    same tensor every step, as a density fit in Pyro is written. Returns per step the loss
    that was stepped on and the loss of the same parameters scored by a fresh transform."""
    torch.manual_seed(0)
    D, H = 2, 3
    flow = make_flow("iaf", D, H, num_steps=2, hidden_dim=8).double()
    conditional = ConditionalFlowTransform(flow, cache_size=cache_size)
    h = torch.zeros(H, dtype=torch.float64)
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [conditional.condition(h)])
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    optim_class = ClippedAdam if optimizer == "ClippedAdam" else torch.optim.Adam
    optim = optim_class(flow.parameters(), lr=1e-2)
    out = []
    for _ in range(steps):
        optim.zero_grad()
        loss = -q.log_prob(x).mean()
        loss.backward()
        with torch.no_grad():
            fresh = dist.TransformedDistribution(base, [conditional.condition(h)])
            out.append((loss.item(), -fresh.log_prob(x.clone()).mean().item()))
        optim.step()
    return out


@pytest.mark.parametrize("cache_size", [0, 1])
@pytest.mark.parametrize("optimizer", ["Adam", "ClippedAdam"])
def test_a_transform_kept_across_steps_scores_with_the_new_parameters(
    cache_size: int, optimizer: str
) -> None:
    # The transform remembered its last call until the flow's parameters' versions changed,
    # but pyro.optim.ClippedAdam updates p.data, which bumps no version: the second step
    # scored x with the first step's (freed) graph, "Trying to backward through the graph a
    # second time"; with cache_size=1 torch's own cache did so for any optimizer.
    losses = fit_fixed_data(cache_size, optimizer)
    for stepped, fresh in losses:
        assert stepped == pytest.approx(fresh, rel=1e-10)
    assert losses[-1][0] != losses[0][0]  # the steps changed the flow


def test_a_printed_table_command_keeps_the_grids_on_mismatch(tmp_path: Path) -> None:
    # A grid run with --on-mismatch keep reports its unfinished cells with "the grid's command
    # resumes them": that command had no --on-mismatch, so it stopped on the kept cells.
    options = table.options_from_args(
        ["--budget-minutes", "5", "--on-mismatch", "keep", "--runs-dir", str(tmp_path)]
    )
    command = table_options.table_command(options, ["caltech"], download=False)
    assert options_of_command(command).on_mismatch == "keep", command
    # --report-only takes it from the record of the call that ran cells
    table_grid.record_invocation(options, table_grid.Plan(), options.placement())
    report_only = table.options_from_args(["--report-only", "--runs-dir", str(tmp_path)])
    invocation = table_report.last_invocation(tmp_path)
    command = table_options.table_command(report_only, ["caltech"], False, invocation)
    assert options_of_command(command).on_mismatch == "keep", command
    default = table.options_from_args(["--budget-minutes", "5"])
    assert "--on-mismatch" not in table_options.table_command(default, ["caltech"], False)
