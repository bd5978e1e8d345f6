"""The FFJORD paper's code's VAEs (``../shared/reference``, ``vae_lib``) built with the papers'
settings, and their weights under the names of vaeflow's models of the same cells, so that the
two codes can start from the same numbers (``experiments/lockstep.py``).

The mappings say where each code lays out the same parameters differently: the gated layers'
two convolutions (one in vaeflow), the flows' separate amortization layers (one head in
vaeflow, its rows in another order), the IAF's ``[in, out]`` masked weights and the steps
that see ``z`` reversed, and FFJORD's ``[t, x]`` inputs and ``U, V, c`` head.
"""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

LATENT = 64  # the papers' latent size


def _import_reference(reference: Path) -> None:
    sys.dont_write_bytecode = True  # the shared copy is read-only
    if str(reference / "ffjord") not in sys.path:
        sys.path.insert(0, str(reference / "ffjord"))


# vaeflow's flow name -> the reference's VAE class (vae_lib.models.VAE).
REFERENCE_CLASSES = {
    "none": "VAE", "planar": "PlanarVAE", "iaf": "IAFVAE", "orthogonal": "OrthogonalSylvesterVAE",
    "householder": "HouseholderSylvesterVAE", "triangular": "TriangularSylvesterVAE",
}  # fmt: skip


def _reference_args(**flow_args: Any) -> types.SimpleNamespace:
    """The reference's ``args`` of a static-MNIST model on the CPU, with ``flow_args``."""
    return types.SimpleNamespace(z_size=LATENT, input_size=[1, 28, 28], input_type="binary",
                                 cuda=False, **flow_args)  # fmt: skip


def reference_vae(
    reference: Path, flow: str = "none", kwargs: dict[str, Any] | None = None
) -> torch.nn.Module:
    """The reference's static-MNIST VAE with a baseline ``flow`` (vaeflow's name; its
    hyperparameters ``kwargs`` are vaeflow's ``flow_kwargs``)."""
    _import_reference(reference)
    from vae_lib.models import VAE as models

    kw = kwargs or {}
    args = _reference_args(
        num_flows=kw.get("num_steps", 1), num_ortho_vecs=kw.get("num_ortho_vecs", LATENT),
        num_householder=kw.get("num_householder", 1), made_h_size=kw.get("hidden_dim", 320),
    )  # fmt: skip
    return getattr(models, REFERENCE_CLASSES[flow])(args)


def baseline_pair(
    reference: Path, data_dir: Path, flow: str, seed: int = 0, copy: bool = True
) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """The reference's VAE with a baseline ``flow`` and vaeflow's model of the same
    static-MNIST cell (its config returned too), with the reference's weights (unless not
    ``copy``: then each with its own initialisation)."""
    from vaeflow.configs import resolve
    from vaeflow.model import build_model

    torch.manual_seed(seed)
    config = resolve("static_mnist", flow, {"data_dir": str(data_dir)})
    ref = reference_vae(reference, flow, config.flow_kwargs)
    ours = build_model(config)
    if copy:
        ours.load_state_dict(flow_weights(flow, ref, ours))
    return ref, ours, config


def vaeflow_weights(ref: torch.nn.Module) -> dict[str, Tensor]:
    """The reference VAE's weights under vaeflow's names: each gated layer's ``h`` and ``g``
    convolutions concatenated along the output channels (dim 0 of a ``Conv2d`` weight, dim 1
    of a ``ConvTranspose2d`` one)."""
    out: dict[str, Tensor] = {}
    for i, (enc, dec) in enumerate(zip(ref.q_z_nn, ref.p_x_nn, strict=True)):
        out[f"encoder.body.{i}.conv.weight"] = torch.cat([enc.h.weight, enc.g.weight], 0)
        out[f"encoder.body.{i}.conv.bias"] = torch.cat([enc.h.bias, enc.g.bias], 0)
        out[f"decoder.body.{i + 1}.conv.weight"] = torch.cat([dec.h.weight, dec.g.weight], 1)
        out[f"decoder.body.{i + 1}.conv.bias"] = torch.cat([dec.h.bias, dec.g.bias], 0)
    heads = {"encoder.mean": ref.q_z_mean, "encoder.scale": ref.q_z_var[0],
             "decoder.body.7": ref.p_x_mean[0]}  # fmt: skip
    for name, layer in heads.items():
        out[f"{name}.weight"], out[f"{name}.bias"] = layer.weight, layer.bias
    return {k: v.detach().clone() for k, v in out.items()}


def _shared_weights(ref: torch.nn.Module, ours: torch.nn.Module) -> dict[str, Any]:
    """``ours``'s state (its buffers kept) with the reference's shared VAE weights."""
    return {**ours.state_dict(), **vaeflow_weights(ref)}


def _rows(*layout: int, order: Sequence[int]) -> Tensor:
    """For each output of vaeflow's head, in order, the row of the reference's head that
    holds it: the reference lays a sample's output out as the shape ``layout``, vaeflow as
    that shape's axes permuted by ``order``."""
    return torch.arange(math.prod(layout)).view(*layout).permute(*order).reshape(-1)


def flow_weights(flow: str, ref: torch.nn.Module, ours: torch.nn.Module) -> dict[str, Tensor]:
    """The weights of the reference VAE ``ref`` with a baseline ``flow`` under the names of
    vaeflow's ``ours``: the shared VAE's (:func:`vaeflow_weights`) and the flow's amortization
    heads, whose separate ``amor_*`` layers become the rows of vaeflow's one ``ContextHead`` in
    its order. The Sylvester heads put the step index last (``[M, M, K]``; vaeflow's ``[K, M,
    M]``), and the Householder product runs the other way (``H_L ... H_1``; vaeflow's ``H_1 ...
    H_L``), so vaeflow's reflections are the reference's in reverse order. FFJORD's
    (``cnf_rank``): :func:`ffjord_weights`."""
    if flow == "ffjord":
        return ffjord_weights(ref, ours)
    out = _shared_weights(ref, ours)
    if flow == "none":
        return out
    f = ours.flow
    if flow == "planar":
        layers = {"u": ref.amor_u, "w": ref.amor_w, "b": ref.amor_b}
        rows = {name: None for name in layers}
    elif flow in ("orthogonal", "householder", "triangular"):
        k, m, d = f.num_steps, f.num_vectors, f.dim
        layers = {"full": ref.amor_d, "diag1": ref.amor_diag1[0], "diag2": ref.amor_diag2[0],
                  "b": ref.amor_b}  # fmt: skip
        rows = {"full": _rows(m, m, k, order=(2, 0, 1)), "diag1": _rows(m, k, order=(1, 0)),
                "diag2": _rows(m, k, order=(1, 0)), "b": _rows(m, k, order=(1, 0))}  # fmt: skip
        if flow == "orthogonal":
            layers["q"], rows["q"] = ref.amor_q, None  # both [K, D, M]
        if flow == "householder":  # both [K, L, D], the reflections in reverse order
            v = torch.arange(k * f.num_householder * d).view(k, f.num_householder, d)
            layers["v"], rows["v"] = ref.amor_q, v.flip(1).reshape(-1)
    elif flow == "iaf":
        context = {"flow.context.weight": ref.h_context.weight,
                   "flow.context.bias": ref.h_context.bias}  # fmt: skip
        return {**out, **_iaf_weights(ref.flow, f),
                **{k: v.detach().clone() for k, v in context.items()}}  # fmt: skip
    else:
        raise ValueError(f"no weight mapping for flow {flow!r}")
    weights, biases = [], []
    for name in f.head.shapes:
        layer, order = layers[name], rows[name]
        weights.append(layer.weight if order is None else layer.weight[order])
        biases.append(layer.bias if order is None else layer.bias[order])
    out["flow.head.linear.weight"] = torch.cat(weights).detach().clone()
    out["flow.head.linear.bias"] = torch.cat(biases).detach().clone()
    return out


def _iaf_weights(ref: torch.nn.Module, ours: torch.nn.Module) -> dict[str, Tensor]:
    """The reference IAF's MADEs (``MaskedLinear`` weights ``[in, out]``) as vaeflow's
    ``masks = "reference"`` MADEs (``[out, in]``). Where the reference's step sees ``z``
    reversed, vaeflow's step reverses its degrees instead, so that step's ``z`` columns and
    output rows are the reference's flipped."""
    if getattr(ours, "masks", None) != "reference":
        raise ValueError("the reference's IAF is vaeflow's IAF with masks='reference'")
    if (ours.num_steps // 2) % 2:
        raise ValueError("an odd number of flips leaves the reference's zK reversed for the "
                         "decoder; the lockstep maps only an even number (num_steps 4k, 4k+1)")
    out = {}
    for k, ((z_feats, zh_feats, mean, gate), made) in enumerate(zip(ref.flows, ours.steps,
                                                                   strict=True)):  # fmt: skip
        flip = ours.reversed_step(k)
        first = z_feats[0].weight.T  # [W, D]
        out[f"flow.steps.{k}.hidden.0.weight"] = first.flip(1) if flip else first
        out[f"flow.steps.{k}.hidden.0.bias"] = z_feats[0].bias
        for i in range(1, len(made.hidden)):
            out[f"flow.steps.{k}.hidden.{i}.weight"] = zh_feats[2 * (i - 1)].weight.T
            out[f"flow.steps.{k}.hidden.{i}.bias"] = zh_feats[2 * (i - 1)].bias
        for name, layer in (("out_m", mean), ("out_s", gate)):
            weight, bias = layer.weight.T, layer.bias  # [D, W], [D]
            out[f"flow.steps.{k}.{name}.weight"] = weight.flip(0) if flip else weight
            out[f"flow.steps.{k}.{name}.bias"] = bias.flip(0) if flip else bias
    return {key: v.detach().clone() for key, v in out.items()}


def ffjord_weights(ref: torch.nn.Module, ours: torch.nn.Module) -> dict[str, Any]:
    """The reference cnf_rank VAE's weights under the names of vaeflow's ``ours``: per block,
    the shared ``ConcatLinear`` layers (input ``[t, x]``; vaeflow's is ``[x, t]``) and the
    amortization head, whose rows per layer are ``[u (in x r), v (r x out), bias (out)]`` with
    the update ``x u v``; vaeflow's head holds ``u{l} [out, r]``, ``v{l} [in, r]``, ``c{l}``
    with the update ``u (v^T x)``, so its ``v`` is the reference's ``u`` and its ``u`` the
    reference's ``v`` transposed."""
    rank = ours.flow.config["rank"]
    out = _shared_weights(ref, ours)
    for b, (func, head_ref) in enumerate(zip(ref.odefuncs, ref.q_am, strict=True)):
        rows: dict[str, Tensor] = {}
        offset = 0
        for i, layer in enumerate(func.diffeq.layers):
            weight = layer._layer.weight  # [out, 1 + in], the time column first
            out[f"flow.blocks.{b}.layers.{i}.weight"] = torch.cat([weight[:, 1:], weight[:, :1]], 1)
            out[f"flow.blocks.{b}.layers.{i}.bias"] = layer._layer.bias
            d_out, d_in = weight.shape[0], weight.shape[1] - 1
            u, v = offset, offset + d_in * rank
            rows[f"v{i}"] = torch.arange(u, v)
            rows[f"u{i}"] = torch.arange(d_out * rank).view(rank, d_out).T.reshape(-1) + v
            rows[f"c{i}"] = torch.arange(d_out) + v + d_out * rank
            offset = v + d_out * rank + d_out
        order = torch.cat([rows[name] for name in ours.flow.blocks[b].head.shapes])
        out[f"flow.blocks.{b}.head.linear.weight"] = head_ref.weight[order]
        out[f"flow.blocks.{b}.head.linear.bias"] = head_ref.bias[order]
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in out.items()}


def ffjord_pair(
    reference: Path, data_dir: Path, dims: Sequence[int], rank: int, blocks: int,
    tol: float = 1e-7, seed: int = 0, exact: bool = True, copy: bool = True,
) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """The reference's ``cnf_rank`` VAE and vaeflow's FFJORD VAE (``lowrank_init =
    "reference"``, its config returned too) with the same weights (unless not ``copy``: then
    each with its own initialisation), in float64, solved by dopri5 at ``tol``: with the exact
    trace (``exact``) or the Gaussian Hutchinson estimator (the reference's ``--rademacher
    False``)."""
    from vaeflow.configs import resolve
    from vaeflow.model import build_model

    _import_reference(reference)
    from vae_lib.models.CNFVAE import AmortizedLowRankCNFVAE

    args = _reference_args(
        dims="-".join(map(str, dims)), rank=rank, num_blocks=blocks, layer_type="concat",
        nonlinearity="softplus", divergence_fn="brute_force" if exact else "approximate",
        residual=False, rademacher=False, time_length=0.5, atol=tol, rtol=tol, solver="dopri5",
    )  # fmt: skip
    torch.manual_seed(seed)
    ref = AmortizedLowRankCNFVAE(args).double()
    config = resolve("static_mnist", "ffjord", {"data_dir": str(data_dir)})
    config.flow_kwargs.update(hidden_dims=list(dims), rank=rank, num_blocks=blocks, atol=tol,
                              rtol=tol, noise="gaussian")  # fmt: skip
    ours = build_model(config).double()
    if copy:
        ours.load_state_dict(ffjord_weights(ref, ours))
    return ref, ours, config
