"""Memory that must not grow with the rows of a store (the paper's scale: 300M tokens on disk).

Each test measures numpy's allocations with ``tracemalloc`` (exact accounting, not a timing) on
an input large enough that a copy proportional to it would dominate, and bounds the peak by a
fraction of that copy:

* ``partial_fit`` on a float16 memory-mapped store read it whole into a float32 copy (twice the
  file) before training; a float32 store was scanned through its mapping;
* ``metrics.linearity`` permuted every row index (8 bytes a row: 2.4 GB for 300M rows) to sample
  its 256 rows;
* ``inverse_transform`` held two reconstructions and a bool array of the output at its peak;
* a pass over a store in order (inference, the metrics, the data statistics) indexed every row
  first (8 bytes a row);
* ``transform`` / ``transform_output`` held the (n, k) codes twice and topk_to_csr's sort of them
  (3.6x the CSR), ``mlp_outputs`` its batches and their concatenation, ``jacobian`` its entries twice;
* a fit's epoch order was an int64 permutation of every row (8 bytes a row: 2.4 GB at 3e8 rows).
"""

import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae._backend import train as train_module
from sklearn_jsae._backend.train import epoch_order
from sklearn_jsae.exceptions import NonFiniteTrainingError
from sklearn_jsae.metrics import _linearity
from test_checkpoints import _assert_same_model  # the model's arrays and history, bit for bit


def _peak_bytes(call):
    tracemalloc.start()
    try:
        result = call()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 1 << 21), size=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_linearity_samples_distinct_rows_with_the_same_draws_as_before_on_small_stores(n, size, seed):
    size = min(size, n)
    rows = _linearity._sample_rows(np.random.RandomState(seed), n, size)
    assert len(rows) == size == len(np.unique(rows)) and rows.min() >= 0 and rows.max() < n
    assert (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, _linearity._sample_rows(np.random.RandomState(seed), n, size))
    if n <= _linearity._PERMUTED_ROWS:  # the rows a seed picked in earlier versions
        expected = np.sort(np.random.RandomState(seed).choice(n, size=size, replace=False))
        np.testing.assert_array_equal(rows, expected)


def test_linearity_sampling_does_not_grow_with_the_store():
    peak, rows = _peak_bytes(lambda: _linearity._sample_rows(np.random.RandomState(0), 300_000_000, 256))
    assert len(np.unique(rows)) == 256
    assert peak < 1_000_000  # the permutation was 2.4 GB


def test_linearity_sampling_is_uniform_over_a_large_store():
    """Every row equally likely: the draws of many seeds spread evenly over ten bands of rows."""
    n = 10 * _linearity._PERMUTED_ROWS
    counts = np.zeros(10)
    for seed in range(200):
        rows = _linearity._sample_rows(np.random.RandomState(seed), n, 50)
        counts += np.bincount(rows * 10 // n, minlength=10)
    expected = 200 * 50 / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9  # the 0.999 quantile of chi-squared with 9 degrees of freedom


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_inverse_transform_holds_one_reconstruction(kind):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 64)).astype(np.float32)
    sae = TopKSparseAutoencoder(n_components=128, k=8, max_iter=1, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.fit(X)
    codes = sae.transform(np.repeat(X, 40, axis=0))  # 80,000 rows: a 20 MB reconstruction
    codes = codes.toarray() if kind == "dense" else codes
    output_bytes = codes.shape[0] * 64 * 4
    peak, out = _peak_bytes(lambda: sae.inverse_transform(codes))
    assert out.dtype == np.float32 and out.nbytes == output_bytes
    assert peak < 1.1 * output_bytes  # was 2.25x: a second reconstruction and a bool array of it
    np.testing.assert_allclose(out[:2000], codes[:2000] @ sae.components_ + sae.decoder_bias_, rtol=1e-5,
                               atol=1e-5)


def test_inverse_transform_of_float64_codes_adds_the_bias_in_float64():
    """The in-place sum keeps the output's dtype; float64 codes give a float64 reconstruction."""
    X = np.random.default_rng(0).normal(size=(600, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = TopKSparseAutoencoder(n_components=16, k=2, max_iter=1, random_state=0).fit(X)
    codes = sae.transform(X).toarray().astype(np.float64)
    out = sae.inverse_transform(codes)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, codes @ sae.components_.astype(np.float64) + sae.decoder_bias_)


def test_an_overflowing_row_past_the_first_block_is_named():
    X = np.random.default_rng(0).normal(size=(600, 64)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = TopKSparseAutoencoder(n_components=16, k=2, max_iter=1, random_state=0).fit(X)
    codes = np.zeros((40_000, 16), dtype=np.float32)
    codes[[20_000, 39_999]] = 3e38  # blocks of 16,384 rows at 64 features: the second and third
    with pytest.raises(ValueError, match=r"reconstruction of row 20000 of X \(and of 2 row\(s\) in all\) "
                                         r"overflows float32"):
        sae.inverse_transform(codes)


@pytest.fixture(scope="module")
def pair():
    import torch

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    X = np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {l1: JacobianSparseAutoencoder(mlp, n_components=32, k=8, l1=l1, max_iter=2, random_state=0).fit(X)
                for l1 in (0.0, 1.0)}


def test_the_jacobian_histogram_holds_one_copy_of_the_entries_and_counts_as_before(pair):
    """The counts are those of the plain computation (every block concatenated, then abs, the
    factor and a clip), and the peak is the entries once plus a batch, not four copies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sklearn_jsae.plotting import plot_jacobian_histogram

    X = np.random.default_rng(1).normal(size=(160_000, 8)).astype(np.float32)  # 64 entries a row: 41 MB
    models = {"JSAE": pair[1.0], "traditional": pair[0.0]}
    entries_bytes = X.shape[0] * 64 * 4
    fig, ax = plt.subplots()
    peak, _ = _peak_bytes(lambda: plot_jacobian_histogram(models, X, scale="normalized", ax=ax))
    assert peak < 1.5 * 2 * entries_bytes  # both models' entries once (was about 4 copies of each)
    plain = {label: model.input_sae_.scale_ / model.output_sae_.scale_ * np.abs(np.concatenate(
        [J.ravel() for J, _, _ in model._iter_blocks(X)])) for label, model in models.items()}
    top = max(float(v.max()) for v in plain.values())
    edges = np.geomspace(1e-5, top * 1.0001, 61)
    for patch, (label, v) in zip(ax.patches, plain.items()):
        values, drawn_edges, _ = patch.get_data()
        np.testing.assert_array_equal(drawn_edges, edges)
        np.testing.assert_array_equal(values, np.histogram(np.clip(v, 1e-5, None), bins=edges)[0] / v.size)
    plt.close(fig)


@pytest.mark.parametrize("kind", ["topk", "jsae"])
def test_partial_fit_reads_a_float16_store_batch_by_batch(tmp_path, kind):
    """Not converted whole to float32 (twice the file) before training; the same model as the
    float32 array in memory."""
    make = (lambda: TopKSparseAutoencoder(n_components=32, k=4, random_state=0)) if kind == "topk" else (
        lambda: JacobianSparseAutoencoder(n_components=32, k=4, random_state=0))
    X = np.random.default_rng(0).normal(size=(400_000, 16)).astype(np.float16)  # 12.8 MB; float32: 25.6 MB
    np.save(tmp_path / "x.npy", X)
    store = np.load(tmp_path / "x.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make().partial_fit(store[:2048])  # torch's and the library's one-time allocations
        # against a sixth of the store: the same batches, and jacobian_'s pass over at most 65,536 rows
        reference, _ = _peak_bytes(lambda: make().partial_fit(store[:65_536]))
        peak, fitted = _peak_bytes(lambda: make().partial_fit(store))
        expected = make().partial_fit(X.astype(np.float32))
    assert peak - reference < 0.25 * X.nbytes  # the float32 copy was 2x the store
    sides = (lambda m: (m,)) if kind == "topk" else (lambda m: (m.input_sae_, m.output_sae_))
    for got, want in zip(sides(fitted), sides(expected)):
        np.testing.assert_array_equal(got.components_, want.components_)


@pytest.mark.parametrize("kind", ["topk", "jsae"])
def test_a_later_partial_fit_on_a_store_names_its_nan_row_and_the_run_goes_on(tmp_path, kind):
    """A store is checked batch by batch: a call after the first (which measures no statistics)
    blamed the MLP ("the mlp returned NaN or inf") or the data's size instead of the row."""
    make = (lambda: TopKSparseAutoencoder(n_components=32, k=4, random_state=0)) if kind == "topk" else (
        lambda: JacobianSparseAutoencoder(n_components=32, k=4, random_state=0))
    X = np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32)
    bad = X.copy()
    bad[2100, 3] = np.inf
    np.save(tmp_path / "clean.npy", X)
    np.save(tmp_path / "bad.npy", bad)
    clean, broken = (np.load(tmp_path / name, mmap_mode="r") for name in ("clean.npy", "bad.npy"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = make().partial_fit(clean)
        with pytest.raises(NonFiniteTrainingError, match=r"step 5: X contains NaN or inf .* in row 2100 of X"):
            est.partial_fit(broken)
        est.partial_fit(clean)
        expected = make().partial_fit(clean).partial_fit(clean)
    sides = (lambda m: (m,)) if kind == "topk" else (lambda m: (m.input_sae_, m.output_sae_))
    for got, want in zip(sides(est), sides(expected)):
        np.testing.assert_array_equal(got.components_, want.components_)


# ---- codes and Jacobians built in place ----------------------------------------------------------
# transform / transform_output kept every batch's (values, indices) in lists, concatenated them (a
# second copy), then topk_to_csr held an int64 argsort, the sorted indices and values, a mask and
# the kept entries at once; mlp_outputs concatenated its batches; jacobian concatenated per-batch
# coordinate lists.  Codes now stream batch by batch into a preallocated CSR (sorted in blocks),
# and the other outputs are preallocated and filled.  The plain twins below are the previous
# implementations: the new ones must give the same arrays.

def _plain_topk_to_csr(values, indices, n_columns, container=None):
    import scipy.sparse as sp

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


def _plain_blocks_to_coo(blocks, shape):
    import scipy.sparse as sp

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


def _random_codes(rng, n, k, n_columns, zeros):
    indices = np.argsort(rng.random((n, n_columns)), axis=1)[:, :k].astype(np.int64)  # distinct per row
    values = rng.normal(size=(n, k)).astype(np.float32)
    values[rng.random((n, k)) < zeros] = 0.0
    return values, indices


def _assert_same_csr(got, want, index_dtype=np.int32):
    assert type(got) is type(want) and got.shape == want.shape and got.has_canonical_format
    assert got.data.dtype == want.data.dtype and got.indices.dtype == got.indptr.dtype == index_dtype
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data, want.data)
    got.check_format(full_check=True)


def _assert_same_coo(got, want):
    assert got.shape == want.shape and got.has_canonical_format == want.has_canonical_format
    assert got.data.dtype == want.data.dtype and len(got.coords) == len(want.coords) == 3
    for a, b in zip(got.coords, want.coords):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got.data, want.data)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 300), k=st.integers(1, 8), extra=st.integers(0, 40), zeros=st.sampled_from([0.0, 0.3, 1.0]),
       block=st.sampled_from([1, 5, 64, 1 << 17]), splits=st.lists(st.integers(0, 300), max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_codes_csr_equals_the_plain_conversion_in_any_blocks_and_batches(n, k, extra, zeros, block, splits, seed):
    from sklearn_jsae import _sparse

    values, indices = _random_codes(np.random.default_rng(seed), n, k, k + extra, zeros)
    want = _plain_topk_to_csr(values, indices, k + extra, _sparse.InputCodes)
    saved = _sparse._BLOCK_ENTRIES
    _sparse._BLOCK_ENTRIES = block
    try:
        _assert_same_csr(_sparse.topk_to_csr(values, indices, k + extra, _sparse.InputCodes), want)
        # streamed as transform streams them: batches of varied sizes into one builder of n * k entries
        builder = _sparse.CodesCSR(n, k + extra, n * k)
        for lo, hi in zip([0] + sorted(splits), sorted(splits) + [n]):
            lo, hi = min(lo, n), min(hi, n)
            builder.add(values[lo:hi], indices[lo:hi])
        _assert_same_csr(builder.finish(_sparse.InputCodes), want)
    finally:
        _sparse._BLOCK_ENTRIES = saved
    np.testing.assert_array_equal(want.toarray(), _plain_topk_to_csr(values, indices, k + extra).toarray())


def test_codes_csr_takes_int64_indices_past_int32():
    """n_columns beyond 2**31 - 1: int64 indices and indptr, as SciPy needs, the same entries."""
    from sklearn_jsae._sparse import CodesCSR, topk_to_csr

    n_columns = 2**31 + 5
    values, indices = _random_codes(np.random.default_rng(0), 50, 4, 9, 0.3)
    indices = indices + (n_columns - 9)  # the last columns, past int32
    want = _plain_topk_to_csr(values, indices, n_columns)
    _assert_same_csr(topk_to_csr(values, indices, n_columns), want, index_dtype=np.int64)
    builder = CodesCSR(50, n_columns, 200)
    builder.add(values[:17], indices[:17])
    builder.add(values[17:], indices[17:])
    _assert_same_csr(builder.finish(), want, index_dtype=np.int64)
    assert CodesCSR(3, 10, 2**31).indptr.dtype == np.int64  # more entries than int32 counts (none allocated)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), k_out=st.integers(1, 6), k_in=st.integers(1, 6), extra=st.integers(0, 20),
       block=st.sampled_from([1, 30, 1 << 17]), splits=st.lists(st.integers(0, 60), max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_blocks_to_coo_equals_the_plain_concatenation(n, k_out, k_in, extra, block, splits, seed):
    from sklearn_jsae import _sparse

    rng = np.random.default_rng(seed)
    J = rng.normal(size=(n, k_out, k_in)).astype(np.float32)
    J[rng.random(J.shape) < 0.2] = 0.0  # exact zeros of the Jacobian stay stored, as before
    _, idx_out = _random_codes(rng, n, k_out, k_out + extra, 0.0)
    _, idx_in = _random_codes(rng, n, k_in, k_in + extra + 3, 0.0)
    cuts = [0] + sorted(min(s, n) for s in splits) + [n]
    blocks = [(J[lo:hi], idx_out[lo:hi], idx_in[lo:hi]) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]
    shape = (n, k_out + extra, k_in + extra + 3)
    saved = _sparse._BLOCK_ENTRIES
    _sparse._BLOCK_ENTRIES = block  # batches sorted in blocks of one sample, several, or whole
    try:
        got = _sparse.blocks_to_coo(iter(blocks), shape)
    finally:
        _sparse._BLOCK_ENTRIES = saved
    _assert_same_coo(got, _plain_blocks_to_coo(blocks, shape))


def _output_bytes(out):
    if hasattr(out, "coords"):
        return out.data.nbytes + sum(c.nbytes for c in out.coords)
    if hasattr(out, "indptr"):
        return out.data.nbytes + out.indices.nbytes + out.indptr.nbytes
    return out.nbytes


@pytest.mark.parametrize("method", ["transform", "transform_output", "transform_dense", "mlp_outputs"])
def test_codes_and_mlp_outputs_are_built_in_place(pair, method, tmp_path, monkeypatch):
    """Peak at most 1.3x the output on a 200,000-row store; the same arrays as the plain conversion.

    The MLP's outputs are made numpy-owned memory, which tracemalloc sees (torch's allocator is
    invisible to it), so that batches kept alive count.  Measured before (tracemalloc, this test):
    transform 3.6x its output, transform_output 3.6x, transform with sparse_output=False 1.8x,
    mlp_outputs 2.0x; now 1.02x-1.08x."""
    import torch

    from sklearn_jsae._backend import inference
    from sklearn_jsae._sparse import InputCodes, OutputCodes

    mapped = inference.mapped
    monkeypatch.setattr(inference, "mapped", lambda *a: torch.from_numpy(mapped(*a).numpy().copy()))
    jsae = pair[1.0]
    np.save(tmp_path / "x.npy", np.random.default_rng(2).normal(size=(200_000, 8)).astype(np.float32))
    X = np.load(tmp_path / "x.npy", mmap_mode="r")
    if method == "transform_dense":
        jsae = jsae.__class__(**jsae.get_params())
        jsae.__dict__.update({key: value for key, value in pair[1.0].__dict__.items() if key.endswith("_")})
        jsae.set_params(sparse_output=False)
    call = {"transform": jsae.transform, "transform_output": jsae.transform_output,
            "transform_dense": jsae.transform, "mlp_outputs": jsae.mlp_outputs}[method]
    call(np.asarray(X[:100]))  # torch's and the library's one-time allocations
    peak, out = _peak_bytes(lambda: call(X))
    print(method, "peak / output", round(peak / _output_bytes(out), 2))
    assert peak < 1.3 * _output_bytes(out)
    rows = np.asarray(X[:30_000])
    if method == "mlp_outputs":
        np.testing.assert_array_equal(out[:30_000], np.concatenate([jsae.mlp_outputs(rows[i : i + 7000])
                                                                    for i in range(0, 30_000, 7000)]))
        return
    if method == "transform_output":
        want = _plain_topk_to_csr(*jsae._output_codes(rows), jsae.output_sae_.components_.shape[0], OutputCodes)
    else:
        want = _plain_topk_to_csr(*jsae.input_sae_._codes(rows), jsae.n_components, InputCodes)
    if method == "transform_dense":
        np.testing.assert_array_equal(out[:30_000], want.toarray())
        return
    assert out.nnz < 8 * X.shape[0]  # some kept latents are 0: the arrays were trimmed, not views
    for a in (out.data, out.indices):  # not views (SciPy's prune) of n * k entries kept alive
        assert (a if a.base is None else a.base).nbytes == a.nbytes
    assert type(out) is type(want) and out.indices.dtype == out.indptr.dtype == np.int32
    np.testing.assert_array_equal(out.indptr[: 30_001], want.indptr)
    np.testing.assert_array_equal(out.indices[: want.nnz], want.indices)
    np.testing.assert_array_equal(out.data[: want.nnz], want.data)


def test_the_jacobian_is_built_in_place(pair, tmp_path):
    """Peak at most 1.3x the COO (28 bytes an entry) on 50,000 rows, the same entries as the plain
    concatenation.  Measured before (tracemalloc, this test): 2.1x; now 1.04x."""
    jsae = pair[1.0]
    np.save(tmp_path / "x.npy", np.random.default_rng(3).normal(size=(50_000, 8)).astype(np.float32))
    X = np.load(tmp_path / "x.npy", mmap_mode="r")
    jsae.jacobian(np.asarray(X[:100]))
    peak, J = _peak_bytes(lambda: jsae.jacobian(X))
    print("jacobian peak / output", round(peak / _output_bytes(J), 2))
    assert J.nnz == 50_000 * 64 and [c.dtype for c in J.coords] == [np.int64] * 3
    assert peak < 1.3 * _output_bytes(J)
    rows = np.asarray(X[:5000])
    _assert_same_coo(jsae.jacobian(rows), _plain_blocks_to_coo(list(jsae._iter_blocks(rows)), (5000,) + J.shape[1:]))


@settings(max_examples=40, deadline=None)
@given(n_out=st.integers(1, 300), n_in=st.integers(1, 300), k=st.integers(1, 6),
       batches=st.lists(st.integers(1, 40), min_size=1, max_size=5), seed=st.integers(0, 2**32 - 1))
def test_the_mean_abs_jacobian_adds_only_touched_pairs_with_the_same_sums(n_out, n_in, k, batches, seed):
    """AbsJacobianSum's dense total takes each batch's sums over the pairs it touches: bit for bit
    the full-length bincount it replaced (whatever the share of pairs a batch touches)."""
    from sklearn_jsae._sparse import AbsJacobianSum

    rng = np.random.default_rng(seed)
    total = AbsJacobianSum(n_out, n_in)
    plain = np.zeros(n_out * n_in)
    for B in batches:
        idx_out = np.stack([rng.choice(n_out, size=min(k, n_out), replace=False) for _ in range(B)])
        idx_in = np.stack([rng.choice(n_in, size=min(k, n_in), replace=False) for _ in range(B)])
        J = rng.normal(size=(B, idx_out.shape[1], idx_in.shape[1])).astype(np.float32)
        total.add(J, idx_out, idx_in)
        flat = (idx_out[:, :, None] * n_in + idx_in[:, None, :]).ravel()
        plain += np.bincount(flat, np.abs(J).ravel().astype(np.float64), minlength=plain.size)
    assert total.dense
    np.testing.assert_array_equal(total.total, plain)  # the running float64 sums, bit for bit


def test_the_mean_abs_jacobian_does_not_allocate_a_second_total_per_batch():
    from sklearn_jsae._sparse import AbsJacobianSum

    rng = np.random.default_rng(0)
    total = AbsJacobianSum(4096, 4096)  # dense: 134 MB of float64
    idx = np.stack([rng.choice(4096, size=32, replace=False) for _ in range(256)])
    J = rng.normal(size=(256, 32, 32)).astype(np.float32)
    peak, _ = _peak_bytes(lambda: total.add(J, idx, idx))
    assert peak < 0.25 * total.total.nbytes  # the batch's own arrays (21 MB); a full-length bincount: 1x


def test_an_in_memory_harvest_frees_each_arrays_chunks_before_building_the_next():
    from sklearn_jsae.hf._harvest import _MemorySink

    rng = np.random.default_rng(0)

    def harvest():
        sink = _MemorySink()
        for _ in range(40):  # 40 batches of 2,048 tokens, d = 256: X and Y 21 MB each
            sink.append("X", rng.normal(size=(2048, 256)).astype(np.float32))
            sink.append("Y", rng.normal(size=(2048, 256)).astype(np.float32))
            sink.append("token_ids", rng.integers(0, 100, size=2048))
        return sink.result(np.float32)

    peak, out = _peak_bytes(harvest)
    assert out["X"].shape == out["Y"].shape == (81_920, 256) and out["token_ids"].shape == (81_920,)
    built = sum(a.nbytes for a in out.values())
    assert peak < 1.7 * built  # chunks and arrays all at once: 2x; X's chunks freed before Y is built: 1.5x


def test_a_pass_over_a_store_in_order_does_not_index_every_row_first(tmp_path):
    """Inference, the metrics and the data statistics read a store's rows in order through
    ``_Rows.batches``, which built ``torch.arange(n)`` first: 8 bytes a row (8 GB before the first
    batch of a 10⁹-row store).  Measured as the growth of a fresh process's peak RSS (torch's
    allocations are not numpy's, so tracemalloc does not see them) over the first batches."""
    n = 20_000_000
    path = tmp_path / "store.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, 1))  # a sparse file: no disk
    script = f"""
import resource, numpy as np, torch
from sklearn_jsae._backend.train import _Rows
rows = _Rows(np.load({str(path)!r}, mmap_mode="r"), "cpu", torch.float32, resident=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
first, middle = next(rows.batches(4096, check_finite=True)), next(rows.batches(4096, span=({n // 2}, {n})))
assert first.shape == middle.shape == (4096, 1)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 0.25 * 8 * n  # arange(n): 160 MB; the two batches' own arrays: < 1 MB


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300_000), seed=st.integers(0, 2**63 - 1))
def test_an_epoch_order_in_int32_is_the_int64_permutation_and_leaves_the_generator_alike(n, seed):
    """Every seed's batch order (and so every model and figure made with it) is what int64 gave."""
    int64_generator = torch.Generator().manual_seed(seed)
    expected = torch.randperm(n, generator=int64_generator)
    generator = torch.Generator().manual_seed(seed)
    order = epoch_order(n, generator)
    assert order.dtype == torch.int32 and order.element_size() * order.numel() == 4 * n
    assert torch.equal(order.long(), expected)
    assert torch.equal(generator.get_state(), int64_generator.get_state())


def test_an_epoch_order_past_int32_is_int64(monkeypatch):
    monkeypatch.setattr(train_module, "INT32_ROWS", 99)
    assert epoch_order(99, torch.Generator().manual_seed(0)).dtype == torch.int32
    order = epoch_order(100, torch.Generator().manual_seed(0))
    assert order.dtype == torch.int64
    assert torch.equal(order, torch.randperm(100, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("kind", ["topk", "jsae"])
def test_a_fit_with_int32_epoch_orders_equals_one_with_int64(kind, monkeypatch):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(700, 12)).astype(np.float32)

    def fitted():
        params = dict(n_components=24, k=4, max_iter=3, batch_size=128, random_state=3)
        model = (TopKSparseAutoencoder(**params) if kind == "topk"
                 else JacobianSparseAutoencoder(mlp=lambda v: torch.tanh(v) * 2.0, l1=0.5, **params))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.fit(X)

    drawn = []
    randperm = torch.randperm

    def recording_randperm(*args, **kwargs):
        drawn.append(kwargs.get("dtype"))
        return randperm(*args, **kwargs)

    monkeypatch.setattr(torch, "randperm", recording_randperm)
    default = fitted()
    assert drawn == [torch.int32] * 3
    monkeypatch.setattr(train_module, "INT32_ROWS", 0)  # every order in int64, as before
    before = fitted()
    assert drawn[3:] == [torch.int64] * 3
    _assert_same_model(default, before)
