"""Every flow in the registry: shapes, log-determinant against the autograd Jacobian, gradients,
inverses, state_dict round-trip, and clear errors; the log-determinant and inverse where the
registry-wide tests leave cases out (M < D, a latent of one dimension, odd D, FFJORD's blocks
and dynamics), a flow of one's own that takes ``**options``, and the Jacobian's diagonal
blocks."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from vaeflow.flows import (
    FLOWS,
    Flow,
    Planar,
    Sequential,
    check_flow,
    flow_hyperparameters,
    jacobian_logdet,
    make_flow,
    register_flow,
)

DIM, CONTEXT = 4, 3
# Tight tolerances so the solver error stays far below the comparison tolerance.
SMALL = {"ffjord": dict(hidden_dims=(16, 16), rank=2, num_blocks=2, atol=1e-8, rtol=1e-8)}


def build(name: str, default: bool = False, **kw: object) -> Flow:
    torch.manual_seed(0)
    hyper = {} if default else {**SMALL.get(name, {}), **kw}
    return FLOWS[name](dim=DIM, context_dim=CONTEXT, **hyper).double()


def inputs(batch: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(batch, DIM, generator=g, dtype=torch.float64)
    h = torch.randn(batch, CONTEXT, generator=g, dtype=torch.float64)
    return z0, h


def test_registry_names() -> None:
    assert list(FLOWS) == [
        "none", "planar", "iaf", "orthogonal", "householder", "triangular", "ffjord"
    ]


@pytest.mark.parametrize("name", list(FLOWS))
@pytest.mark.parametrize("batch", [1, 5])
def test_shapes(name: str, batch: int) -> None:
    flow = build(name)
    z0, h = inputs(batch)
    zK, logdet = flow(z0, h)
    assert zK.shape == (batch, DIM) and logdet.shape == (batch,)
    assert torch.isfinite(zK).all() and torch.isfinite(logdet).all()


@pytest.mark.parametrize("name", list(FLOWS))
def test_logdet_matches_autograd_jacobian(name: str) -> None:
    flow = build(name).eval()  # eval: FFJORD computes the exact trace
    z0, h = inputs()
    zK, logdet = flow(z0, h)
    expected = jacobian_logdet(flow, z0, h)
    torch.testing.assert_close(logdet, expected, rtol=1e-6, atol=1e-7)
    if name != "none":
        assert expected.abs().max() > 1e-3, "a flow that does nothing tests nothing"


@pytest.mark.parametrize("name", list(FLOWS))
def test_default_hyperparameters_logdet(name: str) -> None:
    """The defaults themselves (FFJORD at atol = rtol = 1e-5) agree with the Jacobian."""
    flow = build(name, default=True).eval()
    z0, h = inputs()
    _, logdet = flow(z0, h)
    torch.testing.assert_close(logdet, jacobian_logdet(flow, z0, h), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", list(FLOWS))
def test_gradients_reach_every_parameter_and_context(name: str) -> None:
    flow = build(name).train()
    z0, h = inputs()
    h.requires_grad_(True)
    z0.requires_grad_(True)
    zK, logdet = flow(z0, h)
    weights = torch.linspace(-1.0, 1.0, DIM, dtype=torch.float64)
    ((zK * weights).sum() + (zK**2).sum() + logdet.sum()).backward()
    assert z0.grad is not None and z0.grad.abs().sum() > 0
    if name == "none":
        assert h.grad is None or h.grad.abs().sum() == 0
        return
    assert h.grad is not None and h.grad.abs().sum() > 0
    for pname, p in flow.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert p.grad.abs().sum() > 0, f"{pname} got a zero gradient"


@pytest.mark.parametrize("name", list(FLOWS))
def test_state_dict_round_trip(name: str) -> None:
    flow = build(name).eval()
    z0, h = inputs()
    zK, logdet = flow(z0, h)
    torch.manual_seed(123)  # a different initialization
    other = FLOWS[name](dim=DIM, context_dim=CONTEXT, **SMALL.get(name, {})).double().eval()
    other.load_state_dict(flow.state_dict())
    zK2, logdet2 = other(z0, h)
    torch.testing.assert_close(zK2, zK, rtol=0, atol=0)
    torch.testing.assert_close(logdet2, logdet, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in FLOWS if FLOWS[n].has_inverse])
def test_inverse(name: str) -> None:
    flow = build(name).eval()
    z0, h = inputs()
    zK, logdet = flow(z0, h)
    z0_back, logdet_back = flow.inverse(zK, h)
    torch.testing.assert_close(z0_back, z0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logdet_back, logdet, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in FLOWS if not FLOWS[n].has_inverse])
def test_no_inverse_raises(name: str) -> None:
    flow = build(name)
    z0, h = inputs()
    with pytest.raises(NotImplementedError, match="no inverse"):
        flow.inverse(z0, h)


@pytest.mark.parametrize("name", list(FLOWS))
def test_wrong_shapes_are_refused(name: str) -> None:
    flow = build(name)
    z0, h = inputs()
    with pytest.raises(ValueError, match=r"expects z of shape \[B, 4\]"):
        flow(z0[:, :3], h)
    with pytest.raises(ValueError, match="context h"):
        flow(z0, h[:, :2])
    with pytest.raises(ValueError, match="context h"):
        flow(z0, h[:3])


def test_sequential_composes() -> None:
    a, b = build("planar", num_steps=2), build("iaf", num_steps=2)
    seq = Sequential(a, b).eval()
    z0, h = inputs()
    z1, l1 = a(z0, h)
    z2, l2 = b(z1, h)
    zK, logdet = seq(z0, h)
    torch.testing.assert_close(zK, z2)
    torch.testing.assert_close(logdet, l1 + l2)
    assert not seq.has_inverse
    torch.testing.assert_close(logdet, jacobian_logdet(seq, z0, h))


def test_make_flow_errors_name_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="valid flows are none, planar, iaf"):
        make_flow("realnvp", 4, 3)
    with pytest.raises(ValueError, match="valid ones are num_steps"):
        make_flow("planar", 4, 3, steps=3)
    flow = make_flow("planar", 4, 3, num_steps=3)
    assert flow.num_steps == 3
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        make_flow("planar", 4, 3, num_steps=0)


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


def test_planar_steps_stay_invertible() -> None:
    """The u-reparametrization keeps 1 + psi^T u_hat > 0 even for adversarial heads."""
    flow = build("planar")
    with torch.no_grad():
        flow.head.linear.weight.mul_(50.0)
        flow.head.linear.bias.mul_(50.0)
    z0, h = inputs(64)
    _, logdet = flow(z0, h)
    assert torch.isfinite(logdet).all()


def test_orthogonal_sylvester_q_is_orthonormal() -> None:
    flow = build("orthogonal")
    _, h = inputs()
    q = flow._q(flow.head(h))  # [B, K, D, M]
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    torch.testing.assert_close(q.transpose(-1, -2) @ q, eye.expand_as(q.transpose(-1, -2) @ q))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("iters", [100, 23])  # 23: the last test falls between the fives
def test_orthogonal_check_on_the_device_is_the_host_check_bit_for_bit(dtype, iters) -> None:
    def run(check: str) -> tuple[torch.Tensor, ...]:
        flow = build("orthogonal", ortho_check=check, max_ortho_iters=iters).to(dtype)
        z0, h = (t.to(dtype) for t in inputs(6))
        zK, logdet = flow(z0.requires_grad_(True), h)
        (zK.square().sum() + logdet.sum()).backward()
        return zK, logdet, z0.grad, *(p.grad for p in flow.parameters())

    host, device = run("host"), run("device")
    assert all(torch.equal(a, b) for a, b in zip(host, device, strict=True))
    flow = build("orthogonal", ortho_check="device", max_ortho_iters=iters)
    z0, h = inputs()
    torch.testing.assert_close(flow(z0, h)[1], jacobian_logdet(flow, z0, h), rtol=1e-6, atol=1e-7)


def test_orthogonal_check_on_the_device_needs_no_host_read_in_a_graph(monkeypatch) -> None:
    from vaeflow.flows import sylvester

    def step(check: str) -> None:  # on the meta device any host read raises
        flow = build("orthogonal", ortho_check=check).to("meta")
        z0, h = (t.to("meta") for t in inputs())
        zK, logdet = flow(z0, h)
        (zK.sum() + logdet.sum()).backward()

    monkeypatch.setattr(sylvester, "_capturing", lambda t: True)  # as inside a capture
    step("device")
    with pytest.raises(RuntimeError, match="meta"):
        step("host")
    monkeypatch.setattr(sylvester, "_capturing", lambda t: False)  # eager: reads, to warn
    with pytest.raises(RuntimeError, match="meta"):
        step("device")


def test_a_graphs_unconverged_orthogonalization_is_reported_after_the_replays(
    monkeypatch,
) -> None:
    """Inside a capture nothing can be read, so the worst final residual is kept on the device
    and ``check_replays`` (the trainer calls it where it reads the losses) warns as an eager
    call would; a converged one says nothing, and a non-finite one is refused."""
    from vaeflow.flows import sylvester

    monkeypatch.setattr(sylvester, "_capturing", lambda t: True)  # as inside a capture
    flow = build("orthogonal", ortho_check="device", ortho_tol=1e-30, max_ortho_iters=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the "replays" themselves warn of nothing
        flow(*inputs())
    assert flow.replay_residual > 1e-6
    with pytest.warns(RuntimeWarning, match="stopped after 3 iterations"):
        flow.check_replays()
    assert flow.replay_residual == 0  # recording afresh

    converged = build("orthogonal", ortho_check="device", max_ortho_iters=30)
    converged(*inputs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converged.check_replays()
        build("orthogonal").check_replays()  # the host test: nothing recorded, nothing read
    converged.replay_residual.fill_(math.nan)
    with pytest.raises(FloatingPointError, match="non-finite"):
        converged.check_replays()
    assert "replay_residual" not in converged.state_dict()  # a diagnostic, not the model


def test_orthogonal_check_on_the_device_warns_when_it_does_not_converge() -> None:
    flow = build("orthogonal", ortho_check="device", ortho_tol=1e-30, max_ortho_iters=3)
    with pytest.warns(RuntimeWarning, match="stopped after 3 iterations"):
        flow(*inputs())
    with pytest.raises(ValueError, match="ortho_check.*'host', 'device'"):
        build("orthogonal", ortho_check="gpu")


def test_householder_q_is_orthogonal() -> None:
    flow = build("householder")
    _, h = inputs()
    q = flow._q(flow.head(h))
    eye = torch.eye(DIM, dtype=q.dtype)
    torch.testing.assert_close(q.transpose(-1, -2) @ q, eye.expand_as(q))


@pytest.mark.parametrize("masks", ["cycled", "reference"])
def test_iaf_masks_keep_each_step_autoregressive(masks: str) -> None:
    # Six steps so that both order patterns show (cycled: n r n r n r; reference: n r r n n r).
    flow = FLOWS["iaf"](dim=DIM, context_dim=CONTEXT, num_steps=6, hidden_dim=8, masks=masks)
    flow = flow.double().eval()
    pattern = [flow.reversed_step(k) for k in range(6)]
    assert pattern == ([False, True] * 3 if masks == "cycled"
                       else [False, True, True, False, False, True])  # fmt: skip
    z0, h = inputs()
    c = flow.context(h[:1])
    for k, made in enumerate(flow.steps):
        jac = torch.autograd.functional.jacobian(lambda z, m=made: torch.cat(m(z, c), -1), z0[:1])
        jac = jac.reshape(2, DIM, DIM)  # (m, s) x output i x input j
        order = torch.arange(DIM).flip(0) if pattern[k] else torch.arange(DIM)
        jac = jac[:, order][:, :, order]  # in the step's own order
        assert torch.equal(jac.triu(), torch.zeros_like(jac)), f"step {k} sees its own future"
        assert jac.tril(-1).abs().amax() > 0, f"step {k} ignores its past"
    _, logdet = flow(z0, h)
    torch.testing.assert_close(logdet, jacobian_logdet(flow, z0, h), rtol=1e-6, atol=1e-7)
    z_back, _ = flow.inverse(flow(z0, h)[0], h)
    torch.testing.assert_close(z_back, z0, rtol=1e-6, atol=1e-7)


def test_iaf_inverse_is_exact_where_the_map_is_well_conditioned() -> None:
    """At the papers' initialisation some rows contract by e^-40; their inverse cannot be
    exact, but it must not spoil the others. (The inverse had iterated every coordinate from
    the start: an overflowing one times a masked weight's 0 was NaN in coordinates already
    found, on 44 of these 720 well-conditioned rows.)"""
    torch.manual_seed(0)
    flow = FLOWS["iaf"](dim=DIM, context_dim=CONTEXT).double().eval()
    z0, h = inputs(1000)
    z0.requires_grad_(True)
    zK, _ = flow(z0, h)
    # rows map on their own: D backward passes give every row's Jacobian [B, D, D]
    jac = torch.stack([torch.autograd.grad(zK[:, j].sum(), z0, retain_graph=True)[0]
                       for j in range(DIM)], 1)
    good = torch.linalg.cond(jac) <= 1e8
    assert good.sum() >= 500
    with torch.no_grad():
        back, _ = flow.inverse(zK, h)
    torch.testing.assert_close(back[good], z0.detach()[good], rtol=1e-5, atol=1e-5)


def test_iaf_parameters_load_only_into_an_iaf_with_their_masks() -> None:
    # The masks are saved but the degrees that the inverse reads are not: parameters trained
    # with masks="reference" loaded into a "cycled" IAF ran the forward of one and the inverse
    # of the other (inverse error ~1, with no complaint from load_state_dict).
    made = {m: FLOWS["iaf"](dim=3, context_dim=CONTEXT, num_steps=4, hidden_dim=6, masks=m)
            for m in ("reference", "cycled")}
    with pytest.raises(RuntimeError, match="mask differs.*masks= option"):
        made["cycled"].load_state_dict(made["reference"].state_dict())
    again = FLOWS["iaf"](dim=3, context_dim=CONTEXT, num_steps=4, hidden_dim=6, masks="reference")
    again.load_state_dict(made["reference"].state_dict())  # its own masks load
    z, h = torch.randn(5, 3), torch.randn(5, CONTEXT)
    assert torch.equal(again(z, h)[0], made["reference"](z, h)[0])


def test_iaf_reference_masks_are_the_papers_codes() -> None:
    # vae_lib's MaskedLinear for D = 2, W = 4: hidden units in blocks of W / D = 2 (degrees
    # 1 1 2 2), the input layer by degree, hidden-to-hidden by unit index, the heads strictly
    # below each output's degree (the last block feeds no output).
    made = FLOWS["iaf"](dim=2, context_dim=3, num_steps=1, hidden_dim=4, masks="reference").steps[0]
    first, second = (layer.mask for layer in made.hidden)
    assert first.tolist() == [[1, 0], [1, 0], [1, 1], [1, 1]]
    assert torch.equal(second, torch.tril(torch.ones(4, 4)))
    assert made.out_m.mask.tolist() == [[0, 0, 0, 0], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match=r"multiple of dim.*masks='cycled' takes any width"):
        FLOWS["iaf"](dim=3, context_dim=3, hidden_dim=8, masks="reference")
    with pytest.raises(ValueError, match="valid values are 'cycled', 'reference'"):
        FLOWS["iaf"](dim=2, context_dim=3, masks="made")


# What the tests above (every flow at D = 4, the orthogonal flow's 32 vectors clipped to M = D)
# leave out: M < D, where log|det| = sum log|1 + ...| needs Q^T Q = I_M and no longer follows
# from a square Q; a latent of one dimension; odd D under the triangular flow's reversal; one
# reflection; FFJORD with several blocks of learned end time, concat dynamics, or the fused
# field in training. (The IAF at D = 1 is left out: the papers' MADE gives its only output
# no input, z's or h's, so it ignores the context, as check_flow says.)
UNCOVERED = [
    ("orthogonal", 6, dict(num_steps=3, num_ortho_vecs=3)),
    ("orthogonal", 6, dict(num_steps=2, num_ortho_vecs=2, ortho_check="device",
                           max_ortho_iters=40)),
    ("householder", 5, dict(num_steps=3, num_householder=1)),
    ("triangular", 5, dict(num_steps=3)),
    ("planar", 1, dict(num_steps=3)),
    ("orthogonal", 1, dict(num_steps=3)),
    ("householder", 1, dict(num_steps=3, num_householder=2)),
    ("triangular", 1, dict(num_steps=3)),
    ("ffjord", 1, dict(hidden_dims=(8,), rank=2)),
    ("ffjord", 3, dict(hidden_dims=(8,), dynamics="concat", num_blocks=2, train_end_time=True)),
    ("ffjord", 3, dict(hidden_dims=(8, 8), rank=2, fused=True, regularize=True)),
]


@pytest.mark.parametrize(("name", "dim", "options"), UNCOVERED,
                         ids=[f"{n}-D{d}-{i}" for i, (n, d, _) in enumerate(UNCOVERED)])
def test_logdet_and_inverse_in_cases_the_flow_tests_leave_out(name, dim, options) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # also: the inverse is checked on the seed's rows
        check_flow(FLOWS[name](dim, 3, **options), perturb=0.3)


def test_diagonal_blocks_index_on_the_jacobian_s_device() -> None:
    # The row index was made on the default device: inside `with torch.device("meta")` (or
    # "cuda") it did not index a CPU Jacobian.
    from vaeflow.flows.jacobian import diagonal_blocks

    jac = torch.arange(2 * 3 * 2 * 3, dtype=torch.float64).reshape(2, 3, 2, 3)
    expected = torch.stack([jac[0, :, 0, :], jac[1, :, 1, :]])
    with torch.device("meta"):
        blocks = diagonal_blocks(jac)
    assert torch.equal(blocks, expected)


def test_readme_flow_is_registered_checked_and_trains(tiny_data_dir, tmp_path) -> None:
    from conftest import run_readme
    from test_train import tiny_config

    from vaeflow.cli import main
    from vaeflow.runs import load_model
    from vaeflow.train import train

    saved = dict(FLOWS)
    try:
        namespace = run_readme("Adding a flow")
        assert FLOWS["radial"] is namespace["Radial"]
        config = dataclasses.replace(
            tiny_config(tiny_data_dir, "planar", max_epochs=1, is_samples=0),
            flow="radial", flow_kwargs={"num_steps": 2},
        )  # fmt: skip
        results = train(config, tmp_path / "run", progress=False)
        assert results["flow"] == "radial" and math.isfinite(results["test_nelbo"])
        model, _ = load_model(tmp_path / "run")
        assert type(model.flow).__name__ == "Radial" and model.flow.num_steps == 2
        assert not model.training and not model.flow.training  # loaded to measure: eval mode
        assert main(["flows"]) == 0  # lists it with its hyperparameters
        with pytest.raises(ValueError, match="'radial' is taken"):
            register_flow("radial", Planar)
    finally:
        FLOWS.clear()
        FLOWS.update(saved)
    with pytest.raises(ValueError, match="letters, digits"):
        register_flow("my flow", Planar)
    with pytest.raises(TypeError, match="subclass of vaeflow.flows.Flow"):
        register_flow("mine", torch.nn.Linear)
    assert "mine" not in FLOWS
