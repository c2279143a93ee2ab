"""One optimiser step of a TopK SAE or a JSAE pair: the losses, then the update.

:func:`jsae_step_losses` computes, for one minibatch in normalised units::

    L = MSE(x̂, x) + MSE(ŷ, y) + l1 · penalty_norm · mean_t Σ_ab |J_t[a, b]|
        + aux_coef · (AuxK_x + AuxK_y)

with ``y = mlp(x)`` (the true outputs) and the exact active Jacobian blocks ``J_t``.
:func:`optimiser_step` then runs backward, clips each SAE's gradient norm, steps
Adam and renormalises the decoder rows.  The training loop
(:func:`sklearn_jsae._backend.train.train`) and ``benchmarks/run.py`` both call
these two functions, so the benchmark times the real step.

Fast paths used here, each pinned to a plain twin in ``tests/test_fast_paths.py``:

* :func:`~sklearn_jsae._backend.sae.encode_with_grad` — TopK values read from the
  dense pre-activations, hand-written backward into the k active encoder rows
  (twin: :func:`~sklearn_jsae._backend.sae.active_values` under autograd);
* :func:`~sklearn_jsae._backend.sae.decode` — sparse decode, ``embedding_bag`` forward and
  a sort-free hand-written backward (twin: :func:`~sklearn_jsae._backend.sae.decode_dense`);
* :func:`~sklearn_jsae._backend.jacobian.jacobian_penalty` — fused, chunked
  ``mean_t Σ|J_t|`` with its gradient formed in the forward pass (twin:
  :func:`~sklearn_jsae._backend.jacobian.jacobian_penalty_reference`);
* :func:`~sklearn_jsae._backend.jacobian.map_and_local_weights` — the MLP output and
  its φ' from one pass through the hidden layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .jacobian import jacobian_penalty, map_and_local_weights
from .sae import (
    SAEParams,
    active_values_from_pre,
    decode,
    decode_rows,
    encode_with_grad,
    normalise_decoder_,
    select_topk,
)


@dataclass
class SideOutput:
    """One SAE's part of a step: ``mse`` and ``aux`` () losses, ``indices`` and ``values`` (B, k)."""

    mse: torch.Tensor
    aux: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor


def side_losses(params: SAEParams, x: torch.Tensor, k: int, dead: torch.Tensor | None = None,
                aux_coef: float = 0.0, aux_k: int = 0, mean_square=None) -> SideOutput:
    """Reconstruction MSE and AuxK loss of one TopK SAE on a minibatch.

    Parameters
    ----------
    params : SAEParams, W_enc and W_dec (n, d).
    x : (B, d) normalised inputs.
    k : active latents per sample.
    dead : (n,) bool or None
        Latents counted as dead; AuxK (Gao et al. 2024) lets the top ``aux_k`` of them
        reconstruct the residual ``x - x̂``, its MSE divided by the residual's mean square.
    aux_coef : float
        AuxK is computed only if ``aux_coef > 0`` and some latent is dead (the caller
        multiplies ``aux`` by ``aux_coef``).
    aux_k : int
    mean_square : callable or None
        Maps the minibatch's residual mean square () to the one AuxK divides by; None keeps it.
        Data-parallel training passes the mean over every rank's rows
        (:mod:`~sklearn_jsae._backend.distributed`), so that the loss is the one-process loss.

    Returns
    -------
    SideOutput with ``mse`` and ``aux`` () tensors, ``indices`` and ``values`` (B, k).
    """
    values, indices, pre = encode_with_grad(params, x, k)
    x_hat = decode(params, values, indices)
    mse = F.mse_loss(x_hat, x)
    aux = x.new_zeros(())
    n_dead = 0 if dead is None else int(dead.sum())
    if aux_coef > 0 and n_dead > 0:
        with torch.no_grad():
            aux_indices = select_topk(pre.masked_fill(~dead, -math.inf), min(aux_k, n_dead))
        aux_values = active_values_from_pre(params, x, aux_indices, pre)
        residual = (x - x_hat).detach()
        recon = decode_rows(params.W_dec, aux_values, aux_indices)
        residual_square = residual.pow(2).mean()
        if mean_square is not None:
            residual_square = mean_square(residual_square)
        aux = F.mse_loss(recon, residual) / residual_square.clamp_min(1e-12)
    return SideOutput(mse, aux, indices, values)


def jsae_step_losses(side_x: SAEParams, side_y: SAEParams | None, normalised_map, x: torch.Tensor, k: int,
                     l1: float | None = None, penalty_norm: float = 1.0, dead=(None, None),
                     aux_coef: float = 0.0, aux_k=(0, 0), outputs_and_weights=None, mean_square=None,
                     penalty: str = "paper"):
    """All loss terms of one minibatch for a single SAE (``side_y=None``) or a JSAE pair.

    Parameters
    ----------
    side_x, side_y : SAEParams of the input and output SAE (``side_y`` None: one SAE).
    normalised_map : backend map on normalised units, d_in -> d_out (unused for one SAE).
    x : (B, d_in) normalised MLP inputs.
    k : active latents per sample.
    l1 : float or None
        Current weight of the Jacobian penalty (after its warm-up ramp).  None skips the
        penalty entirely (the traditional pair); a float, even 0, computes and reports it.
    penalty_norm : float
        Factor on ``mean_t Σ_ab |J_t[a, b]|`` (train uses ``1 / sqrt(d_in · d_out)``).
    dead : pair of (n,) bool tensors or None, per SAE.
    aux_coef : float
    aux_k : pair of int, per SAE.
    outputs_and_weights : ``(y (B, d_out), weights (B, r, d_mlp) or None)`` or None
        ``map_and_local_weights(normalised_map, x)`` if already known (a precomputed
        :class:`~sklearn_jsae._backend.train.MLPPass`); None computes it.
    mean_square : callable or None, AuxK's residual mean square across ranks (:func:`side_losses`).
    penalty : {"paper", "unit_gain"}
        ``"paper"`` penalises J between the latents.  ``"unit_gain"`` divides row a of every
        ``J_t`` by ``‖W_enc_y[a]‖`` (see :func:`unit_gain_encoder`), so the penalty cannot be
        lowered by shrinking the output SAE's encoder rows, only by changing directions.

    Returns
    -------
    loss : () tensor.
    terms : dict of () tensors named mse_input, aux_input and, for a pair, mse_output,
        aux_output and (when ``l1`` is not None) jacobian_l1 (the normalised penalty).
    fired : list of ``(indices, values)`` (B, k) per SAE.
    """
    out_x = side_losses(side_x, x, k, dead[0], aux_coef, aux_k[0], mean_square)
    loss = out_x.mse + aux_coef * out_x.aux
    terms = dict(mse_input=out_x.mse, aux_input=out_x.aux)
    fired = [(out_x.indices, out_x.values)]
    if side_y is None:
        return loss, terms, fired
    if outputs_and_weights is None:
        outputs_and_weights = map_and_local_weights(normalised_map, x)
    y, weights = outputs_and_weights
    out_y = side_losses(side_y, y, k, dead[1], aux_coef, aux_k[1], mean_square)
    loss = loss + out_y.mse + aux_coef * out_y.aux
    terms.update(mse_output=out_y.mse, aux_output=out_y.aux)
    fired.append((out_y.indices, out_y.values))
    if l1 is not None:
        W_enc_y = unit_gain_encoder(side_y.W_enc) if penalty == "unit_gain" else side_y.W_enc
        penalty_value = penalty_norm * jacobian_penalty(
            normalised_map, x, side_x.W_dec, out_x.indices, W_enc_y, out_y.indices, weights=weights
        )
        loss = loss + l1 * penalty_value
        terms["jacobian_l1"] = penalty_value
    return loss, terms, fired


def unit_gain_encoder(W_enc: torch.Tensor) -> torch.Tensor:
    """``W_enc / ‖W_enc‖`` row by row, (n, d) -> (n, d), differentiable.

    With these rows in place of the output SAE's encoder, the penalty's ``J_t[a, b]`` becomes
    ``J_t[a, b] / ‖W_enc_y[a]‖``: the Jacobian of the output latent's direction, whatever its
    gain.  The input side needs no such step: its decoder rows are renormalised to unit norm
    after every step.  Autograd carries the division's gradient, which is orthogonal to each
    row, so the penalty moves the rows' directions and leaves their norms to the reconstruction.
    """
    return W_enc / W_enc.norm(dim=1, keepdim=True).clamp_min(1e-12)


def optimiser_step(loss: torch.Tensor, optimiser: torch.optim.Optimizer, sides, max_grad_norm: float,
                   synchronise=None):
    """Backward, per-SAE gradient-norm clipping, one optimiser step, decoder renormalisation.

    Clipping each SAE separately keeps the two SAEs of an ``l1 = 0`` pair independent.
    ``synchronise`` (data-parallel training) runs between the backward pass and the clipping: it
    replaces every rank's gradients by their all-reduced mean, so that clipping, Adam and the
    renormalisation see the same numbers on every rank.
    Returns the gradient norms before clipping, (n_sides,) on the parameters' device (not
    synchronised, so the caller decides when to read them).
    """
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if synchronise is not None:
        synchronise()
    norms = [torch.nn.utils.clip_grad_norm_(side.tensors(), max_grad_norm) for side in sides]
    optimiser.step()
    for side in sides:
        normalise_decoder_(side)
    return torch.stack(norms)
