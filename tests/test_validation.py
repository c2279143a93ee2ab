"""Bad input gets a clear error naming the parameter or array, the value and the fix,
and a failed or interrupted fit never leaves a half-fitted or damaged estimator."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning, NotFittedError

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae.exceptions import NonFiniteTrainingError

SMALL = dict(n_components=16, k=2, max_iter=1, batch_size=32, random_state=0)


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 5))


@pytest.mark.parametrize("l1", [-5.0, np.nan, np.inf])
def test_a_bad_l1_is_refused_even_without_parameter_validation(X, mlp, l1):
    """Under skip_parameter_validation a negative or NaN l1 trained with no penalty at all while
    the history and paper_lambda_ recorded it."""
    import sklearn

    with sklearn.config_context(skip_parameter_validation=True):
        with pytest.raises(ValueError, match=r"l1=.* must be a finite number >= 0"):
            JacobianSparseAutoencoder(mlp, l1=l1, **SMALL).fit(X)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_X_names_X(X, bad):
    X_bad = X.copy()
    X_bad[3, 2] = bad
    with pytest.raises(ValueError, match="X contains"):
        JacobianSparseAutoencoder(**SMALL).fit(X_bad)


def test_wrong_feature_count_for_mlp_names_both(X, mlp):
    with pytest.raises(ValueError, match=r"X has 4 features, but mlp expects in_features=6"):
        JacobianSparseAutoencoder(mlp=mlp, **SMALL).fit(X[:, :4])


def test_a_sequential_mlp_whose_layers_do_not_fit_together_is_named(X):
    broken = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.GELU(), torch.nn.Linear(30, 6))
    est = JacobianSparseAutoencoder(mlp=broken, **SMALL)
    with pytest.raises(ValueError, match=r"mlp is inconsistent: its second nn.Linear has in_features=30 but "
                                         r"its first produces out_features=40; fix the module's layer sizes"):
        est.fit(X)
    assert not hasattr(est, "input_sae_")


def test_wrong_feature_count_for_callable_reports_the_failure(X):
    weight = torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"mlp failed on a float32 torch tensor of shape \(8, 5\)") as failure:
        JacobianSparseAutoencoder(mlp=lambda x: x @ weight, **SMALL).fit(X[:, :5])
    assert "looks like a whole model" not in str(failure.value)  # the hint is for transformers only


class _LyingWidth(torch.nn.Module):
    out_features = 7

    def forward(self, x):
        return torch.tanh(x[:, :3])


def test_mlp_whose_output_width_differs_from_its_claim(X):
    with pytest.raises(ValueError, match="declares out_features=7 but returned 3 columns"):
        JacobianSparseAutoencoder(mlp=_LyingWidth(), **SMALL).fit(X)


def test_mlp_returning_wrong_rows(X):
    with pytest.raises(ValueError, match=r"returned shape \(1, 6\)"):
        JacobianSparseAutoencoder(mlp=lambda x: x.sum(0, keepdim=True), **SMALL).fit(X)


def test_non_torch_mlp(X):
    with pytest.raises(TypeError, match="mlp must return a torch.Tensor, got ndarray"):
        JacobianSparseAutoencoder(mlp=lambda x: np.tanh(np.asarray(x)), **SMALL).fit(X)


def test_non_callable_mlp_is_a_parameter_error(X):
    with pytest.raises(ValueError, match="'mlp' parameter"):
        JacobianSparseAutoencoder(mlp="gelu", **SMALL).fit(X)


@pytest.mark.parametrize("mlp", [lambda x: torch.tanh(x.detach()), lambda x: torch.round(x * 100) / 100,
                                 lambda x: (x * 100).long().float() / 100],
                         ids=["detached", "rounded", "integer cast"])
def test_non_differentiable_mlp(X, mlp):
    """A step function's Jacobian is zero wherever it is taken, though its outputs vary: the check
    that refused it (a zero Jacobian on the probed rows) also refused flat rows of a real MLP."""
    with pytest.raises(ValueError, match="does not depend differentiably on its input: its outputs differ"):
        JacobianSparseAutoencoder(mlp=mlp, **SMALL).fit(X)


def test_mlp_returning_nan_names_the_row(X):
    """A finite row on which the MLP itself goes NaN (a log of negative values) is the MLP's fault."""
    X_pos = np.abs(X) + 0.1
    X_pos[5, 0] = -1.0  # log(-1) = NaN on row 5 only
    # The class the training pass raises for the other rows (training.rst): the probed first rows too.
    with pytest.raises(NonFiniteTrainingError, match=r"mlp returned NaN or inf on row 5 of X \(finite input\)"):
        JacobianSparseAutoencoder(mlp=lambda x: torch.log(x), **SMALL).fit(X_pos)


def test_mlp_with_an_infinite_derivative_names_the_row(X):
    """sqrt(|x|) is finite at 0 but its derivative is not: the Jacobian check names the row."""
    X_zero = X.copy()
    X_zero[3, :] = 0.0
    with pytest.raises(ValueError, match=r"mlp's Jacobian is not finite on rows of X \(row 3\)"):
        JacobianSparseAutoencoder(mlp=lambda x: torch.sqrt(x.abs()), **SMALL).fit(X_zero)


@pytest.mark.parametrize("Estimator", [JacobianSparseAutoencoder, TopKSparseAutoencoder])
def test_nan_in_the_first_rows_of_a_memmap_names_X_not_the_mlp(tmp_path, X, mlp, Estimator):
    """A memmap is not scanned up front; a NaN among the rows the MLP is probed on is reported as
    X's (the MLP is not blamed), as one further on is by the statistics pass, naming the row."""
    from sklearn_jsae.exceptions import NonFiniteTrainingError

    estimator = Estimator(mlp=mlp, **SMALL) if Estimator is JacobianSparseAutoencoder else Estimator(**SMALL)
    for row in (2, 40):
        bad = X.copy()
        bad[row, 1] = np.nan
        path = tmp_path / f"X{row}.npy"
        np.save(path, bad)
        with pytest.raises(NonFiniteTrainingError, match=rf"X contains NaN or inf .*on 1 of rows .* \(first: \[{row}\]\)"):
            estimator.fit(np.load(path, mmap_mode="r"))
        assert not hasattr(estimator, "n_features_in_")


@pytest.mark.parametrize("Estimator", [JacobianSparseAutoencoder, TopKSparseAutoencoder])
def test_k_larger_than_n_components(X, Estimator):
    with pytest.raises(ValueError, match="k=20 must be <= n_components=16"):
        Estimator(**{**SMALL, "k": 20}).fit(X)


def test_k_larger_than_n_output_components(X):
    with pytest.raises(ValueError, match="k=4 must be <= n_output_components=3"):
        JacobianSparseAutoencoder(**{**SMALL, "k": 4, "n_output_components": 3}).fit(X)


@pytest.mark.parametrize("Estimator", [JacobianSparseAutoencoder, TopKSparseAutoencoder])
def test_k_below_one(X, Estimator):
    with pytest.raises(ValueError, match="The 'k' parameter of .* must be an int in the range"):
        Estimator(**{**SMALL, "k": 0}).fit(X)


def test_empty_X(X):
    with pytest.raises(ValueError, match="Found array with 0 sample"):
        JacobianSparseAutoencoder(**SMALL).fit(X[:0])


def test_one_dimensional_X(X):
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        JacobianSparseAutoencoder(**SMALL).fit(X[:, 0])


def test_integer_and_float64_X_work(X, mlp):
    ints = np.round(X * 3).astype(np.int64)
    jsae = JacobianSparseAutoencoder(mlp=mlp, **SMALL).fit(ints)
    assert jsae.transform(ints).dtype == np.float32
    jsae64 = JacobianSparseAutoencoder(mlp=mlp, **SMALL).fit(X.astype(np.float64))
    np.testing.assert_allclose(
        jsae64.transform(X.astype(np.float64)).toarray(),
        JacobianSparseAutoencoder(mlp=mlp, **SMALL).fit(X).transform(X).toarray(),
        rtol=1e-4, atol=1e-5,
    )


def test_read_only_memmap_works_and_is_untouched(tmp_path, X, mlp):
    path = tmp_path / "X.npy"
    np.save(path, X)
    X_map = np.load(path, mmap_mode="r")
    jsae = JacobianSparseAutoencoder(mlp=mlp, **SMALL).fit(X_map)
    assert jsae.transform(X_map).shape == (64, 16)
    np.testing.assert_array_equal(np.load(path), X)


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_float16_store_trains_as_its_float32_values_and_stays_on_disk(tmp_path, mlp, kind):
    """harvest(..., dtype=np.float16) stores: fit and score read them batch by batch (converting each
    batch), giving the model and score of the same values in float32; a NaN is found by the pass."""
    from sklearn_jsae._backend import train as train_module
    from sklearn_jsae.exceptions import NonFiniteTrainingError

    rng = np.random.default_rng(0)
    values = rng.normal(size=(600, 6)).astype(np.float16)
    path = tmp_path / "X16.npy"
    np.save(path, values)
    store = np.load(path, mmap_mode="r")
    settings = dict(SMALL, batch_size=64, max_iter=2)

    def make():
        return JacobianSparseAutoencoder(mlp=mlp, **settings) if kind == "jsae" else TopKSparseAutoencoder(**settings)

    converted = []
    real_rows = train_module._Rows

    def rows_of(X, *args, **kwargs):  # what fit hands to the backend: the store itself, not a copy
        converted.append(X.dtype)
        return real_rows(X, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "_Rows", rows_of)
        from_store = make().fit(store)
    assert converted and set(converted) == {np.dtype(np.float16)}
    from_values = make().fit(values.astype(np.float32))
    side = (lambda est: est.input_sae_) if kind == "jsae" else (lambda est: est)
    np.testing.assert_array_equal(side(from_store).components_, side(from_values).components_)
    assert from_store.score(store) == pytest.approx(from_values.score(values.astype(np.float32)), abs=1e-9)
    broken = values.copy()
    broken[250, 1] = np.nan
    np.save(path, broken)
    with pytest.raises(NonFiniteTrainingError, match=r"X contains NaN or inf .*on 1 of rows .* \(first: \[250\]\)"):
        make().fit(np.load(path, mmap_mode="r"))


def test_transform_with_wrong_width_after_fit(X, mlp):
    jsae = JacobianSparseAutoencoder(mlp=mlp, **SMALL).fit(X)
    with pytest.raises(ValueError, match="X has 5 features, but JacobianSparseAutoencoder is expecting 6"):
        jsae.transform(X[:, :5])


def test_unfitted_methods_raise_not_fitted(X):
    jsae = JacobianSparseAutoencoder(**SMALL)
    for method in (jsae.transform, jsae.jacobian, jsae.transform_output, jsae.score):
        with pytest.raises(NotFittedError):
            method(X)


def test_cuda_request_without_cuda_is_clear(X):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path is for CPU-only machines")
    with pytest.raises(ValueError, match="device='cuda' but torch.cuda.is_available"):
        JacobianSparseAutoencoder(**{**SMALL, "device": "cuda"}).fit(X)


def test_failed_first_fit_does_not_claim_fitted(X):
    jsae = JacobianSparseAutoencoder(mlp=lambda x: np.asarray(x), **SMALL)
    with pytest.raises(TypeError):
        jsae.fit(X)
    assert not hasattr(jsae, "n_features_in_")
    with pytest.raises(NotFittedError):
        jsae.transform(X)


def test_failed_refit_keeps_the_fitted_model(X, mlp):
    jsae = JacobianSparseAutoencoder(mlp=mlp, **SMALL).fit(X)
    before = jsae.transform(X).toarray()
    X_bad = X.copy()
    X_bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        jsae.fit(X_bad)
    np.testing.assert_array_equal(jsae.transform(X).toarray(), before)
    assert jsae.n_features_in_ == 6


class _InterruptAfter(torch.nn.Module):
    """An MLP that raises KeyboardInterrupt on its n-th call, like a user pressing Ctrl-C."""

    def __init__(self, inner, calls):
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt
        return self.inner(x)


def test_interrupted_warm_start_keeps_the_fitted_model(X, mlp):
    jsae = JacobianSparseAutoencoder(mlp=mlp, warm_start=True, **SMALL).fit(X)
    before = jsae.input_sae_.components_.copy()
    history = list(jsae.history_)
    jsae.set_params(mlp=_InterruptAfter(torch.nn.Sequential(*mlp), calls=5))
    with pytest.raises(KeyboardInterrupt):
        jsae.fit(X)
    np.testing.assert_array_equal(jsae.input_sae_.components_, before)
    assert jsae.history_ == history


class _BiasFreeSwiGLU(torch.nn.Module):
    """silu(x W) * (x V) has a zero Jacobian at x = 0 (padding rows), like a gated MLP without biases."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.gate = torch.nn.Parameter(torch.randn(6, 10, generator=generator))
        self.up = torch.nn.Parameter(torch.randn(6, 10, generator=generator))

    def forward(self, x):
        return torch.nn.functional.silu(x @ self.gate) * (x @ self.up)


def test_an_mlp_whose_jacobian_is_zero_on_the_probed_rows_is_accepted(X):
    """Rows of zeros first (padding, an unshuffled harvest): the MLP is flat there, not detached."""
    X_padded = X.copy()
    X_padded[:8] = 0.0
    jsae = JacobianSparseAutoencoder(mlp=_BiasFreeSwiGLU(), **SMALL).fit(X_padded)
    J = jsae.jacobian(X_padded[8:12])
    assert np.isfinite(J.data).all() and np.abs(J.data).max() > 0


def _overflowing_fit(X):
    return JacobianSparseAutoencoder(mlp=lambda x: torch.exp(3 * x), **SMALL).fit(X)


@pytest.mark.parametrize("method", ["transform_output", "mlp_outputs", "jacobian", "score", "reconstruction_metrics",
                                    "jacobian_sparsity", "intervention_agreement"])
def test_inference_refuses_mlp_outputs_that_overflow_on_a_finite_row(X, method):
    """Training checks every row's MLP outputs; inference did not, and returned NaN codes and
    Jacobians, and a finite score (a NaN variance read as no variance)."""
    from sklearn_jsae import metrics

    jsae = _overflowing_fit(X)
    X_far = X.copy()
    X_far[7] = 40.0  # exp(120) overflows float32
    call = getattr(jsae, method, None) or (lambda Z: getattr(metrics, method)(jsae, Z))
    with pytest.raises(ValueError, match=r"the mlp returned NaN or inf on row 7 of X \(a finite row\)"):
        call(X_far)
    assert np.isfinite(jsae.score(X))  # the model itself is untouched


def test_linearity_refuses_a_sweep_on_which_the_mlp_overflows(X):
    from sklearn_jsae.metrics import linearity

    jsae = _overflowing_fit(X)
    with pytest.raises(ValueError, match=r"the mlp returned NaN or inf on a point of sweep \d+"):
        linearity(jsae, X, n_samples=16, sweep_min=200.0)
    X_far = X.copy()
    X_far[20:] = 40.0
    # the row of X (20 or after), not its place among the 16 sampled rows (below 16)
    with pytest.raises(ValueError, match=r"the mlp returned NaN or inf on row \d+ of X") as info:
        linearity(jsae, X_far, n_samples=16, random_state=0)
    assert int(str(info.value).split(" on row ")[1].split()[0]) >= 20


@pytest.mark.parametrize("Estimator", [JacobianSparseAutoencoder, TopKSparseAutoencoder])
def test_inputs_that_overflow_the_encoder_are_refused_not_returned_as_inf(X, Estimator):
    model = Estimator(**SMALL).fit(X)
    X_huge = X.copy()
    X_huge[3] = 3e38  # finite float32, but x @ W_enc is not
    with pytest.raises(ValueError, match=r"the codes are NaN or inf on row 3 of X"):
        model.transform(X_huge)
    with pytest.raises(ValueError, match=r"FVU is not finite on X"):
        model.score(X_huge)


_COUNTS_AND_RATES = ["n_components", "k", "learning_rate", "max_iter", "batch_size", "aux_coef", "n_tokens",
                     "checkpoint_every"]


@pytest.mark.parametrize("Estimator, name", [(JacobianSparseAutoencoder, name) for name in
                                             _COUNTS_AND_RATES + ["n_output_components", "l1"]]
                         + [(TopKSparseAutoencoder, name) for name in _COUNTS_AND_RATES])
@pytest.mark.parametrize("flag", [True, np.True_])
def test_a_bool_is_not_a_count_or_a_rate(X, Estimator, name, flag):
    """True is the integer 1 to Python: max_iter=True was one epoch, k=True one latent."""
    from sklearn.utils._param_validation import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=rf"The '{name}' parameter .* Got (np\.)?True_? instead"):
        Estimator(**{**SMALL, name: flag}).fit(X)


@pytest.mark.parametrize("cast, rtol", [(torch.float64, 1e-4), (torch.float16, 1e-2)])
def test_a_callable_computing_in_another_float_dtype_trains_as_its_float32_twin(X, cast, rtol):
    """A ``.double()`` inside the callable failed deep in the first step (mat1 and mat2 dtypes)."""
    settings = {**SMALL, "max_iter": 3}
    other = JacobianSparseAutoencoder(mlp=lambda x: torch.tanh(x).to(cast), **settings).fit(X)
    twin = JacobianSparseAutoencoder(mlp=lambda x: torch.tanh(x).to(cast).float(), **settings).fit(X)
    # (equal up to the rounding of ``cast``: the other callable is divided by the output scale before
    # the cast to float32)
    np.testing.assert_allclose(other.output_sae_.components_, twin.output_sae_.components_, rtol=rtol,
                               atol=rtol / 100)
    assert other.mlp_outputs(X[:4]).dtype == np.float32 and other.jacobian(X[:4]).dtype == np.float32


@pytest.mark.parametrize("to", [torch.bool, torch.int64, torch.complex64])
def test_a_callable_returning_non_float_outputs_is_named(X, to):
    with pytest.raises(TypeError, match=rf"mlp returned a tensor of dtype {to}; it must return floating-point"):
        JacobianSparseAutoencoder(mlp=lambda x: torch.tanh(x).to(to), **SMALL).fit(X)


def test_a_callable_computing_in_bfloat16_inside_is_accepted(X):
    """bfloat16 rounds outputs to 3 digits, which swamped the finite difference the derivative is
    checked against: the MLP was refused as 'detached'."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.GELU(), torch.nn.Linear(24, 5)).bfloat16()
    jsae = JacobianSparseAutoencoder(mlp=lambda x: module(x.bfloat16()).float(), **SMALL).fit(X)
    assert np.isfinite(jsae.jacobian(X[:4]).data).all() and jsae.mlp_outputs(X[:4]).dtype == np.float32


def test_rows_that_are_all_equal_train_with_a_warning_not_a_made_up_scale(X):
    """Σx²/n - mean² of equal rows is float64 rounding (5e-9 for rows near 1): taken as the data's
    scale, it blew the data up 10⁸ times and the fit 'diverged' at step 0, blaming the learning rate."""
    rows = np.tile(X[:1] + 1, (64, 1))
    with pytest.warns(UserWarning, match=r"X has \(almost\) no variance"):
        sae = TopKSparseAutoencoder(**SMALL).fit(rows)
    assert sae.scale_ == 1.0 and np.isfinite(sae.history_[-1]["loss"])
    np.testing.assert_allclose(sae.inverse_transform(sae.transform(rows)), rows, atol=1e-5)


def test_an_mlp_whose_outputs_are_constant_trains_with_a_warning(X):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 5))
    with torch.no_grad():
        mlp[2].weight.zero_()
        mlp[2].bias.uniform_(-1, 1)
    with pytest.warns(UserWarning, match=r"the mlp's outputs are \(almost\) constant on X"):
        jsae = JacobianSparseAutoencoder(mlp=mlp, **SMALL).fit(X)
    assert jsae.output_sae_.scale_ == 1.0 and np.isfinite(jsae.history_[-1]["loss"])


def test_float64_rows_that_differ_below_float32_resolution_are_named(X):
    """Rows 1e4 ± 1e-4 are one row in float32, the training dtype: the model learnt nothing silently."""
    far = 1e4 + 1e-4 * X.astype(np.float64)
    with pytest.warns(UserWarning, match=r"no variance .* centre X in float64 first"):
        TopKSparseAutoencoder(**SMALL).fit(far)


def test_a_first_step_that_diverges_does_not_blame_the_learning_rate(X):
    """Before the first update the error is the starting model's: here a warm start fitted on data
    10⁴ times smaller."""
    sae = TopKSparseAutoencoder(**SMALL).fit(X)
    with pytest.raises(NonFiniteTrainingError, match=r"starting model's error, before any update .* warm start"):
        sae.set_params(warm_start=True).fit(X * 1e4)


def _cubed(t):
    return t ** 3


def _state(estimator):
    sides = (estimator.input_sae_, estimator.output_sae_) if hasattr(estimator, "input_sae_") else (estimator,)
    return [(side.components_.copy(), side.scale_) for side in sides]


@settings(max_examples=12, deadline=None)
@given(exponent=st.integers(19, 37), pair=st.booleans(), call=st.sampled_from(["partial_fit", "warm_start"]))
def test_rows_beyond_an_earlier_calls_scale_name_that_scale_not_the_data_or_mlp(X, exponent, pair, call):
    """Finite rows that overflow float32 only over the scale c_x measured by an earlier call
    (partial_fit and warm_start keep it) were blamed on the MLP ("the MLP overflows"; it was the
    identity) or on X ("values too large for the training dtype"; they were 1e-12 of float32's
    range).  The error names the scale and the way out, and the model is left as it was."""
    model = JacobianSparseAutoencoder(**SMALL) if pair else TopKSparseAutoencoder(**SMALL)
    with pytest.warns(ConvergenceWarning):
        model.fit(X * 1e-20)
    before = _state(model)
    far = X * np.float32(10.0 ** exponent)
    with pytest.raises(NonFiniteTrainingError) as info:
        if call == "partial_fit":
            model.partial_fit(far)
        else:
            model.set_params(warm_start=True).fit(far)
    message = str(info.value)
    assert "of X are not finite in training units" in message
    scale_x = before[0][1]
    assert re.search(r"those rows of X are finite \(up to \|x\| = [0-9.]+e\+\d+\) but overflow float32 over "
                     + re.escape(f"the input scale c_x = {scale_x:.3g};"), message), message
    assert 1e-21 < scale_x < 1e-19
    assert "warm_start=False" in message and "MLP overflows" not in message and "training dtype" not in message
    after = _state(model)
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(before, after))


def test_mlp_outputs_beyond_an_earlier_calls_output_scale_name_c_y(X):
    """An MLP whose outputs grow faster than its inputs (x³) on data 10¹³ times larger than the
    first call's: the inputs fit float32 over c_x, the outputs not over c_y.  The MLP itself is
    finite there, so the error names c_y, not "the MLP overflows"."""
    jsae = JacobianSparseAutoencoder(_cubed, **SMALL)
    with pytest.warns(ConvergenceWarning):
        jsae.fit(X * 1e-10)
    before = _state(jsae)
    with pytest.raises(NonFiniteTrainingError, match=r"the mlp returned NaN or inf on rows \[") as info:
        jsae.partial_fit(X * 1e3)
    assert re.search(r"the mlp's outputs on those rows are finite \(up to \|y\| = [0-9.]+e\+\d+\) but overflow "
                     r"float32 over the output scale c_y = [0-9.]+e-\d+", str(info.value)), str(info.value)
    assert "MLP overflows" not in str(info.value)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(before, _state(jsae)))


def test_a_loss_that_overflows_on_data_far_from_the_scales_names_the_scales(X):
    """Inputs and outputs finite in training units but squared beyond float32 (x³ on data 10¹²
    times the first call's): the loss overflows before any update, and the cause is the scales,
    with both training-unit maxima, not "X or the mlp's outputs hold extreme values"."""
    jsae = JacobianSparseAutoencoder(_cubed, **SMALL)
    with pytest.warns(ConvergenceWarning):
        jsae.fit(X * 1e-10)
    with pytest.raises(NonFiniteTrainingError, match=r"the loss terms \[.*'mse_output'\] are NaN or inf") as info:
        jsae.set_params(warm_start=True).fit(X * 1e2)
    assert re.search(r"in training units \|x\| / c_x reaches [0-9.]+e\+1\d \(c_x = [0-9.]+e-1\d\) and \|y\| / c_y reaches "
                     r"[0-9.]+e\+3\d", str(info.value)), str(info.value)
    assert "warm_start=False" in str(info.value)


@pytest.mark.parametrize("Estimator", [TopKSparseAutoencoder, JacobianSparseAutoencoder])
def test_an_outlier_of_a_fresh_fit_stays_far_below_the_scale_diagnosis(Estimator):
    """The scale diagnosis needs values beyond FAR_FROM_SCALE in training units, which a fit's own
    data does not reach: a row 10¹⁵ times the others holds nearly all the variance, and is still
    a few hundred c_x from the mean; such a fit trains."""
    from sklearn_jsae._backend.trainer import FAR_FROM_SCALE

    X = np.random.default_rng(0).normal(size=(4096, 6)).astype(np.float32)
    X[7] *= 1e15
    model = Estimator(**SMALL).fit(X)
    sae = model.input_sae_ if hasattr(model, "input_sae_") else model
    assert np.isfinite(sae.components_).all()
    assert 10 < np.abs(X / sae.scale_).max() < FAR_FROM_SCALE / 1e5


# --------------------------------------------------------------------------- types and dtypes


@pytest.mark.parametrize("k, message", [(17, r"k=17 must be <= n_components=16"),
                                        (0, r"k=0 must be an int >= 1"), (2.0, r"k=2.0 must be an int >= 1")])
def test_a_fitted_topk_sae_checks_its_current_k_at_inference(X, k, message):
    """A fitted TopK SAE encodes with its current k (outputs.rst), which set_params does not check:
    k=0 gave empty codes, k=17 and k=2.0 errors from inside torch."""
    sae = TopKSparseAutoencoder(**SMALL).fit(X)
    sae.set_params(k=k)
    for call in (sae.transform, sae.score):
        with pytest.raises(ValueError, match=message):
            call(X)
    assert np.diff(sae.set_params(k=5).transform(X).indptr).max() == 5  # a valid k still reads it


@pytest.mark.parametrize("Estimator", [JacobianSparseAutoencoder, TopKSparseAutoencoder])
def test_inverse_transform_reads_the_tensors_transform_reads(X, Estimator):
    est = Estimator(**{**SMALL, "sparse_output": False}).fit(X)
    codes = est.transform(X[:5])
    expected = est.inverse_transform(codes)
    for tensor in (torch.from_numpy(codes).bfloat16(), torch.from_numpy(codes).requires_grad_(),
                   torch.from_numpy(codes).to_sparse()):
        np.testing.assert_allclose(est.inverse_transform(tensor), expected, rtol=1e-2, atol=1e-2)
    # float32 and sparse tensors decode as their numpy twins (a sparse product sums in another order)
    np.testing.assert_allclose(est.inverse_transform(torch.from_numpy(codes).to_sparse()), expected, rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_array_equal(est.inverse_transform(torch.from_numpy(codes)), expected)


@pytest.mark.parametrize("Estimator", [JacobianSparseAutoencoder, TopKSparseAutoencoder])
def test_complex_and_sparse_tensors_are_refused_by_name(X, Estimator):
    """A complex tensor was cast to float32 (its imaginary part dropped without a word) while a
    complex array is refused; a sparse tensor raised torch's "can't convert Sparse layout"."""
    est = Estimator(**SMALL)
    with pytest.raises(ValueError, match=r"X is a complex torch tensor \(torch.complex64\)"):
        est.fit(torch.from_numpy(X).to(torch.complex64))
    with pytest.raises(TypeError, match=r"X is a sparse torch tensor .*pass X.to_dense\(\)"):
        est.fit(torch.from_numpy(X).to_sparse())
    est.fit(X)
    with pytest.raises(ValueError, match=r"X is a complex torch tensor"):
        est.transform(torch.from_numpy(X).to(torch.complex64))


def test_fit_stream_reads_a_list_of_rows_as_fit_does(X):
    """A list of 1-D rows was taken for a DataLoader's ``(x, y)`` (refused), and ``[row]`` for its
    ``[x]`` (a 1-D batch, refused)."""
    rows = list(X)
    streamed = TopKSparseAutoencoder(**SMALL).fit_stream([rows[:40], rows[40:], [rows[0]]])
    assert streamed.n_features_in_ == X.shape[1] and streamed.history_[-1]["tokens_seen"] == len(X) + 1
    together = TopKSparseAutoencoder(**SMALL).fit_stream([np.stack(rows[:40]), X[40:], X[:1]])
    np.testing.assert_array_equal(streamed.components_, together.components_)
    with pytest.raises(ValueError, match=r"is a list of 2 arrays; fit_stream trains on the MLP's inputs alone"):
        TopKSparseAutoencoder(**SMALL).fit_stream([[X, X]])


@pytest.mark.parametrize("Estimator", [TopKSparseAutoencoder, JacobianSparseAutoencoder])
def test_a_float64_store_beyond_float32_range_is_named_as_such(tmp_path, X, Estimator):
    """A memmapped store is not scanned up front; its value of 1e300 became inf in float32 and the
    error said only "NaN or inf"."""
    path = tmp_path / "X.npy"
    np.save(path, X.astype(np.float64))
    store = np.load(path, mmap_mode="r+")
    store[3, 1] = 1e300
    store.flush()
    with pytest.raises(NonFiniteTrainingError, match=r"X contains NaN or inf \(or values beyond float32's "
                                                     r"range, 3.4e\+38.*on 1 of rows 0-\d+ of X \(first: \[3\]\)\. "
                                                     r"Remove, repair or rescale"):
        Estimator(**SMALL).fit(np.load(path, mmap_mode="r"))


@pytest.mark.parametrize("side", ["input_sae_", "output_sae_"])
@pytest.mark.parametrize("k", [0, 2.0])
def test_a_jsae_side_with_a_bad_k_is_refused_on_every_path(X, mlp, side, k):
    """``_encoding_k`` checked a TopK SAE's k in transform and score, but a JSAE's transform_output,
    jacobian and metrics read its sides' k unchecked (k=0: empty codes or a ZeroDivisionError)."""
    from sklearn_jsae.metrics import intervention_agreement, linearity

    jsae = JacobianSparseAutoencoder(mlp, **SMALL).fit(X)
    getattr(jsae, side).set_params(k=k)
    calls = [lambda rows: intervention_agreement(jsae, rows), lambda rows: linearity(jsae, rows, n_samples=2)]
    # the Jacobian's blocks take the pair's one k from the input side
    calls += [jsae.transform, jsae.jacobian] if side == "input_sae_" else [jsae.transform_output]
    for call in calls:
        with pytest.raises(ValueError, match=rf"k={k!r} must be an int >= 1"):
            call(X[:8])


def test_a_complex_sparse_tensor_is_refused_by_inverse_transform(X):
    est = TopKSparseAutoencoder(**{**SMALL, "sparse_output": False}).fit(X)
    codes = torch.from_numpy(est.transform(X[:4])).to(torch.complex64)
    for tensor in (codes.to_sparse(), codes.to_sparse_csr(), codes):
        with pytest.raises(ValueError, match=r"X is a complex torch tensor"):
            est.inverse_transform(tensor)
