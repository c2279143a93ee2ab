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


# Entries sorted per block by topk_to_csr / CodesCSR: the block's temporaries (the argsort, the
# sorted values and indices, the mask: about 30 bytes an entry) stay a few MB, while the loop over
# blocks costs nothing next to the sort.
_BLOCK_ENTRIES = 1 << 17


def csr_index_dtype(n_rows: int, n_columns: int, nnz: int):
    """int32 when the shape and the entry count fit it, else int64: SciPy's own rule (its
    ``get_index_dtype``, public only in recent releases), which a ``csr_array`` given wider
    arrays does not apply."""
    return np.int32 if max(n_rows, n_columns, nnz) <= np.iinfo(np.int32).max else np.int64


class CodesCSR:
    """A canonical CSR (n_rows, n_columns) of TopK codes, filled in row order from
    ``(values, indices)`` batches into preallocated arrays.

    ``capacity`` bounds the non-zeros (``n_rows * k`` when unknown: the arrays are trimmed in
    place at the end).  Each batch is sorted and filtered in blocks of ``_BLOCK_ENTRIES``, so the
    peak is the output plus one block."""

    def __init__(self, n_rows: int, n_columns: int, capacity: int, value_dtype=np.float32):
        self.shape = (n_rows, n_columns)
        index_dtype = csr_index_dtype(n_rows, n_columns, capacity)
        self.data = np.empty(capacity, dtype=value_dtype)
        self.indices = np.empty(capacity, dtype=index_dtype)
        self.indptr = np.zeros(n_rows + 1, dtype=index_dtype)
        self.row = self.nnz = 0

    def add(self, values: np.ndarray, indices: np.ndarray) -> None:
        n, k = indices.shape
        if self.row + n > self.shape[0]:
            raise ValueError(f"codes for {self.row + n} rows, expected {self.shape[0]}")
        step = max(1, _BLOCK_ENTRIES // max(1, k))
        for lo in range(0, n, step):
            idx = indices[lo : lo + step]
            order = np.argsort(idx, axis=1, kind="stable")
            idx = np.take_along_axis(idx, order, axis=1)
            vals = np.take_along_axis(values[lo : lo + step], order, axis=1)
            del order
            keep = vals != 0
            counts = keep.sum(axis=1)
            m = int(counts.sum())
            self.data[self.nnz : self.nnz + m] = vals[keep]
            self.indices[self.nnz : self.nnz + m] = idx[keep]
            rows = self.indptr[self.row + 1 : self.row + 1 + len(idx)]
            np.cumsum(counts, out=rows, dtype=rows.dtype)
            rows += self.nnz
            self.nnz += m
            self.row += len(idx)

    def finish(self, container=None) -> sp.csr_array:
        if self.row != self.shape[0]:
            raise ValueError(f"codes for {self.row} rows, expected {self.shape[0]}")
        if self.nnz < len(self.data):  # trim in place (a realloc): no second copy
            self.data.resize(self.nnz, refcheck=False)
            self.indices.resize(self.nnz, refcheck=False)
        out = (container or sp.csr_array)((self.data, self.indices, self.indptr), shape=self.shape)
        out.has_canonical_format = True
        return out


def topk_to_csr(values: np.ndarray, indices: np.ndarray, n_columns: int, container=None) -> sp.csr_array:
    """Codes ``values``/``indices`` (n, k) -> canonical CSR (n, n_columns).

    Column indices are sorted within each row and explicit zeros (kept latents
    whose ReLU output is 0) are dropped, so each row stores at most k entries.
    ``container`` is the CSR class to build (default :class:`scipy.sparse.csr_array`).
    Indices and indptr are int32 when ``n``, ``n_columns`` and the entries fit it (as SciPy
    chooses), else int64; the rows are converted in blocks, so the peak is the output plus a block.
    """
    n = indices.shape[0]
    builder = CodesCSR(n, n_columns, int(np.count_nonzero(values)), values.dtype)
    builder.add(values, indices)
    return builder.finish(container)


def _fill_jacobian_block(data, coords, offset, J, idx_out, idx_in):
    """Write one Jacobian block (B, k_out, k_in) of samples ``offset``... with its rows and columns in
    ascending latent order at entries ``offset * k_out * k_in`` on."""
    B, k_out, k_in = J.shape
    order_out = np.argsort(idx_out, axis=1, kind="stable")
    order_in = np.argsort(idx_in, axis=1, kind="stable")
    idx_out = np.take_along_axis(idx_out, order_out, axis=1)
    idx_in = np.take_along_axis(idx_in, order_in, axis=1)
    lo, hi = offset * k_out * k_in, (offset + B) * k_out * k_in
    samples, rows, cols = (c[lo:hi].reshape(B, k_out, k_in) for c in coords)
    samples[...] = np.arange(offset, offset + B)[:, None, None]
    rows[...] = idx_out[:, :, None]
    cols[...] = idx_in[:, None, :]
    data[lo:hi].reshape(B, k_out, k_in)[...] = np.take_along_axis(
        np.take_along_axis(J, order_out[:, :, None], axis=1), order_in[:, None, :], axis=2)


def blocks_to_coo(blocks, shape: tuple[int, int, int]) -> sp.coo_array:
    """Jacobian batches ``[(J (B, k_out, k_in), idx_out (B, k_out), idx_in (B, k_in)), ...]`` ->
    3-D COO array of ``shape`` = (n_samples, n_out, n_in) holding every active-block entry.

    Each block's rows and columns are put in ascending latent order, so the entries are sorted
    (sample, output latent, input latent) without repeats: SciPy's canonical format, which
    readers (the sparsity metrics) then need not sort again.

    The batches cover the ``n_samples`` rows with blocks of one (k_out, k_in), so the entries
    (``n_samples * k_out * k_in``) are written into arrays allocated at the first batch; the
    coordinates are int64 (SciPy keeps every COO array of more than two dimensions in int64)."""
    n_samples = shape[0]
    data = coords = None
    offset = 0
    for J, idx_out, idx_in in blocks:
        B, k_out, k_in = J.shape
        if data is None:
            data = np.empty(n_samples * k_out * k_in, dtype=J.dtype)
            coords = tuple(np.empty(n_samples * k_out * k_in, dtype=np.int64) for _ in range(3))
        if offset + B > n_samples or data.size != n_samples * k_out * k_in:
            raise ValueError(f"Jacobian blocks of shape {J.shape} after {offset} rows do not fit "
                             f"{n_samples} samples of {data.size // max(1, n_samples)} entries")
        step = max(1, _BLOCK_ENTRIES // max(1, k_out * k_in))  # a batch may be large: sort it in blocks
        for first in range(0, B, step):
            _fill_jacobian_block(data, coords, offset + first, J[first : first + step],
                                 idx_out[first : first + step], idx_in[first : first + step])
        offset += B
    if data is None:
        empty = np.zeros(0, dtype=np.int64)
        return sp.coo_array((np.zeros(0, dtype=np.float32), (empty, empty, empty)), shape=shape)
    if offset < n_samples:  # fewer rows than the shape says: keep the entries given, as before
        used = offset * (data.size // n_samples)
        data, coords = data[:used].copy(), tuple(c[:used].copy() for c in coords)
    out = sp.coo_array((data, coords), shape=shape)
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
            flat = rows * self.shape[1] + cols
            if self.total.size > 4 * flat.size:
                # Only the pairs this batch touches: a full-length bincount allocated a second total
                # for every batch (0.5 GB at 5,792² latents).  bincount adds each pair's entries in
                # the same order either way, and untouched pairs gain nothing: the same sums.
                touched, where = np.unique(flat, return_inverse=True)
                self.total[touched] += np.bincount(where.ravel(), magnitudes)
            else:
                self.total += np.bincount(flat, magnitudes, minlength=self.total.size)
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
