"""Review of the Pyro integration and the comparison table: the bugs found, one test each.

Fast and CPU-only: no grid is trained here, the table's commands are read back by its own
parser, and the Pyro checks use tiny flows on tensors made here.
"""

from __future__ import annotations

import shlex

import pyro_vae
import pytest
import table
import table_options
import torch


def seeds_of_command(command: str) -> list[int]:
    """The seeds that a printed ``experiments/table.py`` command runs, read by the table's own
    parser."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "experiments/table.py"], command
    return table.options_from_args(argv[2:]).seed_list


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
