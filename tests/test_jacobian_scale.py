"""Absolute and normalised thresholds: the ``scale`` of the Jacobian sparsity metrics, scorers and plots.

``scale="absolute"`` puts τ on J = ∂s_y/∂s_x (the paper's view), ``scale="normalized"`` on
``(c_x / c_y) · J`` (the Jacobian between the latents of the normalised data), and a number
``a`` on ``a · J``.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.model_selection import GridSearchCV

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae.metrics import global_jacobian_sparsity, jacobian_scale, jacobian_sparsity
from sklearn_jsae.model_selection import (
    make_jacobian_sparsity_scorer,
    make_scoring,
    sparsest_within_tolerance,
)

FAST = settings(max_examples=40, deadline=None)
BAD_SCALES = ["normalised", "relative", "", 0, 0.0, -1.0, float("nan"), float("inf"), True, None, [1.0]]


def make_mlp(d=6, hidden=24, out_gain=1.0, seed=0):
    """A small GELU MLP; ``out_gain`` multiplies its output layer (and so every output)."""
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, d))
    with torch.no_grad():
        mlp[2].weight.mul_(out_gain)
        mlp[2].bias.mul_(out_gain)
    return mlp


def make_X(n=300, d=6, seed=0):
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(12, d))
    codes = rng.exponential(size=(n, 12)) * (rng.random((n, 12)) < 0.25)
    return (codes @ atoms + 0.05 * rng.normal(size=(n, d))).astype(np.float32)


def fit(mlp, X, l1=0.5, max_iter=3):
    return JacobianSparseAutoencoder(mlp, n_components=16, k=3, l1=l1, max_iter=max_iter, random_state=0).fit(X)


@pytest.fixture(scope="module")
def fitted():
    """A JSAE whose output scale is about 6 times its input scale, so the two views differ."""
    X = make_X()
    return fit(make_mlp(out_gain=40.0), X), X


def random_coo(seed, n, n_out, n_in, density=0.5):
    rng = np.random.default_rng(seed)
    dense = rng.normal(scale=0.05, size=(n, n_out, n_in)) * (rng.random((n, n_out, n_in)) < density)
    t, i, j = np.nonzero(dense)
    return dense[t, i, j], (t, i, j), dense.shape


# ------------------------------------------------------------------------- the factor on arrays


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), n_out=st.integers(1, 6), n_in=st.integers(1, 6),
       a=st.floats(1e-3, 1e3), taus=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=4, unique=True),
       normalize=st.booleans())
def test_per_sample_scale_a_is_thresholding_a_times_J(seed, n, n_out, n_in, a, taus, normalize):
    data, coords, shape = random_coo(seed, n, n_out, n_in)
    if data.size == 0:
        return
    J = sp.coo_array((data, coords), shape=shape)
    aJ = sp.coo_array((data * a, coords), shape=shape)
    assert (jacobian_sparsity(J, thresholds=taus, scale=a, normalize=normalize)
            == jacobian_sparsity(aJ, thresholds=taus, normalize=normalize))


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), n_out=st.integers(1, 6), n_in=st.integers(1, 6),
       a=st.floats(1e-3, 1e3), taus=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=4, unique=True))
def test_global_scale_a_is_the_mean_of_a_times_abs_J(seed, n, n_out, n_in, a, taus):
    data, coords, shape = random_coo(seed, n, n_out, n_in)
    if data.size == 0:
        return
    J = sp.coo_array((data, coords), shape=shape)
    aJ = sp.coo_array((data * a, coords), shape=shape)
    scaled, G_scaled = global_jacobian_sparsity(J, thresholds=taus, scale=a, return_matrix=True)
    direct, G_direct = global_jacobian_sparsity(aJ, thresholds=taus, return_matrix=True)
    _, G = global_jacobian_sparsity(J, thresholds=taus, return_matrix=True)
    np.testing.assert_allclose(G_scaled.toarray(), G_direct.toarray(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(G_scaled.toarray(), a * G.toarray(), rtol=1e-12, atol=0)
    n_pairs = shape[1] * shape[2]
    for tau in taus:
        # the two routes round differently: pairs within an ulp of τ may land on either side
        ambiguous = np.count_nonzero(np.isclose(G_direct.data, tau, rtol=1e-9, atol=0)) / n_pairs
        assert abs(scaled[tau] - direct[tau]) <= ambiguous


def test_scale_one_is_the_absolute_view():
    data, coords, shape = random_coo(3, 4, 5, 5)
    J = sp.coo_array((data, coords), shape=shape)
    assert jacobian_sparsity(J, scale=1.0) == jacobian_sparsity(J) == jacobian_sparsity(J, scale="absolute")
    assert global_jacobian_sparsity(J, scale=1) == global_jacobian_sparsity(J)
    # and a factor that is not 1 does change the numbers (the property above is not vacuous)
    assert jacobian_sparsity(J, scale=10.0) != jacobian_sparsity(J)


# -------------------------------------------------------------------- the estimator's own scales


def test_jacobian_scale_is_c_x_over_c_y(fitted):
    jsae, _ = fitted
    assert jacobian_scale(jsae) == jsae.input_sae_.scale_ / jsae.output_sae_.scale_
    assert 0.05 < jacobian_scale(jsae) < 0.5  # the outputs are about 6 times larger


def test_normalized_equals_the_factor_jacobian_scale(fitted):
    jsae, X = fitted
    a = jacobian_scale(jsae)
    taus = [0.005, 0.01, 0.05, 0.2]
    normalized = jacobian_sparsity(jsae, X, taus, scale="normalized")
    assert normalized == jacobian_sparsity(jsae, X, taus, scale=a)
    assert normalized == pytest.approx(jacobian_sparsity(jsae.jacobian(X), thresholds=taus, scale=a))
    assert normalized != jacobian_sparsity(jsae, X, taus)  # c_x / c_y is far from 1 here
    global_normalized, G = global_jacobian_sparsity(jsae, X, taus, scale="normalized", return_matrix=True)
    _, G_absolute = global_jacobian_sparsity(jsae, X, taus, return_matrix=True)
    assert global_normalized == global_jacobian_sparsity(jsae, X, taus, scale=a)
    np.testing.assert_allclose(G.toarray(), a * G_absolute.toarray(), rtol=1e-12)


def test_normalized_view_does_not_see_the_output_scale():
    """Multiplying the MLP's outputs by 10 multiplies J by 10 and c_y by 10: the normalised
    fractions stay, the absolute ones move."""
    X = make_X()
    base, louder = fit(make_mlp(), X), fit(make_mlp(out_gain=10.0), X)
    assert jacobian_scale(base) / jacobian_scale(louder) == pytest.approx(10.0, rel=1e-4)
    # τ at the median normalised entry, so that a factor of 10 moves many entries across it
    values = jacobian_scale(base) * np.abs(base.jacobian(X).data)
    taus = [float(np.quantile(values, q)) for q in (0.25, 0.5, 0.75)]
    normalized = [jacobian_sparsity(m, X, taus, scale="normalized") for m in (base, louder)]
    absolute = [jacobian_sparsity(m, X, taus) for m in (base, louder)]
    for tau in taus:
        assert normalized[0][tau] == pytest.approx(normalized[1][tau], abs=0.02)
        assert absolute[1][tau] - absolute[0][tau] > 0.15
    global_normalized = [global_jacobian_sparsity(m, X, taus, scale="normalized") for m in (base, louder)]
    for tau in taus:
        assert global_normalized[0][tau] == pytest.approx(global_normalized[1][tau], abs=0.02)


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("scale", BAD_SCALES, ids=repr)
@pytest.mark.parametrize("call", [
    lambda est, X, scale: jacobian_sparsity(est, X, scale=scale),
    lambda est, X, scale: global_jacobian_sparsity(est, X, scale=scale),
    lambda est, X, scale: make_scoring(scale=scale),
    lambda est, X, scale: make_jacobian_sparsity_scorer(0.01, scale=scale),
], ids=["jacobian_sparsity", "global_jacobian_sparsity", "make_scoring", "make_jacobian_sparsity_scorer"])
def test_bad_scales_are_named_with_their_value_and_the_choices(fitted, call, scale):
    jsae, X = fitted
    with pytest.raises(ValueError, match=r"scale must be 'absolute'.*'normalized'.*number > 0.*got") as excinfo:
        call(jsae, X[:20], scale)
    assert repr(scale) in str(excinfo.value)


@pytest.mark.parametrize("fn", [jacobian_sparsity, global_jacobian_sparsity])
def test_normalized_on_an_array_says_to_pass_the_estimator_or_the_factor(fitted, fn):
    jsae, X = fitted
    with pytest.raises(ValueError, match=r"scale='normalized'.*estimator.*scale=jacobian_scale\(estimator\)"):
        fn(jsae.jacobian(X[:20]), scale="normalized")


def test_jacobian_scale_needs_a_fitted_jsae_with_scales(fitted):
    jsae, X = fitted
    with pytest.raises(TypeError, match="JacobianSparseAutoencoder"):
        jacobian_scale(TopKSparseAutoencoder(n_components=6, k=2, max_iter=1).fit(X))
    unscaled = copy.deepcopy(jsae)
    unscaled.output_sae_.scale_ = None
    with pytest.raises(ValueError, match=r"output_sae_.scale_=None.*scale='absolute'"):
        jacobian_scale(unscaled)
    with pytest.raises(ValueError, match="output_sae_.scale_=None"):
        jacobian_sparsity(unscaled, X, scale="normalized")
    assert jacobian_sparsity(unscaled, X) == jacobian_sparsity(jsae, X)  # the absolute view needs no scales


# ------------------------------------------------------------------------------------ scorers


def test_make_scoring_reports_both_views_and_the_chosen_one(fitted):
    jsae, X = fitted
    tau = 0.05
    absolute = -jacobian_sparsity(jsae, X, [tau])[tau]
    normalized = -jacobian_sparsity(jsae, X, [tau], scale="normalized")[tau]
    assert absolute != normalized
    for scale, chosen in (("absolute", absolute), ("normalized", normalized)):
        scores = make_scoring(tau, scale=scale)(jsae, X)
        assert scores["neg_jacobian_sparsity"] == chosen
        assert scores["neg_jacobian_sparsity_absolute"] == absolute
        assert scores["neg_jacobian_sparsity_normalized"] == normalized
    by_factor = make_scoring(tau, scale=2.5)(jsae, X)
    assert by_factor["neg_jacobian_sparsity"] == -jacobian_sparsity(jsae, X, [tau], scale=2.5)[tau]
    assert make_jacobian_sparsity_scorer(tau, scale="normalized")(jsae, X) == normalized
    assert make_jacobian_sparsity_scorer(tau)(jsae, X) == absolute


def test_scorers_show_and_keep_their_scale(fitted):
    jsae, X = fitted
    assert repr(make_scoring()) == "make_scoring(threshold=0.01, scale='absolute')"
    assert repr(make_scoring(0.02, scale="normalized")) == "make_scoring(threshold=0.02, scale='normalized')"
    assert repr(make_scoring(scale=3)) == "make_scoring(threshold=0.01, scale=3.0)"
    scorer = make_jacobian_sparsity_scorer(0.02, scale="normalized")
    assert repr(scorer) == "make_jacobian_sparsity_scorer(threshold=0.02, scale='normalized')"
    for obj in (make_scoring(0.02, scale="normalized"), scorer):
        copy_ = pickle.loads(pickle.dumps(obj))
        assert repr(copy_) == repr(obj) and copy_(jsae, X) == obj(jsae, X)


def test_refit_rule_decides_in_the_normalized_view():
    X = make_X(n=240)
    search = GridSearchCV(
        JacobianSparseAutoencoder(make_mlp(out_gain=7.0), n_components=16, k=3, max_iter=2, random_state=0),
        {"l1": [0.0, 5.0]}, cv=2, scoring=make_scoring(0.01, scale="normalized"),
        refit=sparsest_within_tolerance(tolerance=0.5),
    ).fit(X)
    results = search.cv_results_
    np.testing.assert_array_equal(results["mean_test_neg_jacobian_sparsity"],
                                  results["mean_test_neg_jacobian_sparsity_normalized"])
    sparse = results["mean_test_neg_jacobian_sparsity_normalized"]
    assert search.best_index_ == int(np.argmax(sparse))  # within a loose tolerance: the sparsest
    absolute_rule = sparsest_within_tolerance(0.5, sparsity="neg_jacobian_sparsity_absolute")
    assert 0 <= absolute_rule(results) < 2


# -------------------------------------------------------------------------------------- plots


def test_histogram_in_the_normalized_view_is_the_factor_view(fitted):
    plt = pytest.importorskip("matplotlib.pyplot")
    from sklearn_jsae.plotting import plot_jacobian_histogram

    jsae, X = fitted
    try:
        absolute = plot_jacobian_histogram(jsae, X, bins=15)
        normalized = plot_jacobian_histogram(jsae, X, bins=15, scale="normalized")
        factor = plot_jacobian_histogram(jsae, X, bins=15, scale=jacobian_scale(jsae))
        (h_n, e_n), (h_f, e_f) = (ax.patches[0].get_data()[:2] for ax in (normalized, factor))
        np.testing.assert_array_equal(h_n, h_f)
        np.testing.assert_array_equal(e_n, e_f)
        top = np.abs(jsae.jacobian(X).data).max()
        assert absolute.patches[0].get_data()[1][-1] == pytest.approx(top, rel=1e-3)
        assert e_n[-1] == pytest.approx(jacobian_scale(jsae) * top, rel=1e-3)
        assert absolute.get_xlabel().startswith("|J|")
        assert normalized.get_xlabel().startswith("(c_x/c_y)·|J|")
        assert factor.get_xlabel().startswith(f"{jacobian_scale(jsae):g}·|J|")
        with pytest.raises(ValueError, match="scale must be"):
            plot_jacobian_histogram(jsae, X, scale="normalised")
    finally:
        plt.close("all")


def test_pareto_plots_the_column_of_the_view_asked_for():
    plt = pytest.importorskip("matplotlib.pyplot")
    from sklearn_jsae.plotting import plot_l1_pareto

    cv_results = {
        "param_l1": [0.0, 1.0, 4.0],
        "mean_test_explained_variance": [0.9, 0.85, 0.7],
        "mean_test_neg_jacobian_sparsity": [-0.6, -0.3, -0.1],
        "mean_test_neg_jacobian_sparsity_absolute": [-0.6, -0.3, -0.1],
        "mean_test_neg_jacobian_sparsity_normalized": [-0.5, -0.2, -0.05],
    }

    class Search:  # what GridSearchCV(scoring=make_scoring(...)) exposes
        def __init__(self, scoring):
            self.scoring, self.cv_results_, self.best_index_ = scoring, cv_results, 1

    try:
        ax = plot_l1_pareto(cv_results, scale="normalized")
        assert ax.get_lines()[0].get_xdata().tolist() == [0.05, 0.2, 0.5]
        assert "(c_x/c_y)·|J| > τ" in ax.get_xlabel()
        ax = plot_l1_pareto(Search(make_scoring(0.02, scale="absolute")), scale="normalized")
        assert "(c_x/c_y)·|J| > 0.02" in ax.get_xlabel()
        ax = plot_l1_pareto(Search(make_scoring(0.02, scale="normalized")))
        assert ax.get_lines()[0].get_xdata().tolist() == [0.1, 0.3, 0.6]  # the column as scored
        assert "(c_x/c_y)·|J| > 0.02" in ax.get_xlabel()
        ax = plot_l1_pareto(Search(make_scoring(0.02)))
        assert "with |J| > 0.02" in ax.get_xlabel()
        ax = plot_l1_pareto(cv_results)  # a bare dict: the view is unknown, the label says so
        assert "-neg_jacobian_sparsity" in ax.get_xlabel()
        with pytest.raises(ValueError, match=r"scale='normalized'.*sparsity='mine'"):
            plot_l1_pareto(cv_results, scale="normalized", sparsity="mine")
        with pytest.raises(ValueError, match=r"scale must be None.*got 2\.0.*make_scoring\(scale"):
            plot_l1_pareto(cv_results, scale=2.0)
        with pytest.raises(KeyError, match="neg_jacobian_sparsity_normalized"):
            plot_l1_pareto({k: v for k, v in cv_results.items() if not k.endswith("_normalized")},
                           scale="normalized")
    finally:
        plt.close("all")


# ------------------------------------------------------------------------- the paper's λ


def test_paper_lambda_follows_the_input_scale_squared_and_the_formula():
    """``paper_lambda_ = l1 · c_x² · k² / sqrt(d_in · d_out)``: data 3 times larger, λ 9 times larger
    for the same ``l1`` (the loss is normalised, so the same l1 weighs the penalty the same)."""
    X = make_X()
    small = fit(None, X, l1=2.0, max_iter=1)
    large = fit(None, 3 * X, l1=2.0, max_iter=1)
    c_x = np.sqrt(X.astype(np.float64).var(axis=0).mean())
    assert small.paper_lambda_ == pytest.approx(2.0 * c_x**2 * 3**2 / 6, rel=1e-4)
    assert large.paper_lambda_ / small.paper_lambda_ == pytest.approx(9.0, rel=1e-4)
    assert fit(None, X, l1=0.0, max_iter=1).paper_lambda_ == 0.0


def test_paper_lambda_needs_a_fitted_model():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        JacobianSparseAutoencoder().paper_lambda_
