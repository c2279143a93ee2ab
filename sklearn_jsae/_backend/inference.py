"""Batched inference from numpy in, numpy out: encode, MLP outputs, Jacobian blocks.

Nothing here keeps more than one batch of (B, k, d_mlp) intermediates alive,
so memory grows with n_samples · k (codes) or n_samples · k² (Jacobians) only.
"""

from __future__ import annotations

import numpy as np
import torch

from .jacobian import jacobian_blocks
from .mlp import placed, without_autocast
from .sae import SAEParams, encode
from .train import _Rows

# Upper bound on the elements of one (B, k, d_mlp) intermediate of the Jacobian.
_JACOBIAN_CHUNK_ELEMENTS = 1 << 25


def _as_tensor_params(params: SAEParams, device, dtype) -> SAEParams:
    return params.to(device=device, dtype=dtype)


def numbered_batches(rows: _Rows, batch_size: int):
    """``(first row, batch)`` over the rows in order, each batch of X checked for NaN / inf (X may
    be a memmap nobody scanned)."""
    return zip(range(0, rows.n, batch_size), rows.batches(batch_size, check_finite=True))


def refuse_non_finite(values: torch.Tensor, first_row: int, what: str, fix: str,
                      where: str = "row {} of X (a finite row)") -> None:
    """Raise ``ValueError`` naming the first row of X whose ``values`` (B, ...) hold NaN or inf.

    Inference checks what it computes from finite rows of X, as training does: a row the MLP
    overflows on would otherwise give NaN codes and Jacobians, and a score that looks finite
    (FVU's no-variance branch reads a NaN total as zero variance)."""
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        row = first_row + int(bad.nonzero()[0, 0])
        raise ValueError(f"{what} NaN or inf on {where.format(row)}; {fix}")


MLP_FIX = "check the MLP on that row (an overflow, a log or a division of its values) or remove the row from X."


def mapped(mlp_map, x: torch.Tensor, first_row: int) -> torch.Tensor:
    """``mlp_map(x)``, refusing NaN or inf outputs (see :func:`refuse_non_finite`)."""
    y = mlp_map(x)
    refuse_non_finite(y, first_row, "the mlp returned", MLP_FIX)
    return y


def jacobian_batch_size(k_out: int, k_in: int, width: int) -> int:
    """Rows per batch so that one (B, max(k), width) intermediate stays under the bound."""
    return max(1, _JACOBIAN_CHUNK_ELEMENTS // (max(k_out, k_in) * max(1, width)))


#: Rows per inference batch (encoding, the MLP's pass, reconstruction) for narrow dictionaries.
INFERENCE_ROWS = 4096


def inference_rows(n_latents: int) -> int:
    """Rows per inference batch: :data:`INFERENCE_ROWS`, or fewer where a batch's ``(rows, n_latents)`` float32
    pre-activations and their top-k selection (about 8 bytes per latent and row) would exceed
    scikit-learn's ``working_memory`` (1,024 MiB unless ``sklearn.set_config`` says otherwise).
    A fixed 4,096 rows held 1 GiB of pre-activations per batch at the paper's 65,536 latents,
    whatever the setting; at a tiny width the Jacobian's row bound alone allowed 131,072 rows."""
    import sklearn

    budget = sklearn.get_config()["working_memory"] * 2**20  # MiB
    return int(min(INFERENCE_ROWS, max(1, budget // (8 * max(1, int(n_latents))))))


# Every entry point below computes in float32 with the caller's autocast off (see
# sklearn_jsae._backend.mlp.without_autocast); a generator turns it off per batch only, so that
# its consumer's code between two batches keeps the caller's state.


def iter_codes(params: SAEParams, X: np.ndarray, k: int, device="cpu", batch_size=None, mlp_map=None):
    """Yield ``(first row, values (B, k) float32, indices (B, k) int64)`` numpy batches of the codes
    of ``X`` (or of ``mlp_map(X)``), in row order: a consumer that keeps only what it builds from
    them (a CSR, a dense array) never holds the (n, k) pair."""
    params = _as_tensor_params(params, device, torch.float32)
    mlp_map = None if mlp_map is None else placed(mlp_map, device, torch.float32)
    rows = _Rows(X, device, torch.float32, resident=False)  # one pass in order: no copy of X
    for start, x in numbered_batches(rows, batch_size or inference_rows(params.W_enc.shape[0])):
        with torch.no_grad(), without_autocast(device):
            v, i = encode(params, x if mlp_map is None else mapped(mlp_map, x, start), k)
        refuse_non_finite(v, start, "the codes are",
                          "the row's values overflow float32 in the encoder: is X on the scale the model was "
                          "fitted on?")
        yield start, v.cpu().numpy(), i.cpu().numpy()


def encode_rows(params: SAEParams, X: np.ndarray, k: int, device="cpu", batch_size=None, mlp_map=None):
    """Codes of ``X`` (or of ``mlp_map(X)``) as numpy ``(values (n, k) float32, indices (n, k) int64)``,
    filled batch by batch into the two arrays (no list of batches and concatenated copy)."""
    values = indices = None
    n = X.shape[0]
    for start, v, i in iter_codes(params, X, k, device, batch_size, mlp_map):
        if values is None:
            values = np.empty((n,) + v.shape[1:], dtype=v.dtype)
            indices = np.empty((n,) + i.shape[1:], dtype=i.dtype)
        values[start : start + len(v)] = v
        indices[start : start + len(i)] = i
    if values is None:  # no rows
        return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
    return values, indices


@torch.no_grad()
def map_rows(mlp_map, X: np.ndarray, device="cpu", batch_size=None) -> np.ndarray:
    """``mlp_map(X)`` as float32 numpy (n, d_out), filled batch by batch (:data:`INFERENCE_ROWS`
    rows unless ``batch_size`` says otherwise) into one array."""
    mlp_map = placed(mlp_map, device, torch.float32)
    rows = _Rows(X, device, torch.float32, resident=False)  # one pass in order: no copy of X
    out = None
    with without_autocast(device):
        for start, x in numbered_batches(rows, batch_size or INFERENCE_ROWS):
            y = mapped(mlp_map, x, start).cpu().numpy()
            if out is None:
                out = np.empty((rows.n,) + y.shape[1:], dtype=y.dtype)
            out[start : start + len(y)] = y
    if out is None:  # no rows
        return np.zeros((0, mlp_map.d_out), dtype=np.float32)
    return out


def iter_jacobian_blocks(mlp_map, params_x: SAEParams, params_y: SAEParams, X: np.ndarray, k: int,
                         device="cpu", batch_size=None):
    """Yield ``(J (B, k, k), indices_y (B, k), indices_x (B, k))`` numpy batches over the rows of X.

    ``J[t, a, b] = ∂ s_y[indices_y[t, a]] / ∂ s_x[indices_x[t, b]]`` at the true input.
    """
    mlp_map = placed(mlp_map, device, torch.float32)
    px = _as_tensor_params(params_x, device, torch.float32)
    py = _as_tensor_params(params_y, device, torch.float32)
    projection = getattr(mlp_map, "input_projection", None)
    width = projection.shape[1] if projection is not None else max(mlp_map.d_in, mlp_map.d_out)
    batch_size = batch_size or min(jacobian_batch_size(k, k, width),
                                   inference_rows(max(px.W_enc.shape[0], py.W_enc.shape[0])))
    rows = _Rows(X, device, torch.float32, resident=False)  # one pass in order: no copy of X
    for start, x in numbered_batches(rows, batch_size):
        with torch.no_grad(), without_autocast(device):
            _, idx_x = encode(px, x, k)
            _, idx_y = encode(py, mapped(mlp_map, x, start), k)
            J = jacobian_blocks(mlp_map, x, px.W_dec, idx_x, py.W_enc, idx_y)
        refuse_non_finite(J, start, "the mlp's Jacobian is", MLP_FIX)
        yield J.cpu().numpy(), idx_y.cpu().numpy(), idx_x.cpu().numpy()
