"""``(values, indices)`` TopK results and Jacobian blocks -> canonical SciPy sparse arrays."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class OutputCodes(sp.csr_array):
    """CSR codes of a JSAE's *output* SAE (from ``transform_output``).

    A plain :class:`scipy.sparse.csr_array` in every respect, except that
    ``JacobianSparseAutoencoder.inverse_transform`` (the input dictionary) rejects it: output
    codes decode with ``inverse_transform_output``.  Operations that build a new array (slicing,
    arithmetic) may return a plain ``csr_array``, which loses the mark.
    """


class InputCodes(sp.csr_array):
    """CSR codes of a JSAE's *input* SAE (from ``transform``): a plain :class:`scipy.sparse.csr_array`
    that ``JacobianSparseAutoencoder.inverse_transform_output`` (the output dictionary) rejects, as
    :class:`OutputCodes` are rejected the other way round.  With the default
    ``n_output_components`` both sides have the same width, so the shape alone cannot tell them
    apart.  Operations that build a new array may return a plain ``csr_array``, which loses the mark.
    """


def topk_to_csr(values: np.ndarray, indices: np.ndarray, n_columns: int, container=None) -> sp.csr_array:
    """Codes ``values``/``indices`` (n, k) -> canonical CSR (n, n_columns).

    Column indices are sorted within each row and explicit zeros (kept latents
    whose ReLU output is 0) are dropped, so each row stores at most k entries.
    ``container`` is the CSR class to build (default :class:`scipy.sparse.csr_array`).
    """
    n, k = indices.shape
    order = np.argsort(indices, axis=1, kind="stable")
    indices = np.take_along_axis(indices, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    keep = values != 0
    counts = keep.sum(axis=1)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    out = (container or sp.csr_array)((values[keep], indices[keep], indptr), shape=(n, n_columns))
    out.has_canonical_format = True
    return out


def blocks_to_coo(blocks, shape: tuple[int, int, int]) -> sp.coo_array:
    """Jacobian batches ``[(J (B, k_out, k_in), idx_out (B, k_out), idx_in (B, k_in)), ...]`` ->
    3-D COO array of ``shape`` = (n_samples, n_out, n_in) holding every active-block entry.

    Each block's rows and columns are put in ascending latent order, so the entries are sorted
    (sample, output latent, input latent) without repeats: SciPy's canonical format, which
    readers (the sparsity metrics) then need not sort again."""
    samples, rows, cols, data = [], [], [], []
    offset = 0
    for J, idx_out, idx_in in blocks:
        B, k_out, k_in = J.shape
        order_out = np.argsort(idx_out, axis=1, kind="stable")
        order_in = np.argsort(idx_in, axis=1, kind="stable")
        idx_out = np.take_along_axis(idx_out, order_out, axis=1)
        idx_in = np.take_along_axis(idx_in, order_in, axis=1)
        J = np.take_along_axis(np.take_along_axis(J, order_out[:, :, None], axis=1), order_in[:, None, :], axis=2)
        samples.append(np.repeat(np.arange(offset, offset + B), k_out * k_in))
        rows.append(np.repeat(idx_out, k_in, axis=1).ravel())
        cols.append(np.tile(idx_in, (1, k_out)).ravel())
        data.append(J.ravel())
        offset += B
    if not data:
        empty = np.zeros(0, dtype=np.int64)
        return sp.coo_array((np.zeros(0, dtype=np.float32), (empty, empty, empty)), shape=shape)
    coords = tuple(np.concatenate(c) for c in (samples, rows, cols))
    out = sp.coo_array((np.concatenate(data), coords), shape=shape)
    out.has_canonical_format = True
    return out


class AbsJacobianSum:
    """Running Σ_t |J_t| over (n_out, n_in), built batch by batch.

    A dense float64 accumulator (fast ``np.bincount``) when n_out · n_in is at most
    ``dense_limit`` entries, else a running CSR sum.  The CSR sum takes the batches' entries in
    flushes of at least ``flush_entries`` and at least as many as it holds: adding each 256-row batch
    to it rebuilt the whole sum every time, quadratic in the rows (65 s for 65,536 rows at 65,536²
    latents, k = 32), while flushes that grow with the sum cost O(entries) in all and hold at most
    as many pending entries as the sum.
    """

    def __init__(self, n_out: int, n_in: int, dense_limit: int = 1 << 25, flush_entries: int = 1 << 22):
        self.shape = (n_out, n_in)
        self.dense = n_out * n_in <= dense_limit
        self.total = np.zeros(n_out * n_in) if self.dense else sp.csr_array(self.shape, dtype=np.float64)
        self.flush_entries = flush_entries
        self.pending, self.n_pending = [], 0  # (rows, cols, magnitudes) not yet in the CSR sum
        self.n_samples = 0

    def add(self, J: np.ndarray, idx_out: np.ndarray, idx_in: np.ndarray) -> None:
        B, k_out, k_in = J.shape
        rows = np.repeat(idx_out, k_in, axis=1).ravel()
        cols = np.tile(idx_in, (1, k_out)).ravel()
        magnitudes = np.abs(J).ravel().astype(np.float64)
        if self.dense:
            self.total += np.bincount(rows * self.shape[1] + cols, magnitudes, minlength=self.total.size)
        else:
            self.pending.append((rows, cols, magnitudes))
            self.n_pending += magnitudes.size
            if self.n_pending >= max(self.flush_entries, self.total.nnz):
                self._flush()
        self.n_samples += B

    def _flush(self) -> None:
        if self.pending:
            rows, cols, magnitudes = (np.concatenate(part) for part in zip(*self.pending))
            self.total = self.total + sp.coo_array((magnitudes, (rows, cols)), shape=self.shape).tocsr()
            self.pending, self.n_pending = [], 0

    def mean(self) -> sp.csr_array:
        if not self.dense:
            self._flush()
        total = self.total.reshape(self.shape) if self.dense else self.total
        out = sp.csr_array(total / max(1, self.n_samples), dtype=np.float32)
        out.eliminate_zeros()
        out.sum_duplicates()
        return out
