"""What the CUDA-graph capture relies on that a CPU can check: the warm-up's changes are put
back in place, and the optimizer's state exists (as its fresh value) before the capture."""

from __future__ import annotations

import copy

import pytest
import torch

from vaeflow.graphs import _Snapshot


def _model_and_optimizer(cls: type[torch.optim.Optimizer] = torch.optim.Adamax,
                         **kwargs: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    return model, cls(model.parameters(), lr=0.1, **kwargs)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    optimizer.step()


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values()
            if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("cls", [torch.optim.Adamax, torch.optim.Adam])
@pytest.mark.parametrize("stepped", [0, 2], ids=["fresh", "stepped"])
def test_snapshot_restores_in_place_and_keeps_the_state(cls: type[torch.optim.Optimizer],
                                                        stepped: int) -> None:
    model, optimizer = _model_and_optimizer(cls)
    for i in range(stepped):
        _step(model, optimizer, 100 + i)
    twin_model = copy.deepcopy(model)
    twin_optimizer = cls(twin_model.parameters(), lr=0.1)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # no shared state

    snapshot = _Snapshot(model, optimizer)
    for i in range(3):  # the warm-up: it moves everything
        _step(model, optimizer, i)
    addresses = [v.data_ptr() for v in _state_tensors(optimizer)]
    params = [p.data_ptr() for p in model.state_dict().values()]
    snapshot.restore()

    # In place: the capture will see these very tensors; none is missing.
    assert [v.data_ptr() for v in _state_tensors(optimizer)] == addresses
    assert [p.data_ptr() for p in model.state_dict().values()] == params
    assert len(optimizer.state) == len(list(model.parameters()))
    for (name, a), b in zip(model.state_dict().items(), twin_model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    if not stepped:
        assert all(not v.any() for v in _state_tensors(optimizer))  # the fresh state: zeros

    # The next steps are those the untouched twin takes.
    for i in range(2):
        _step(model, optimizer, 50 + i)
        _step(twin_model, twin_optimizer, 50 + i)
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_snapshot_refuses_an_optimizer_whose_fresh_state_is_not_zeros() -> None:
    model, optimizer = _model_and_optimizer(torch.optim.NAdam)
    snapshot = _Snapshot(model, optimizer)
    _step(model, optimizer, 0)
    with pytest.raises(TypeError, match="fresh state is zeros.*NAdam"):
        snapshot.restore()


def test_each_flow_says_whether_its_step_can_be_captured() -> None:
    from vaeflow.flows import FFJORD, make_flow
    from vaeflow.graphs import graph_unavailable

    cuda = torch.device("cuda")  # only named: nothing runs on it
    for name in ("none", "planar", "iaf", "householder", "triangular"):
        assert graph_unavailable(make_flow(name, 4, 3), cuda) is None, name
    assert "orthogonal Sylvester" in (graph_unavailable(make_flow("orthogonal", 4, 3), cuda) or "")
    assert graph_unavailable(make_flow("orthogonal", 4, 3, ortho_check="device"), cuda) is None
    fixed = dict(method="rk4", solver_options={"step_size": 0.25})
    assert graph_unavailable(FFJORD(3, 2, hidden_dims=(4,), rank=1, **fixed), cuda) is None
    adjoint = FFJORD(3, 2, hidden_dims=(4,), rank=1, adjoint=True, **fixed)
    assert "with the adjoint" in (graph_unavailable(adjoint, cuda) or "")


def test_a_failed_capture_leaves_the_model_ready_for_eager_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vaeflow import graphs

    model, optimizer = _model_and_optimizer()
    _step(model, optimizer, 0)
    before = copy.deepcopy(model.state_dict())

    def capture_fails(*args: object) -> None:
        for p in model.parameters():  # a capture runs nothing, but leaves gradients
            p.grad = torch.ones_like(p)
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(graphs, "GraphedStep", capture_fails)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    graphed, why = graphs.capture(lambda x, b: {}, model, optimizer, torch.zeros(8, 4))
    assert graphed is None and why == "operation not permitted when stream is capturing"
    assert all(p.grad is None for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name

    def broken(device: object = None) -> None:
        raise RuntimeError("an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    with pytest.raises(RuntimeError, match="left the device unusable.*cuda_graph=false"):
        graphs.capture(lambda x, b: {}, model, optimizer, torch.zeros(8, 4))


def test_a_failed_capture_names_the_error_inside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU an error inside torch.cuda.graph is raised again by its capture_end, as
    # "operation failed due to a previous error during capture": the first is the reason.
    from vaeflow import graphs

    model, optimizer = _model_and_optimizer()

    def capture_fails(*args: object) -> None:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during "
                               "capture\nCUDA kernel errors might be asynchronously reported")

    monkeypatch.setattr(graphs, "GraphedStep", capture_fails)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    graphed, why = graphs.capture(lambda x, b: {}, model, optimizer, torch.zeros(8, 4))
    assert graphed is None
    assert why == ("CUDA error: operation not permitted when stream is capturing (then: CUDA "
                   "error: operation failed due to a previous error during capture)")


def test_a_failed_warm_up_puts_the_weights_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # The warm-up steps move the weights; one that raises (out of memory, say) sends the run
    # on eagerly, which must go on from the run's own weights and optimizer state.
    import contextlib

    from vaeflow import graphs

    class Stream:
        def wait_stream(self, other: object) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    model, optimizer = _model_and_optimizer()
    _step(model, optimizer, 0)
    before = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict()["state"])
    calls = []

    def step(x: torch.Tensor, beta: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        _step(model, optimizer, len(calls))
        return {}

    graphed, why = graphs.capture(step, model, optimizer, torch.zeros(8, 4))
    assert graphed is None and why.startswith("CUDA out of memory") and len(calls) == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for p, s in optimizer.state_dict()["state"].items():
        for key, value in s.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state[p][key])), key


def test_a_failed_capture_leaves_the_random_stream_where_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The eager steps after a failed capture draw the noise an uncaptured step would: a resume
    # captures (and fails) again at its first batch, so a draw taken by the failure would put
    # the resumed run's noise one draw off the uninterrupted run's. (On a CPU tensor the check
    # draws from the CPU's generator, as on a GPU from the device's.)
    from vaeflow import graphs

    model, optimizer = _model_and_optimizer()

    def capture_fails(*args: object) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "GraphedStep", capture_fails)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    graphed, _ = graphs.capture(lambda x, b: {}, model, optimizer, torch.zeros(8, 4))
    assert graphed is None
    assert torch.equal(torch.rand(4), expected)


def test_a_failed_warm_up_waits_for_the_side_stream_before_the_restore(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On a GPU the warm-up's kernels run on a side stream, after the host has queued them: a
    # step that raises on the host (out of memory) leaves the earlier steps' parameter updates
    # queued there, and a restore on the main stream that does not wait for them races them.
    import contextlib

    from vaeflow import graphs

    events: list[str] = []

    class Stream:
        def __init__(self, name: str = "side") -> None:
            self.name = name

        def wait_stream(self, other: Stream) -> None:
            events.append(f"{self.name} waits for {other.name}")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream("main"))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    restore = graphs._Snapshot.restore
    monkeypatch.setattr(graphs._Snapshot, "restore",
                        lambda self: (events.append("restore"), restore(self))[-1])
    model, optimizer = _model_and_optimizer()

    def step(x: torch.Tensor, beta: torch.Tensor) -> dict[str, torch.Tensor]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    graphed, _ = graphs.capture(step, model, optimizer, torch.zeros(8, 4))
    assert graphed is None
    assert events[-2:] == ["main waits for side", "restore"], events
