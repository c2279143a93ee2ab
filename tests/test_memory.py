"""``memory``: the l1-independent MLP pass is computed once and gives the same model.

A fit with a cache reads the MLP's outputs and local weights from a precomputed
:class:`~sklearn_jsae._backend.train.MLPPass` instead of running the MLP at every step.
These tests pin the cached route to the per-step route (bit-identical models), count how
often the pass is computed (once per distinct X, MLP and device, so once per fold of an
``l1`` sweep), and check the row-wise invariants the cache relies on.
"""

import warnings

import joblib
from sklearn.exceptions import ConvergenceWarning
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.utils._param_validation import InvalidParameterError

import sklearn_jsae._backend.train as train_module
from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae._backend.checkpoint import fingerprint_array
from sklearn_jsae._backend.jacobian import map_and_local_weights
from sklearn_jsae._backend.mlp import ElementwiseMLP, GatedMLP
from sklearn_jsae._backend.train import _Rows, compute_mlp_pass
from sklearn_jsae.datasets import make_synthetic_mlp

FAST = dict(n_components=48, k=4, max_iter=2, batch_size=128, random_state=0)


def _mlps():
    torch.manual_seed(0)
    X, elementwise = make_synthetic_mlp(600, 16, 64, random_state=0)
    _, gated = make_synthetic_mlp(600, 16, 64, gated=True, random_state=0)
    return X, {
        "elementwise": elementwise,
        "gated": gated,
        "linear": torch.nn.Linear(16, 12),
        "identity": None,
    }


def _same_model(a, b):
    for side in ("input_sae_", "output_sae_"):
        sa, sb = getattr(a, side), getattr(b, side)
        np.testing.assert_array_equal(sa.components_, sb.components_)
        np.testing.assert_array_equal(sa.encoder_, sb.encoder_)
    assert [row["loss"] for row in a.history_] == [row["loss"] for row in b.history_]
    assert (a.jacobian_ != b.jacobian_).nnz == 0


@pytest.mark.parametrize("kind", ["elementwise", "gated", "linear", "identity"])
def test_cached_fit_equals_per_step_fit(kind, tmp_path, mlp_pass_calls):
    X, mlps = _mlps()
    plain = JacobianSparseAutoencoder(mlps[kind], l1=0.5, **FAST).fit(X)
    first = JacobianSparseAutoencoder(mlps[kind], l1=0.5, memory=str(tmp_path), **FAST).fit(X)
    again = JacobianSparseAutoencoder(mlps[kind], l1=0.5, memory=tmp_path, **FAST).fit(X)  # a Path: the same cache
    assert len(mlp_pass_calls) == 1, "the second fit must read the cache"
    _same_model(plain, first)
    _same_model(plain, again)


@pytest.mark.parametrize("n, batch_size", [(385, 64), (386, 64), (4097, 1000)])
@pytest.mark.parametrize("gated", [False, True])
def test_cached_fit_equals_per_step_fit_with_a_short_last_batch(n, batch_size, gated, tmp_path):
    """A last minibatch (385, 386 rows) or a last 4,096-row chunk of the cached pass (4,097) of 1-3
    rows went through BLAS's small-matrix kernels on one route only: models 6e-8 apart."""
    X, mlp = make_synthetic_mlp(n, 16, 64, gated=gated, random_state=0)
    settings_ = {**FAST, "batch_size": batch_size, "max_iter": 2 if n < 1000 else 1}
    plain = JacobianSparseAutoencoder(mlp, l1=0.5, **settings_).fit(X)
    cached = JacobianSparseAutoencoder(mlp, l1=0.5, memory=tmp_path, **settings_).fit(X)
    _same_model(plain, cached)


@pytest.mark.parametrize("damage", ["inf", "rows", "not a pass", "cut short"])
def test_a_damaged_cache_entry_is_computed_again(damage, tmp_path):
    """joblib checks that an entry unpickles, not what it holds: an inf in the cached outputs
    stopped every later fit with "diverged ... learning_rate too large"."""
    X, mlps = _mlps()
    plain = JacobianSparseAutoencoder(mlps["elementwise"], l1=0.5, **FAST).fit(X)
    JacobianSparseAutoencoder(mlps["elementwise"], l1=0.5, memory=tmp_path, **FAST).fit(X)
    (entry,) = tmp_path.rglob("output.pkl")
    result = joblib.load(entry)
    if damage == "inf":
        result.outputs[3, 1] = np.inf
    elif damage in ("rows", "cut short"):
        result.outputs = result.outputs[:-1]
    else:
        result = {"outputs": result.outputs}
    joblib.dump(result, entry)
    if damage == "cut short":  # no longer unpickles: joblib's own warning, and it computes it again
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    warned = "the memory cache's MLP pass for this X .*; it is computed again" if damage != "cut short" else ""
    with pytest.warns(UserWarning, match=warned):
        again = JacobianSparseAutoencoder(mlps["elementwise"], l1=0.5, memory=tmp_path, **FAST).fit(X)
    _same_model(plain, again)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the entry was replaced: no second warning
        warnings.simplefilter("ignore", ConvergenceWarning)
        _same_model(plain, JacobianSparseAutoencoder(mlps["elementwise"], l1=0.5, memory=tmp_path, **FAST).fit(X))


def test_a_cache_that_cannot_be_written_still_gives_the_fit(tmp_path, monkeypatch):
    """A full disk: joblib warns that it cannot store the pass; the fit went on to read the entry
    back and failed with a KeyError ("Non-existing item")."""
    import errno

    X, mlps = _mlps()
    plain = JacobianSparseAutoencoder(mlps["elementwise"], l1=0.5, **FAST).fit(X)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(joblib.numpy_pickle, "dump", disk_full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joblib's own warning that it could not persist the output
        cached = JacobianSparseAutoencoder(mlps["elementwise"], l1=0.5, memory=tmp_path, **FAST).fit(X)
    _same_model(plain, cached)


def test_memmapped_cache_equals_per_step_fit(tmp_path, mlp_pass_calls):
    """``mmap_mode="r"`` reads rows from disk in shuffled batches; they must stay paired with X."""
    X, mlps = _mlps()
    memory = joblib.Memory(tmp_path, mmap_mode="r", verbose=0)
    plain = JacobianSparseAutoencoder(mlps["gated"], **FAST).fit(X)
    JacobianSparseAutoencoder(mlps["gated"], memory=memory, **FAST).fit(X)
    mapped = JacobianSparseAutoencoder(mlps["gated"], memory=memory, **FAST).fit(X)
    assert len(mlp_pass_calls) == 1
    _same_model(plain, mapped)


def test_cache_key_is_data_mlp_and_not_l1(tmp_path, mlp_pass_calls):
    X, mlps = _mlps()
    mlp = mlps["elementwise"]
    for l1 in (0.0, 0.5, 2.0):
        JacobianSparseAutoencoder(mlp, l1=l1, memory=str(tmp_path), **FAST).fit(X)
    JacobianSparseAutoencoder(mlp, l1=1.0, n_components=32, k=3, max_iter=1, memory=str(tmp_path)).fit(X)
    assert len(mlp_pass_calls) == 1, "l1 and the SAE settings are not part of the key"

    JacobianSparseAutoencoder(mlp, memory=str(tmp_path), **FAST).fit(X[:500])
    assert len(mlp_pass_calls) == 2, "other data must miss the cache"

    changed = make_synthetic_mlp(600, 16, 64, random_state=1)[1]
    JacobianSparseAutoencoder(changed, memory=str(tmp_path), **FAST).fit(X)
    assert len(mlp_pass_calls) == 3, "other MLP weights must miss the cache"

    gelu_tanh = ElementwiseMLP(mlp.W_in, mlp.b_in, mlp.W_out, mlp.b_out, "gelu_tanh")
    JacobianSparseAutoencoder(gelu_tanh, memory=str(tmp_path), **FAST).fit(X)
    assert len(mlp_pass_calls) == 4, "another activation must miss the cache"


def test_a_cache_written_by_another_version_is_not_read(tmp_path, mlp_pass_calls, monkeypatch):
    """joblib keys a cached function by its own code, not by the code it calls: an upgrade that
    changed how the pass is computed would have read the older version's cache."""
    import sklearn_jsae

    X, mlps = _mlps()
    JacobianSparseAutoencoder(mlps["elementwise"], memory=str(tmp_path), **FAST).fit(X)
    JacobianSparseAutoencoder(mlps["elementwise"], memory=str(tmp_path), **FAST).fit(X)
    assert len(mlp_pass_calls) == 1
    monkeypatch.setattr(sklearn_jsae, "__version__", sklearn_jsae.__version__ + ".post1")
    JacobianSparseAutoencoder(mlps["elementwise"], memory=str(tmp_path), **FAST).fit(X)
    assert len(mlp_pass_calls) == 2


def test_grid_search_over_l1_runs_the_mlp_pass_once_per_fold(tmp_path, mlp_pass_calls):
    X, mlps = _mlps()
    search = GridSearchCV(
        JacobianSparseAutoencoder(mlps["elementwise"], memory=str(tmp_path), **FAST),
        {"l1": [0.0, 0.5, 2.0]}, cv=3,
    ).fit(X)
    assert len(mlp_pass_calls) == 3 + 1, "three folds and the refit on all of X"
    uncached = GridSearchCV(
        JacobianSparseAutoencoder(mlps["elementwise"], **FAST), {"l1": [0.0, 0.5, 2.0]}, cv=3,
    ).fit(X)
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"], uncached.cv_results_["mean_test_score"])


def test_warm_start_with_cache_equals_warm_start_without(tmp_path):
    X, mlps = _mlps()
    plain = JacobianSparseAutoencoder(mlps["gated"], warm_start=True, **FAST).fit(X[:400]).fit(X)
    cached = JacobianSparseAutoencoder(mlps["gated"], warm_start=True, memory=str(tmp_path), **FAST)
    cached.fit(X[:400]).fit(X)
    _same_model(plain, cached)


def test_callable_without_closed_form_is_not_cached(tmp_path, mlp_pass_calls):
    X, mlps = _mlps()
    mlp = mlps["elementwise"]

    def through_module(x):
        return mlp(x)

    plain = JacobianSparseAutoencoder(through_module, **FAST).fit(X)
    cached = JacobianSparseAutoencoder(through_module, memory=str(tmp_path), **FAST).fit(X)
    assert mlp_pass_calls == []
    _same_model(plain, cached)


@pytest.mark.parametrize("memory", [3, ["cache"], object()])
def test_bad_memory_names_the_parameter(memory):
    X, mlps = _mlps()
    with pytest.raises(InvalidParameterError, match="'memory' parameter"):
        JacobianSparseAutoencoder(mlps["elementwise"], memory=memory, **FAST).fit(X)


# (one row has no spread, and says so: not what this test is about)
@pytest.mark.filterwarnings(r"ignore:the mlp's outputs are \(almost\) constant:UserWarning")
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    batch_size=st.integers(1, 50),
    gated=st.booleans(),
    scale_x=st.floats(0.1, 10),
    seed=st.integers(0, 2**16),
)
def test_mlp_pass_rows_equal_the_step_computation(n, batch_size, gated, scale_x, seed):
    """Row-wise: any batching gives what the training step computes on the whole array."""
    generator = torch.Generator().manual_seed(seed)
    d_in, d_mlp, d_out = 5, 7, 3
    W = [torch.randn(a, b, generator=generator, dtype=torch.float64) for a, b in
         ((d_in, d_mlp), (d_in, d_mlp), (d_mlp, d_out))]
    mlp = (GatedMLP(W[0], W[1], W[2], activation="silu") if gated
           else ElementwiseMLP(W[0], torch.randn(d_mlp, generator=generator, dtype=torch.float64), W[2], None, "gelu"))
    X = torch.randn(n, d_in, generator=generator, dtype=torch.float64).numpy()
    result = compute_mlp_pass(X, mlp, scale_x, dtype=torch.float64, batch_size=batch_size)

    outputs = mlp(torch.from_numpy(X))
    mean, scale_y = outputs.mean(0), train_module.data_statistics(_Rows(X, "cpu", torch.float64), mlp)[1]
    y, weights = map_and_local_weights(mlp.rescaled(scale_x, scale_y), torch.from_numpy(X) / scale_x)
    assert result.scale_y == pytest.approx(scale_y, rel=1e-12)
    np.testing.assert_allclose(result.mean_y, mean.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.outputs, y.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.weights, weights.numpy(), rtol=1e-12, atol=1e-12)
    assert result.weights.shape == (n, 2 if gated else 1, d_mlp)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 30), view=st.sampled_from(["whole", "slice", "asarray", "nested", "one of a stride"]))
def test_memmapped_rows_come_back_in_the_requested_order(tmp_path_factory, data, n, view):
    """Property: the rows read from a store (through pread, not the mapping) are the rows asked
    for, of the store or of any row range of it: a slice ``mm[s:]`` is a memmap with its parent's
    offset, and was read from the file's first rows."""
    path = tmp_path_factory.mktemp("rows") / "rows.npy"
    array = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    np.save(path, array)
    start = data.draw(st.integers(0, n - 1)) if view != "whole" else 0
    store = np.load(path, mmap_mode="r")
    X = {"whole": store, "slice": store[start:], "asarray": np.asarray(store[start:]),
         "nested": store[start:][: n - start],
         # one row of a strided view: C-contiguous, but its row stride is the view's
         "one of a stride": store[::2][start // 2: start // 2 + 1]}[view]
    expected = array[::2][start // 2: start // 2 + 1] if view == "one of a stride" else array[start:]
    rows = _Rows(X, "cpu", torch.float32)
    assert rows.tensor is None and rows.file is not None, "a memmap must be read per batch, from the file"
    index = data.draw(st.lists(st.integers(0, len(expected) - 1), min_size=1, max_size=2 * n))
    taken = rows.take(torch.tensor(index))
    np.testing.assert_array_equal(taken.numpy(), expected[index])


def test_a_copy_on_write_memmap_is_read_with_its_edits(tmp_path):
    """``mmap_mode="c"``: edits live in memory only, so the rows are not read from the file."""
    np.save(tmp_path / "X.npy", np.zeros((6, 3), np.float32))
    X = np.load(tmp_path / "X.npy", mmap_mode="c")
    X[2] = 7.0
    edited = np.array(X)
    rows = _Rows(X, "cpu", torch.float32)
    assert rows.file is None
    np.testing.assert_array_equal(rows.take(torch.tensor([2, 0])).numpy(), edited[[2, 0]])
    # Releasing a copy-on-write mapping's pages dropped the edits: the caller's own array changed.
    fingerprint_array(X[1:])
    np.testing.assert_array_equal(X, edited)
    model = TopKSparseAutoencoder(n_components=4, k=1, max_iter=1, random_state=0)
    np.testing.assert_array_equal(model.fit(X).components_, clone(model).fit(edited).components_)
    np.testing.assert_array_equal(X, edited)


def test_a_fit_on_a_row_range_of_a_store_is_the_fit_on_those_rows(tmp_path):
    """``np.load(store, mmap_mode="r")[n:]`` (a train/test split of a harvest store) trained, scored
    and encoded the store's first rows instead: the model is the one fitted on the rows in memory."""
    data, mlps = _mlps()
    X = np.concatenate([data[:300] * 50 + 20, data[300:]]).astype(np.float32)  # the first rows differ
    np.save(tmp_path / "X.npy", X)
    held = np.load(tmp_path / "X.npy", mmap_mode="r")[300:]
    mlp = mlps["elementwise"]
    from_store = JacobianSparseAutoencoder(mlp, **FAST).fit(held)
    in_memory = JacobianSparseAutoencoder(mlp, **FAST).fit(np.array(held))
    _same_model(from_store, in_memory)
    assert from_store.score(held) == in_memory.score(X[300:])
    assert (abs(from_store.transform(held) - in_memory.transform(X[300:])) > 0).nnz == 0
