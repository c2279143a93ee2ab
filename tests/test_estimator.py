"""scikit-learn citizenship and the estimators' behaviour."""

import pickle

import joblib
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import check_param_validation, parametrize_with_checks

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder

# Small, fast settings for the common checks.  k=1 because several checks set n_components=1,
# and k > n_components is (rightly) an error.
FAST = dict(n_components=12, k=1, max_iter=2, batch_size=16)

# Every expected failure of the common checks, with the reason (none so far).
EXPECTED_FAILED_CHECKS = {}


def _estimators():
    return [TopKSparseAutoencoder(**FAST), JacobianSparseAutoencoder(**FAST)]


@parametrize_with_checks(_estimators(), expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.mark.parametrize("estimator", _estimators(), ids=lambda e: type(e).__name__)
def test_param_validation(estimator):
    check_param_validation(type(estimator).__name__, estimator)


@pytest.fixture(scope="module")
def gelu_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 40), torch.nn.GELU(), torch.nn.Linear(40, 10))


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(30, 10))
    codes = rng.exponential(size=(600, 30)) * (rng.random((600, 30)) < 0.1)
    return (codes @ basis).astype(np.float32)


def _small(mlp, **kw):
    return JacobianSparseAutoencoder(mlp=mlp, **{**dict(n_components=32, k=4, max_iter=4, batch_size=64,
                                                     random_state=0), **kw})


def test_default_call_api_shapes(X, gelu_mlp):
    jsae = _small(gelu_mlp, n_output_components=24).fit(X)
    S = jsae.transform(X)
    assert isinstance(S, sp.csr_array) and S.shape == (600, 32) and S.has_canonical_format
    assert np.diff(S.indptr).max() <= 4
    J = jsae.jacobian(X[:50])
    assert isinstance(J, sp.coo_array) and J.shape == (50, 24, 32)
    assert isinstance(jsae.jacobian_, sp.csr_array) and jsae.jacobian_.shape == (24, 32)
    assert jsae.input_sae_.components_.shape == (32, 10)
    assert jsae.output_sae_.components_.shape == (24, 10)
    np.testing.assert_allclose(np.linalg.norm(jsae.input_sae_.components_, axis=1), 1, rtol=1e-5)
    assert jsae.inverse_transform(S).shape == X.shape
    assert list(jsae.get_feature_names_out()[:2]) == ["jacobiansparseautoencoder0", "jacobiansparseautoencoder1"]
    assert jsae.n_features_in_ == 10 and jsae.n_output_features_ == 10
    assert len(jsae.history_) == 4 and {"mse_input", "mse_output", "jacobian_l1", "l1"} <= set(jsae.history_[0])
    assert len(jsae.input_sae_.history_) == 4 and "mse" in jsae.input_sae_.history_[0]


def test_identity_default_call_works():
    X = np.random.default_rng(1).normal(size=(300, 6)).astype(np.float32)
    jsae = JacobianSparseAutoencoder(k=3, l1=1e-2, n_components=16, max_iter=2).fit(X)
    assert jsae.mlp_ is None
    np.testing.assert_allclose(jsae.mlp_outputs(X), X)


def test_jacobian_mean_matches_blocks(X, gelu_mlp):
    jsae = _small(gelu_mlp).fit(X)
    J = jsae.jacobian(X)
    dense_mean = np.abs(J.toarray()).mean(axis=0)
    np.testing.assert_allclose(jsae.jacobian_.toarray(), dense_mean, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def fitted_small(X, gelu_mlp):
    return _small(gelu_mlp).fit(X)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 600), limit=st.integers(1, 700))
def test_jacobian_mean_beyond_the_row_limit_uses_every_sth_row(fitted_small, X, n, limit):
    """Past ``_JACOBIAN_ROWS`` rows, jacobian_ is the mean over every s-th row, s = ceil(n / limit):
    at most ``limit`` rows, spread from the first to within s of the last."""
    from unittest import mock

    from sklearn_jsae import _estimator

    with mock.patch.object(_estimator, "_JACOBIAN_ROWS", limit):
        got = fitted_small._mean_abs_jacobian(X[:n]).toarray()
    step = -(-n // limit)
    rows = X[:n][::step]
    assert len(rows) <= limit and (n - 1) - step * (len(rows) - 1) < step
    expected = np.abs(fitted_small.jacobian(rows).toarray()).mean(axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_torch_tensors_are_read_as_numpy_arrays(X, gelu_mlp, dtype):
    """Activations harvested as tensors (bf16, fp16, attached to a graph): the same model, codes and
    score as their values as a numpy array, through fit, fit_stream and the metrics."""
    from sklearn_jsae.metrics import reconstruction_metrics

    tensor = torch.from_numpy(X).to(dtype).requires_grad_(True)
    values = tensor.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).numpy()
    from_tensor, from_array = _small(gelu_mlp).fit(tensor), _small(gelu_mlp).fit(values)
    np.testing.assert_array_equal(from_tensor.input_sae_.components_, from_array.input_sae_.components_)
    assert (from_tensor.transform(tensor) != from_array.transform(values)).nnz == 0
    assert from_tensor.score(tensor) == from_array.score(values)
    assert reconstruction_metrics(from_tensor, tensor) == reconstruction_metrics(from_array, values)
    streamed = _small(gelu_mlp).fit_stream(iter([tensor[:300], tensor[300:]]), n_statistics=300)
    expected = _small(gelu_mlp).fit_stream(iter([values[:300], values[300:]]), n_statistics=300)
    np.testing.assert_array_equal(streamed.output_sae_.encoder_, expected.output_sae_.encoder_)


def _plain_explained_variance(Z, Z_hat):
    """``score``'s plain twin: the whole arrays at once, in float64."""
    Z = np.asarray(Z, dtype=np.float64)
    residual = ((Z - Z_hat) ** 2).sum()
    total = ((Z - Z.mean(axis=0)) ** 2).sum()
    return 1.0 - residual / total if total > 0 else float(residual == 0)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 300), identical=st.booleans(), seed=st.integers(0, 2**16))
def test_score_is_the_explained_variance_of_the_reconstructions(fitted_small, X, n, identical, seed):
    """score (batch by batch) against the plain twin on the decoded codes, for the pair and for one
    SAE, including rows without variance (one row, identical rows)."""
    rows = np.random.default_rng(seed).normal(size=(n, X.shape[1])) * X.std(0) + X.mean(0)
    rows = rows.astype(np.float32)
    if identical:
        rows = np.repeat(rows[:1], n, axis=0)
    jsae = fitted_small
    ev_x = _plain_explained_variance(rows, jsae.inverse_transform(jsae.transform(rows)))
    ev_y = _plain_explained_variance(jsae.mlp_outputs(rows),
                                     jsae.inverse_transform_output(jsae.transform_output(rows)))
    assert jsae.score(rows) == pytest.approx((ev_x + ev_y) / 2, rel=1e-4, abs=1e-5)
    assert jsae.input_sae_.score(rows) == pytest.approx(ev_x, rel=1e-4, abs=1e-5)


def test_score_of_a_memmap_checks_each_batch_and_names_the_row(fitted_small, X, tmp_path):
    """score and the metrics read a memmap batch by batch (linearity: its sampled rows), without
    scanning it first: each batch is checked, and the error names the row."""
    from sklearn_jsae.metrics import (
        global_jacobian_sparsity,
        intervention_agreement,
        jacobian_sparsity,
        linearity,
        reconstruction_metrics,
    )

    path = tmp_path / "X.npy"
    store = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=X.shape)
    store[:] = X
    store[437, 3] = np.nan
    store.flush()
    del store
    mapped = np.load(path, mmap_mode="r")
    message = r"X has NaN, inf or values beyond float32's range \(about 3.4e38\) in row 437; remove or clip"
    for estimator in (fitted_small, fitted_small.input_sae_):
        with pytest.raises(ValueError, match=message):
            estimator.score(mapped)
    with pytest.raises(ValueError, match=message):  # in the fifth batch
        reconstruction_metrics(fitted_small, mapped, batch_size=100)
    for metric in (jacobian_sparsity, global_jacobian_sparsity, intervention_agreement):
        with pytest.raises(ValueError, match=message):
            metric(fitted_small, mapped)
    with pytest.raises(ValueError, match=message):  # every row sampled, so row 437 among them
        linearity(fitted_small, mapped, n_samples=len(X), n_pairs=1, n_points=4)
    for method in (fitted_small.transform, fitted_small.transform_output, fitted_small.mlp_outputs,
                   fitted_small.jacobian, fitted_small.input_sae_.transform):
        with pytest.raises(ValueError, match=message):
            method(mapped)
    with pytest.raises(ValueError, match=r"X contains NaN or inf in row 437 "):  # in memory: scanned up front
        fitted_small.score(np.array(mapped))
    clean = np.load(path, mmap_mode="r")[:400]
    assert fitted_small.score(clean) == pytest.approx(fitted_small.score(X[:400]), abs=1e-12)
    assert jacobian_sparsity(fitted_small, clean) == jacobian_sparsity(fitted_small, X[:400])
    half = tmp_path / "X16.npy"  # a float16 store: read as its float32 values, batch by batch
    np.save(half, X[:400].astype(np.float16))
    values = X[:400].astype(np.float16).astype(np.float32)
    store = np.load(half, mmap_mode="r")
    assert global_jacobian_sparsity(fitted_small, store) == global_jacobian_sparsity(fitted_small, values)
    assert (fitted_small.transform(store) != fitted_small.transform(values)).nnz == 0
    assert (fitted_small.transform_output(store) != fitted_small.transform_output(values)).nnz == 0
    np.testing.assert_array_equal(fitted_small.mlp_outputs(store), fitted_small.mlp_outputs(values))
    np.testing.assert_array_equal(fitted_small.jacobian(store).toarray(), fitted_small.jacobian(values).toarray())
    assert intervention_agreement(fitted_small, store[:60]) == intervention_agreement(fitted_small, values[:60])
    assert linearity(fitted_small, store, n_samples=30, n_points=8, random_state=0) \
        == linearity(fitted_small, values, n_samples=30, n_points=8, random_state=0)


def test_fit_averages_jacobian_over_the_row_limit(X, gelu_mlp, monkeypatch):
    from sklearn_jsae import _estimator

    monkeypatch.setattr(_estimator, "_JACOBIAN_ROWS", 128)  # X has 600 rows: every 5th
    jsae = _small(gelu_mlp).fit(X)
    every_fifth = np.abs(jsae.jacobian(X[::5]).toarray()).mean(axis=0)
    np.testing.assert_allclose(jsae.jacobian_.toarray(), every_fifth, rtol=1e-4, atol=1e-7)
    assert not np.allclose(jsae.jacobian_.toarray(), np.abs(jsae.jacobian(X).toarray()).mean(axis=0))


def test_at_most_k_squared_jacobian_entries_per_sample(X, gelu_mlp):
    jsae = _small(gelu_mlp).fit(X)
    J = jsae.jacobian(X[:40])
    per_sample = np.bincount(J.coords[0], minlength=40)
    assert per_sample.max() <= 16 and per_sample.min() == 16


def test_same_seed_same_model_and_different_seed_differs(X, gelu_mlp):
    a, b, c = (_small(gelu_mlp, random_state=s).fit(X) for s in (3, 3, 4))
    np.testing.assert_array_equal(a.input_sae_.components_, b.input_sae_.components_)
    np.testing.assert_array_equal(a.output_sae_.encoder_, b.output_sae_.encoder_)
    assert not np.allclose(a.input_sae_.components_, c.input_sae_.components_)


def test_l1_zero_is_two_ordinary_topk_saes(X, gelu_mlp):
    """The documented seed derivation: input side = a TopK SAE with the same seed, exactly; output
    side = a TopK SAE on mlp(X) initialised from seed + 2 with the batch order of seed + 1."""
    from sklearn_jsae._backend.train import TrainConfig, train
    from sklearn_jsae._topk import _draw_seed

    settings = dict(n_components=32, k=4, max_iter=3, batch_size=64, random_state=5)
    jsae = JacobianSparseAutoencoder(mlp=gelu_mlp, l1=0.0, **settings).fit(X)
    sae = TopKSparseAutoencoder(**settings).fit(X)
    for name in ("components_", "encoder_", "encoder_bias_", "decoder_bias_"):
        np.testing.assert_array_equal(getattr(jsae.input_sae_, name), getattr(sae, name))
    Y = jsae.mlp_outputs(X)
    seed = _draw_seed(5)
    config = TrainConfig(n_components=32, n_output_components=None, k=4, learning_rate=5e-3, max_iter=3,
                         batch_size=64, aux_coef=1 / 32, seed=seed + 2, shuffle_seed=seed + 1)
    single = TopKSparseAutoencoder(n_components=32, k=4)
    result = train(Y, None, config)
    single._set_params_from(result.input_params, result.input_scale)
    single.n_features_in_ = Y.shape[1]
    # Not bit-identical: the pair computes y = f(c_x · x') / c_y in normalised units, the single
    # SAE reads mlp(x) / c_y; the two round differently in the last bits.
    np.testing.assert_allclose(jsae.output_sae_.components_, single.components_, atol=2e-3)
    assert jsae.output_sae_.score(Y) == pytest.approx(single.score(Y), abs=1e-3)


def test_the_two_saes_start_from_independent_draws():
    """Same sizes on the identity: a shared draw would give W_enc_y = W_dec_x at initialisation."""
    X = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    jsae = JacobianSparseAutoencoder(n_components=16, k=2, max_iter=1, batch_size=64, learning_rate=1e-12,
                                     l1=0.0, aux_coef=0.0, random_state=0)
    with pytest.warns(ConvergenceWarning):
        jsae.fit(X)
    # One step of lr 1e-12 leaves the initialisation in place (to float32 precision).
    W_dec_x, W_enc_y = jsae.input_sae_.components_, jsae.output_sae_.encoder_
    np.testing.assert_allclose(jsae.input_sae_.encoder_, W_dec_x, atol=1e-6)  # W_enc = W_dec per SAE
    assert np.abs(W_enc_y - W_dec_x).max() > 0.1


def test_penalty_sparsifies_jacobian_on_synthetic_mlp(X, gelu_mlp):
    common = dict(n_components=48, k=4, max_iter=15, batch_size=64, learning_rate=5e-3, random_state=0)
    traditional = JacobianSparseAutoencoder(mlp=gelu_mlp, l1=0.0, **common).fit(X)
    sparse = JacobianSparseAutoencoder(mlp=gelu_mlp, l1=2.0, **common).fit(X)
    X_eval = X[:300]

    def above(est, tau=0.01):
        J = est.jacobian(X_eval)
        return (np.abs(J.data) > tau).sum() / (X_eval.shape[0] * est.k**2)

    assert above(sparse) < 0.8 * above(traditional)
    assert sparse.history_[-1]["jacobian_l1"] > 0
    assert "jacobian_l1" not in traditional.history_[-1]  # never computed when l1 = 0


def test_rows_are_independent_of_the_batch(X, gelu_mlp):
    jsae = _small(gelu_mlp).fit(X)
    full, part = jsae.transform(X), jsae.transform(X[100:137])
    np.testing.assert_array_equal(full[100:137].toarray(), part.toarray())
    J_full, J_part = jsae.jacobian(X[:30]).toarray(), jsae.jacobian(X[10:20]).toarray()
    np.testing.assert_allclose(J_full[10:20], J_part, rtol=1e-5, atol=1e-7)


def test_pickle_and_joblib_round_trips(tmp_path, X, gelu_mlp):
    jsae = _small(gelu_mlp).fit(X)
    restored = pickle.loads(pickle.dumps(jsae))
    joblib.dump(jsae, tmp_path / "jsae.joblib")
    loaded = joblib.load(tmp_path / "jsae.joblib")
    for other in (restored, loaded):
        np.testing.assert_array_equal(other.transform(X).toarray(), jsae.transform(X).toarray())
        np.testing.assert_array_equal(other.jacobian(X[:5]).toarray(), jsae.jacobian(X[:5]).toarray())


def test_clone_gives_unfitted_copy_with_same_params(X, gelu_mlp):
    jsae = _small(gelu_mlp).fit(X)
    copy = clone(jsae)
    assert copy.get_params()["k"] == 4
    assert torch.equal(copy.get_params()["mlp"][0].weight, gelu_mlp[0].weight)
    assert not hasattr(copy, "input_sae_")
    copy.set_params(l1=0.25)
    assert copy.l1 == 0.25 and jsae.l1 != 0.25


def test_fit_never_modifies_the_users_mlp(X, gelu_mlp):
    before = [p.detach().clone() for p in gelu_mlp.parameters()]
    jsae = _small(gelu_mlp).fit(X)
    for p, q in zip(before, gelu_mlp.parameters()):
        assert torch.equal(p, q)
    assert jsae.mlp_ is not gelu_mlp
    assert not any(p.requires_grad for p in jsae.mlp_.parameters())


def test_pipeline_with_logistic_regression(X, gelu_mlp):
    y = (X[:, 0] > np.median(X[:, 0])).astype(int)
    pipe = make_pipeline(_small(gelu_mlp), LogisticRegression(max_iter=500)).fit(X, y)
    assert pipe.score(X, y) > 0.6


def test_grid_search_over_l1_in_parallel(X, gelu_mlp):
    search = GridSearchCV(_small(gelu_mlp, max_iter=2), {"l1": [0.0, 1.0]}, cv=2, n_jobs=2).fit(X)
    assert set(search.cv_results_["param_l1"]) == {0.0, 1.0}
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    assert search.best_estimator_.l1 in (0.0, 1.0)


def test_score_is_higher_for_a_better_model(X, gelu_mlp):
    short = _small(gelu_mlp, max_iter=1, learning_rate=1e-5).fit(X)
    longer = _small(gelu_mlp, max_iter=10, learning_rate=2e-3).fit(X)
    assert longer.score(X) > short.score(X)
    assert longer.score(X) <= 1.0


def test_warm_start_continues_and_extends_history(X, gelu_mlp):
    jsae = _small(gelu_mlp, max_iter=2, warm_start=True).fit(X)
    first = jsae.input_sae_.components_.copy()
    jsae.fit(X)
    assert len(jsae.history_) == 4 and jsae.n_iter_ == 2
    assert not np.array_equal(first, jsae.input_sae_.components_)
    with pytest.raises(ValueError, match="warm_start=True but n_components=64"):
        jsae.set_params(n_components=64).fit(X)


def test_dead_latents_are_reported_and_auxk_trains_them(X):
    common = dict(n_components=256, k=2, max_iter=6, batch_size=64, random_state=0)
    without = TopKSparseAutoencoder(aux_coef=0.0, **common).fit(X)
    with_aux = TopKSparseAutoencoder(aux_coef=1 / 32, **common).fit(X)
    assert 0.0 < without.dead_fraction_ < 1.0
    assert 0.0 <= with_aux.dead_fraction_ < 1.0
    assert all(row["aux_input"] == 0 for row in without.history_)
    assert any(row["aux_input"] > 0 for row in with_aux.history_)


def test_auxk_gradient_reaches_exactly_the_dead_latents():
    from sklearn_jsae._backend.sae import SAEParams
    from sklearn_jsae._backend.step import side_losses

    g = torch.Generator().manual_seed(0)
    params = SAEParams.initialise(40, 6, torch.zeros(6), g).requires_grad_()
    x = torch.randn(32, 6, generator=g)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[30:] = True
    grads = {}
    for coef in (0.0, 1.0):
        out = side_losses(params, x, 3, dead=dead, aux_coef=coef, aux_k=4)
        (out.mse + coef * out.aux).backward()
        grads[coef] = params.W_dec.grad.clone()
        params.W_dec.grad = None
    assert grads[1.0][30:].abs().sum() > 0  # dead latents learn from the residual
    torch.testing.assert_close(grads[1.0][:30], grads[0.0][:30])  # live latents: AuxK adds nothing


def test_topk_inverse_transform_accepts_dense_codes(X):
    sae = TopKSparseAutoencoder(n_components=16, k=3, max_iter=2, random_state=0).fit(X)
    codes = sae.transform(X)
    np.testing.assert_allclose(sae.inverse_transform(codes), sae.inverse_transform(codes.toarray()),
                               rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def fitted_topk(X):
    return TopKSparseAutoencoder(n_components=16, k=3, max_iter=2, random_state=0).fit(X)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), seed=st.integers(0, 2**16), dtype=st.sampled_from([np.float32, np.float64]))
def test_codes_decode_to_the_same_rows_whatever_their_memory_layout(fitted_topk, rows, seed, dtype):
    """The same codes decoded to rows 1 ulp apart when held column-major (numpy's product rounds
    otherwise), and pandas 3 holds a frame built from an array so: a frame's decode differed from
    its array's."""
    rng = np.random.default_rng(seed)
    codes = (rng.exponential(size=(rows, 16)) * (rng.random((rows, 16)) < 0.3)).astype(dtype)
    expected = fitted_topk.inverse_transform(np.ascontiguousarray(codes))
    for layout in (np.asfortranarray(codes), np.repeat(codes, 2, axis=1)[:, ::2]):  # column-major, strided
        np.testing.assert_array_equal(fitted_topk.inverse_transform(layout), expected)


def test_verbose_prints_epochs(X, capsys):
    TopKSparseAutoencoder(n_components=16, k=3, max_iter=2, verbose=1, random_state=0).fit(X)
    assert "epoch 2/2" in capsys.readouterr().out


@settings(max_examples=200, deadline=None)
@given(n_latents=st.integers(1, 1 << 24), mib=st.floats(1e-3, 1 << 16))
def test_inference_rows_stay_within_the_working_memory(n_latents, mib):
    """Rows per batch: at most INFERENCE_ROWS, at least one, within the budget at 8 bytes per latent
    and row unless a single row exceeds it, and never more for a wider dictionary."""
    import sklearn

    from sklearn_jsae._backend.inference import INFERENCE_ROWS, inference_rows

    with sklearn.config_context(working_memory=mib):
        rows = inference_rows(n_latents)
        assert 1 <= rows <= INFERENCE_ROWS
        assert rows == 1 or rows * 8 * n_latents <= mib * 2**20
        assert rows == INFERENCE_ROWS or (rows + 1) * 8 * n_latents > mib * 2**20  # no smaller than needed
        assert inference_rows(n_latents + 1) <= rows


def test_inference_batches_follow_sklearns_working_memory(X, gelu_mlp, monkeypatch):
    """Inference encoded 4,096 rows at a time whatever the dictionary's width (1 GiB of float32
    pre-activations per batch at 65,536 latents) and whatever ``sklearn.set_config(working_memory=)``
    said; the rows per batch now keep 8 bytes per latent and row within that budget."""
    import sklearn

    import sklearn_jsae._backend.inference as inference
    from sklearn_jsae.metrics import reconstruction_metrics

    assert inference.inference_rows(2048) == 4096  # narrow dictionaries: as before
    assert inference.inference_rows(65536) == 2048  # scikit-learn's default budget, 1,024 MiB
    with sklearn.config_context(working_memory=64):
        assert inference.inference_rows(65536) == 128 and inference.inference_rows(1 << 40) == 1
    jsae = _small(gelu_mlp, n_output_components=48).fit(X)
    rows = X[:150]

    def results():
        return dict(codes=jsae.transform(rows).toarray(), output_codes=jsae.transform_output(rows).toarray(),
                    J=jsae.jacobian(rows).todense(), fvu=reconstruction_metrics(jsae, rows))

    whole = results()
    encoded, real_encode = [], inference.encode
    monkeypatch.setattr(inference, "encode", lambda params, x, k: (encoded.append(len(x)), real_encode(params, x, k))[1])
    with sklearn.config_context(working_memory=8 * 48 * 10 / 2**20):  # 10 rows of the wider (output) side
        got = results()
    assert set(encoded) == {10, 15}  # 15 rows where only the input side (32 latents) is encoded
    for name in ("codes", "output_codes", "J"):
        np.testing.assert_allclose(got[name], whole[name], rtol=1e-5, atol=2e-6, err_msg=name)
    for side in ("input", "output"):
        for name, value in whole["fvu"][side].items():
            assert got["fvu"][side][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (side, name)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_inference_in_many_batches_equals_inference_in_one(X, gelu_mlp, monkeypatch, batch):
    """Every test array fits in one inference batch (4096 rows; Jacobians 2**25 elements): the
    batching is pinned here by shrinking both bounds to a few rows, which must change nothing."""
    import sklearn_jsae._backend.inference as inference

    jsae = _small(gelu_mlp).fit(X)
    rows = X[:150]
    whole = dict(codes=jsae.transform(rows), output_codes=jsae.transform_output(rows),
                 outputs=jsae.mlp_outputs(rows), J=jsae.jacobian(rows), mean=jsae._mean_abs_jacobian(rows))
    monkeypatch.setattr(inference, "INFERENCE_ROWS", batch)
    monkeypatch.setattr(inference, "_JACOBIAN_CHUNK_ELEMENTS", batch * jsae.k * 40)  # batch rows per block
    assert inference.jacobian_batch_size(jsae.k, jsae.k, 40) == batch
    for name, value in dict(codes=jsae.transform(rows), output_codes=jsae.transform_output(rows),
                            outputs=jsae.mlp_outputs(rows), J=jsae.jacobian(rows),
                            mean=jsae._mean_abs_jacobian(rows)).items():
        expected = whole[name]
        if hasattr(value, "toarray"):
            value, expected = value.toarray(), expected.toarray()
        # (float32 rounding: BLAS blocks a matrix product by its number of rows)
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=2e-6, err_msg=name)
