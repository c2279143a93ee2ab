"""Memory that must not grow with the rows of a store (the paper's scale: 300M tokens on disk).

Each test measures numpy's allocations with ``tracemalloc`` (exact accounting, not a timing) on
an input large enough that a copy proportional to it would dominate, and bounds the peak by a
fraction of that copy:

* ``partial_fit`` on a float16 memory-mapped store read it whole into a float32 copy (twice the
  file) before training; a float32 store was scanned through its mapping;
* ``metrics.linearity`` permuted every row index (8 bytes a row: 2.4 GB for 300M rows) to sample
  its 256 rows;
* ``inverse_transform`` held two reconstructions and a bool array of the output at its peak.
"""

import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae.exceptions import NonFiniteTrainingError
from sklearn_jsae.metrics import _linearity


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
