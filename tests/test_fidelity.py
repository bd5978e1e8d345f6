"""The per-data-set configs build the papers' models: the trainable parameter counts of the
reference code (rtqichen/ffjord's vae_lib, with the FFJORD and Sylvester papers' settings), and
the reference's behaviour where it matters for a long run."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from vaeflow.cli import main
from vaeflow.flows import FLOWS, OrthogonalSylvester
from vaeflow.nets import GatedConvDecoder, GatedConvEncoder, make_networks

# Facts from the reference code (shared/reference/README.md): data set -> flow -> parameters.
_BASE = {
    "none": 3_067_105, "planar": 3_597_553, "iaf": 3_807_777, "orthogonal": 16_093_921,
    "householder": 22_804_705, "triangular": 20_699_361,
}
_FREY = {
    "none": 2_764_480, "planar": 3_294_928, "iaf": 3_505_152, "orthogonal": 15_791_296,
    "householder": 22_502_080, "triangular": 20_396_736, "ffjord": 26_352_704,
}
REFERENCE_PARAMETERS = {
    "static_mnist": {**_BASE, "ffjord": 145_473_121},
    "omniglot": {**_BASE, "ffjord": 62_037_665},
    "freyfaces": _FREY,
    "caltech": {**_BASE, "ffjord": 25_587_617},
}
CELLS = [(d, f) for d, flows in REFERENCE_PARAMETERS.items() for f in flows]


def test_the_table_covers_every_flow() -> None:
    assert all(set(flows) == set(FLOWS) for flows in REFERENCE_PARAMETERS.values())


@pytest.mark.parametrize(("dataset", "flow"), CELLS)
def test_print_config_reports_the_reference_parameter_count(
    dataset: str, flow: str, capsys: pytest.CaptureFixture[str], tmp_path, monkeypatch
) -> None:
    # An empty data directory: --print-config must neither read nor download data.
    monkeypatch.setenv("VAEFLOW_DATA", str(tmp_path))
    assert main(["train", "--dataset", dataset, "--flow", flow, "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["num_parameters"] == REFERENCE_PARAMETERS[dataset][flow]
    assert list(tmp_path.iterdir()) == []
    if flow == "ffjord":
        assert shown["flow_kwargs"]["train_end_time"] is False  # T = 0.5 fixed, as in the paper


def test_the_papers_cells_start_their_flows_as_the_papers_code_does() -> None:
    from vaeflow.configs import resolve
    from vaeflow.flows.iaf import IAF

    for dataset in REFERENCE_PARAMETERS:  # FFJORD: the plain linear head of the reference
        assert resolve(dataset, "ffjord").flow_kwargs["lowrank_init"] == "reference"
        # IAF: vae_lib's MADE masks and step orders (experiments/lockstep.py --flow iaf)
        assert resolve(dataset, "iaf").flow_kwargs["masks"] == "reference"
    # The reference's masked layers: kaiming_normal on an [in, out] weight, zero bias, i.e.
    # std sqrt(2 / out_features); the MADE's output heads would start ~5x smaller otherwise.
    torch.manual_seed(0)
    made = IAF(64, 256, num_steps=1, hidden_dim=320).steps[0]
    for layer, out in ((made.hidden[0], 320), (made.hidden[1], 320), (made.out_m, 64)):
        assert layer.bias.abs().max() == 0
        assert layer.weight.std().item() == pytest.approx((2 / out) ** 0.5, rel=0.05)


def test_the_256_way_head_and_bounded_variance_follow_the_likelihood() -> None:
    enc, dec = make_networks("gatedconv", (1, 28, 28), likelihood="categorical256")
    assert isinstance(enc, GatedConvEncoder) and isinstance(dec, GatedConvDecoder)
    assert enc.variance_bounds == (0.01, 7.0)
    convs = [m for m in dec.body if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (32, 256, (5, 5)), (256, 256, (1, 1))
    ]
    enc_b, _ = make_networks("gatedconv", (1, 28, 28), likelihood="bernoulli")
    assert enc_b.variance_bounds is None
    # The bound holds for any input: sigma^2 in [0.01, 7].
    with torch.no_grad():
        enc.scale.bias.fill_(50.0)
        _, sigma, _ = enc(torch.rand(2, 1, 28, 28))
        assert torch.allclose(sigma, torch.full_like(sigma, 7.0**0.5))
        enc.scale.bias.fill_(-50.0)
        _, sigma, _ = enc(torch.rand(2, 1, 28, 28))
        assert torch.allclose(sigma, torch.full_like(sigma, 0.1))
    # ... and can be switched off like any paper default.
    enc_off, dec_off = make_networks(
        "gatedconv", (1, 28, 28), likelihood="categorical256", variance_bounds=None,
        head_channels=None,
    )
    assert enc_off.variance_bounds is None
    assert sum(isinstance(m, torch.nn.Conv2d) for m in dec_off.body) == 1


def test_orthogonal_flow_warns_once_and_goes_on_when_it_does_not_converge() -> None:
    torch.manual_seed(0)
    # One iteration and a tolerance float32 cannot reach: the iteration cap always ends it.
    flow = OrthogonalSylvester(6, 5, num_steps=2, num_ortho_vecs=4, ortho_tol=1e-30,
                               max_ortho_iters=3)
    z0, h = torch.randn(3, 6), torch.randn(3, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zK, logdet = flow(z0, h)
        flow(z0, h)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "max |Q^T Q - I|" in messages[0]
    assert torch.isfinite(zK).all() and torch.isfinite(logdet).all()
    # and a training step still works on that Q
    logdet.sum().backward()
    assert flow.head.linear.weight.grad is not None
