"""The exact latent-to-latent Jacobian of a JSAE, restricted to each sample's active block.

For sample t with active input latents I_x(t) and active output latents I_y(t)::

    J_t = E_t · J_f(x_t) · D_t^T        (k_out, k_in)

where ``D_t = W_dec_x[I_x(t)]`` (k_in, d_in) are the input SAE's decoder rows,
``E_t = W_enc_y[I_y(t)]`` (k_out, d_out) the output SAE's encoder rows, and
``J_f(x_t)`` (d_out, d_in) the MLP's Jacobian at the TRUE input x_t.  The TopK /
ReLU derivative is taken as 1 on the active set and the index sets are
constants, so gradients reach ``W_dec_x`` and ``W_enc_y`` only.

Fast path (:func:`jacobian_blocks`) for maps with a closed form
(see :mod:`sklearn_jsae._backend.mlp`)::

    A = (W_dec_x[U_x] @ P_in)[inverse_x]            (B, k_in, r·d_mlp)
    C = (W_enc_y[U_y] @ P_out^T)[inverse_y]         (B, k_out, d_mlp)
    J = (C ⊙ w) @ A^T                               (B, k_out, k_in)

with U the latents active anywhere in the batch: the products are formed once
per distinct active latent, which is never more work than the authors' route
(all n latents) nor than the per-sample route (B·k rows).  Maps without a
closed form use k forward-mode JVPs.  :func:`jacobian_blocks_reference` is the
plain per-sample autograd twin that the tests pin the fast path to.
"""

from __future__ import annotations

import torch

from .mlp import AffineMap, CallableMap


def _project_active(rows: torch.Tensor, indices: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """``(rows[indices]) @ projection`` computed once per distinct index.

    rows (n, d), indices (B, k) int64, projection (d, m) -> (B, k, m).
    """
    unique, inverse = torch.unique(indices, return_inverse=True)
    return (rows[unique] @ projection)[inverse]


def _jvp_columns(mlp, x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """J_f(x_t) d for each of the k directions of each sample.

    x (B, d_in), directions (B, k, d_in) -> (B, k, d_out).  Differentiable in ``directions``.
    """
    from torch.func import jvp

    columns = []
    for a in range(directions.shape[1]):
        _, tangent = jvp(mlp, (x,), (directions[:, a],))
        columns.append(tangent)
    return torch.stack(columns, dim=1)


def jacobian_blocks(
    mlp,
    x: torch.Tensor,
    W_dec_x: torch.Tensor,
    indices_x: torch.Tensor,
    W_enc_y: torch.Tensor,
    indices_y: torch.Tensor,
) -> torch.Tensor:
    """Active Jacobian blocks, fast path.

    Parameters
    ----------
    mlp : backend map (AffineMap, ElementwiseMLP, GatedMLP or CallableMap), d_in -> d_out.
    x : (B, d_in) true MLP inputs.
    W_dec_x : (n_in, d_in) input SAE decoder rows.
    indices_x : (B, k_in) active input latents.
    W_enc_y : (n_out, d_out) output SAE encoder rows.
    indices_y : (B, k_out) active output latents.

    Returns
    -------
    J : (B, k_out, k_in), ``J[t, a, b] = ∂ s_y[indices_y[t, a]] / ∂ s_x[indices_x[t, b]]``.
    """
    if isinstance(mlp, AffineMap):
        projection = torch.eye(mlp.d_in, dtype=x.dtype, device=x.device) if mlp.W is None else mlp.W
        A = _project_active(W_dec_x, indices_x, projection)  # (B, k_in, d_out)
        E = W_enc_y[indices_y]  # (B, k_out, d_out)
        return torch.bmm(E, A.transpose(1, 2))
    if isinstance(mlp, CallableMap) or not getattr(mlp, "has_closed_form", False):
        columns = _jvp_columns(mlp, x, W_dec_x[indices_x])  # (B, k_in, d_out)
        return torch.bmm(W_enc_y[indices_y], columns.transpose(1, 2))
    weights = mlp.local_weights(x)  # (B, r, d_mlp)
    batch, r, d_mlp = weights.shape
    A = _project_active(W_dec_x, indices_x, mlp.input_projection)  # (B, k_in, r·d_mlp)
    C = _project_active(W_enc_y, indices_y, mlp.output_projection.T)  # (B, k_out, d_mlp)
    if r == 1:
        weighted = C * weights
    else:
        weighted = (C.unsqueeze(2) * weights.unsqueeze(1)).reshape(batch, C.shape[1], r * d_mlp)
    return torch.bmm(weighted, A.transpose(1, 2))


def jacobian_blocks_reference(
    mlp,
    x: torch.Tensor,
    W_dec_x: torch.Tensor,
    indices_x: torch.Tensor,
    W_enc_y: torch.Tensor,
    indices_y: torch.Tensor,
) -> torch.Tensor:
    """Plain twin of :func:`jacobian_blocks`: full autograd Jacobian of ``mlp`` per sample.

    Same shapes and meaning; O(B · d_out · d_in) memory, for tests only.
    """
    from torch.func import jacrev

    blocks = []
    for t in range(x.shape[0]):
        J_f = jacrev(lambda row: mlp(row.unsqueeze(0)).squeeze(0))(x[t])  # (d_out, d_in)
        blocks.append(W_enc_y[indices_y[t]] @ J_f @ W_dec_x[indices_x[t]].T)
    return torch.stack(blocks)
