"""Data at its extremes: NaN named by row, codes and Jacobians that are not what the library
returns, tensors without values, and first rows without spread.  Each test failed on the code
before it (a silent wrong result, a NaN, or an error that named nothing useful)."""

import pickle
import threading
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae._backend.distributed import DataParallel
from sklearn_jsae._backend.train import _Rows, data_statistics
from sklearn_jsae._sparse import blocks_to_coo
from sklearn_jsae.metrics import global_jacobian_sparsity, jacobian_sparsity

FAST = dict(n_components=32, k=4, max_iter=2, batch_size=64, device="cpu", random_state=0)


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))


@pytest.fixture(scope="module")
def sae(X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TopKSparseAutoencoder(**FAST).fit(X)


@pytest.fixture(scope="module")
def jsae(X, mlp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return JacobianSparseAutoencoder(mlp, **FAST).fit(X)


def _state(estimator):
    return pickle.dumps({k: v for k, v in vars(estimator).items() if k != "_trainer"})


# --- NaN and inf in X: the row, not scikit-learn's advice about imputers -----------------------


@settings(max_examples=20, deadline=None)
@given(rows=st.lists(st.integers(0, 199), min_size=1, max_size=5, unique=True),
       value=st.sampled_from([np.nan, np.inf, -np.inf]), column=st.integers(0, 15))
def test_nan_or_inf_in_X_names_the_first_row_and_the_count(sae, X, rows, value, column):
    bad = X.copy()
    bad[rows, column] = value
    before = _state(sae)
    with pytest.raises(ValueError, match=rf"X contains NaN or inf in row {min(rows)} \({len(rows)} row\(s\) in all\)"):
        sae.transform(bad)
    assert _state(sae) == before


@pytest.mark.parametrize("call", ["fit", "partial_fit", "transform", "jacobian", "score"])
def test_every_entry_point_names_the_row_of_a_nan(jsae, X, call):
    bad = X.copy()
    bad[37, 3] = np.nan
    target = JacobianSparseAutoencoder(jsae.mlp, **FAST) if call in ("fit", "partial_fit") else jsae
    with pytest.raises(ValueError, match=r"X contains NaN or inf in row 37 .*X\[np.isfinite\(X\).all\(axis=1\)\]") as info:
        getattr(target, call)(bad)
    assert "HistGradientBoosting" not in str(info.value)


def test_the_finite_check_scans_in_chunks_and_counts_every_chunk(X):
    from sklearn_jsae._validation import check_finite_rows

    bad = np.tile(X, (3, 1))
    bad[[450, 5, 210], 2] = np.inf
    with pytest.raises(ValueError, match=r"row 5 \(3 row\(s\) in all\)"):
        check_finite_rows(bad, chunk_rows=100)
    check_finite_rows(np.full((4, 3), 3e38, dtype=np.float32))  # finite, though its sum overflows float32
    check_finite_rows(np.full((4, 3), 1e308))  # and float64's: the row scan finds nothing


def test_a_float64_memmap_beyond_float32_names_X_without_a_cast_warning(tmp_path, X, mlp):
    path = tmp_path / "X.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=X.shape)
    big[:] = X
    big[0, 0] = 1e40
    big.flush()
    X_map = np.load(path, mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(Exception, match="X contains NaN or inf"):
            JacobianSparseAutoencoder(mlp, **FAST).fit(X_map)


# --- tensors that hold no values ---------------------------------------------------------------


@pytest.mark.parametrize("call", ["transform", "fit", "jacobian", "inverse_transform"])
def test_a_meta_tensor_is_refused_by_name(jsae, call):
    width = jsae.n_components if call == "inverse_transform" else 16
    before = _state(jsae)
    with pytest.raises(ValueError, match="X is a tensor on the meta device, which holds shapes but no values"):
        getattr(jsae, call)(torch.empty(3, width, device="meta"))
    assert _state(jsae) == before


def test_an_mlp_on_the_meta_device_is_refused_by_name(X):
    mlp = torch.nn.Linear(16, 16, device="meta")
    with pytest.raises(ValueError, match=r"mlp \(Linear\) has parameters on the meta device.*to_empty"):
        JacobianSparseAutoencoder(mlp, **FAST).fit(X)


# --- codes that are not codes ------------------------------------------------------------------


@pytest.mark.parametrize("side", ["input", "output", "sae"])
def test_a_3d_sparse_array_is_not_decoded(jsae, sae, X, side):
    J = jsae.jacobian(X[:2])  # (2, 32, 32): shape[1] equals n_components, so it broadcast
    decode = {"input": jsae.inverse_transform, "output": jsae.inverse_transform_output,
              "sae": sae.inverse_transform}[side]
    with pytest.raises(ValueError, match=r"X must be 2-D codes of shape \(n_samples, 32\); got a sparse array of shape \(2, 32, 32\)"):
        decode(J)


@pytest.mark.parametrize("dtype, value", [(np.float32, 3e38), (np.float64, 1e308)])
def test_codes_whose_reconstruction_overflows_are_named(sae, dtype, value):
    codes = np.zeros((3, 32), dtype=dtype)
    codes[1] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match=r"reconstruction of row 1 of X \(and of 1 row\(s\) in all\) overflows"):
            sae.inverse_transform(codes)
    assert np.isfinite(sae.inverse_transform(codes[[0, 2]])).all()


# --- Jacobian arrays: duplicates, NaN, complex -------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 4), width=st.integers(4, 12), seed=st.integers(0, 2**16))
def test_blocks_become_a_canonical_coo_with_the_blocks_values(n, k, width, seed):
    """The entries come sorted and unique, so SciPy's canonical flag is true and readers skip a sort."""
    rng = np.random.default_rng(seed)
    k = min(k, width)
    J = rng.normal(size=(n, k, k)).astype(np.float32)
    idx_out = np.stack([rng.choice(width, k, replace=False) for _ in range(n)])
    idx_in = np.stack([rng.choice(width, k, replace=False) for _ in range(n)])
    coo = blocks_to_coo([(J[: n // 2], idx_out[: n // 2], idx_in[: n // 2]), (J[n // 2 :], idx_out[n // 2 :], idx_in[n // 2 :])],
                        (n, width, width))
    dense = np.zeros((n, width, width), dtype=np.float32)
    for t in range(n):
        dense[t][np.ix_(idx_out[t], idx_in[t])] = J[t]
    np.testing.assert_array_equal(coo.todense(), dense)
    assert coo.has_canonical_format
    flat = np.ravel_multi_index(coo.coords, coo.shape)
    assert (np.diff(flat) > 0).all()  # what the flag promises: sorted, no repeats


@settings(max_examples=15, deadline=None)
@given(split=st.floats(-2, 3), seed=st.integers(0, 2**16))
def test_repeated_coordinates_count_as_their_sum(jsae, X, split, seed):
    """SciPy's meaning of a repeated coordinate is the sum; both metrics now read it so (they
    counted each part as an entry, and disagreed with each other)."""
    J = jsae.jacobian(X[:6])
    order = np.random.default_rng(seed).permutation(J.nnz)
    parts = sp.coo_array((np.r_[J.data * split, J.data * (1 - split)][np.r_[order, order + J.nnz]],
                          tuple(np.r_[c, c][np.r_[order, order + J.nnz]] for c in J.coords)), shape=J.shape)
    assert jacobian_sparsity(parts) == pytest.approx(jacobian_sparsity(J))
    assert global_jacobian_sparsity(parts) == pytest.approx(global_jacobian_sparsity(J))


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("metric", [jacobian_sparsity, global_jacobian_sparsity])
def test_a_jacobian_array_with_nan_or_inf_names_the_sample(jsae, X, value, metric):
    J = jsae.jacobian(X[:5])
    J.data[np.flatnonzero(J.coords[0] == 3)[7]] = value
    with pytest.raises(ValueError, match=r"holds NaN or inf \(1 of its entries, the first in sample 3\)"):
        metric(J)


def test_a_complex_jacobian_array_is_refused(jsae, X):
    J = jsae.jacobian(X[:3])
    complex_J = sp.coo_array((J.data.astype(np.complex64), J.coords), shape=J.shape)
    with pytest.raises(ValueError, match="must hold real numbers, got dtype complex64"):
        jacobian_sparsity(complex_J)


# --- first rows without spread: the scale they set would describe nothing ------------------------


@pytest.mark.parametrize("first", ["one_row", "equal_rows"])
@pytest.mark.parametrize("cls", [TopKSparseAutoencoder, JacobianSparseAutoencoder])
def test_a_first_partial_fit_without_spread_is_refused(X, first, cls):
    rows = X[:1] if first == "one_row" else np.tile(X[:1], (50, 1))
    estimator = cls(**FAST)
    with pytest.raises(ValueError, match=r"the rows of partial_fit's first call set the data scales .* no spread"):
        estimator.partial_fit(rows)
    assert not hasattr(estimator, "scale_" if cls is TopKSparseAutoencoder else "input_sae_")
    estimator.partial_fit(X * 1e3)  # what then diverged, blaming the learning rate
    assert np.isfinite(estimator.score(X * 1e3))


def test_a_fitted_model_continues_on_a_batch_without_spread(X):
    """A warm start keeps its fitted scales: such a batch sets nothing, is trained on, and does
    not warn that the SAE can only learn its mean."""
    sae = TopKSparseAutoencoder(**FAST).fit(X)
    epochs, scale = len(sae.history_), sae.scale_
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sae.partial_fit(X[:1])
    assert len(sae.history_) == epochs + 1 and "call" in sae.history_[-1] and sae.scale_ == scale


def test_a_stream_whose_first_rows_have_no_spread_is_refused(X, mlp):
    batches = [np.zeros((100, 16), dtype=np.float32), X * 1e3]
    with pytest.raises(ValueError, match=r"the stream's first 100 rows \(n_statistics=100\) set the data scales"):
        JacobianSparseAutoencoder(mlp, **FAST).fit_stream(iter(batches), n_statistics=100)


def test_an_mlp_constant_on_the_first_partial_fit_is_refused(X):
    mlp = torch.nn.Linear(16, 16)
    with torch.no_grad():
        mlp.weight.zero_()
    with pytest.raises(ValueError, match=r"but the mlp's outputs on them have \(almost\) no spread"):
        JacobianSparseAutoencoder(mlp, **FAST).partial_fit(X)


def test_from_saes_refuses_X_without_spread(jsae, mlp):
    """The pair's scales (its penalty, its normalised Jacobian) came out as 1 whatever the SAEs."""
    with pytest.raises(ValueError, match="X given to from_saes sets the pair's data scales, but they have"):
        JacobianSparseAutoencoder.from_saes(mlp, jsae.input_sae_, jsae.output_sae_, np.ones((50, 16), np.float32))


class _ThreadRanks(DataParallel):
    """Ranks as threads of this process: ``all_reduce`` sums every thread's tensor through a
    barrier, so the statistics merge runs its real arithmetic without a process group."""

    def __init__(self, rank, world_size, barrier, slots):
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")
        self._barrier, self._slots = barrier, slots

    def all_reduce(self, tensor, what, op=None):
        self._slots[self.rank] = tensor.clone()
        self._barrier.wait()
        tensor.copy_(sum(self._slots))  # the same order on every rank
        self._barrier.wait()
        return tensor


def _statistics_on_ranks(X, batch_size, world_size):
    """data_statistics of X split into ``world_size`` contiguous parts, one thread per rank."""
    bounds = np.linspace(0, len(X), world_size + 1).astype(int)
    barrier, slots, results = threading.Barrier(world_size), [None] * world_size, [None] * world_size

    def rank(r):
        parallel = _ThreadRanks(r, world_size, barrier, slots) if world_size > 1 else None
        part = (int(bounds[r]), int(bounds[r + 1])) if world_size > 1 else None
        results[r] = data_statistics(_Rows(X, "cpu", torch.float64), batch_size=batch_size, part=part,
                                     parallel=parallel)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@settings(max_examples=25, deadline=None)
@given(offset=st.floats(1e3, 5e4), world_size=st.integers(1, 3), batch_size=st.sampled_from([1, 3, 8]),
       seed=st.integers(0, 2**16))
def test_the_data_scale_of_rows_far_from_zero_is_exact(offset, world_size, batch_size, seed):
    """``Σ v² / n - mean²`` cancelled when the mean is large against the spread, with an error
    growing with the batches summed (1.6% of the scale at 10⁹ rows for mean / spread = 1e5):
    sums around the first batch's mean, merged across ranks by Chan's formula, match a two-pass
    float64 reference whatever the rows' split."""
    rng = np.random.default_rng(seed)
    X = offset + rng.normal(size=(1500, 3)) * rng.uniform(0.5, 2.0, size=3)
    reference_mean = X.mean(0)
    reference_scale = np.sqrt(((X - reference_mean) ** 2).mean())
    for mean, scale in _statistics_on_ranks(X, batch_size, world_size):  # every rank gets the union's
        np.testing.assert_allclose(mean.numpy(), reference_mean, rtol=1e-14)
        assert scale == pytest.approx(reference_scale, rel=1e-10)


def test_a_rank_without_rows_to_measure_says_so_before_the_merge():
    """A rank whose part is empty cannot join the statistics' merge with a mean: it raises naming
    itself and the rows, before any collective."""
    barrier, slots = threading.Barrier(2), [None, None]
    X = np.random.default_rng(0).normal(size=(1, 3))
    with pytest.raises(ValueError, match=r"distributed=True: rank 1 has no rows to measure the data statistics on "
                                         r"\(1 rows for 2 ranks\); give every rank at least one row"):
        data_statistics(_Rows(X, "cpu", torch.float64), batch_size=4, part=(1, 1),
                        parallel=_ThreadRanks(1, 2, barrier, slots))
    assert slots == [None, None]  # nothing was all-reduced
