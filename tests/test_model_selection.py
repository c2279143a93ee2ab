"""Tests of sklearn_jsae.model_selection: scorers in GridSearchCV and the refit rule."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.model_selection import GridSearchCV, cross_validate

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae.metrics import jacobian_sparsity, reconstruction_metrics
from sklearn_jsae.model_selection import (
    explained_variance_scorer,
    make_jacobian_sparsity_scorer,
    make_scoring,
    neg_dead_fraction_scorer,
    neg_jacobian_sparsity_scorer,
    neg_l0_scorer,
    sparsest_within_tolerance,
)

KEYS = {"explained_variance", "explained_variance_input", "explained_variance_output",
        "neg_jacobian_sparsity", "neg_jacobian_sparsity_absolute", "neg_jacobian_sparsity_normalized",
        "neg_l0", "neg_dead_fraction"}


def make_data(n=240, d=6, seed=0):
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
    rng = np.random.default_rng(seed)
    # sparse combinations of a few directions, so that SAEs have something to find
    atoms = rng.normal(size=(12, d))
    codes = rng.exponential(size=(n, 12)) * (rng.random((n, 12)) < 0.2)
    X = (codes @ atoms + 0.05 * rng.normal(size=(n, d))).astype(np.float32)
    return mlp, X


@pytest.fixture(scope="module")
def fitted():
    mlp, X = make_data()
    return JacobianSparseAutoencoder(mlp, n_components=24, k=3, max_iter=3, random_state=0).fit(X), X


def test_make_scoring_agrees_with_the_metrics(fitted):
    jsae, X = fitted
    scores = make_scoring(threshold=0.02)(jsae, X)
    assert set(scores) == KEYS
    metrics = reconstruction_metrics(jsae, X)
    assert scores["explained_variance"] == pytest.approx(jsae.score(X), abs=1e-5)
    assert scores["explained_variance_input"] == pytest.approx(metrics["input"]["explained_variance"])
    assert scores["explained_variance_output"] == pytest.approx(metrics["output"]["explained_variance"])
    assert scores["neg_jacobian_sparsity"] == pytest.approx(-jacobian_sparsity(jsae, X, [0.02])[0.02])
    assert scores["neg_jacobian_sparsity_absolute"] == scores["neg_jacobian_sparsity"]  # the default scale
    normalized = -jacobian_sparsity(jsae, X, [0.02], scale="normalized")[0.02]
    assert scores["neg_jacobian_sparsity_normalized"] == pytest.approx(normalized)
    assert -3 <= scores["neg_l0"] <= 0
    assert -1 <= scores["neg_dead_fraction"] <= 0


def test_single_scorers_match_the_multimetric_scorer(fitted):
    jsae, X = fitted
    scores = make_scoring(threshold=0.01)(jsae, X)
    assert explained_variance_scorer(jsae, X) == pytest.approx(scores["explained_variance"])
    assert neg_jacobian_sparsity_scorer(jsae, X) == pytest.approx(scores["neg_jacobian_sparsity"])
    assert make_jacobian_sparsity_scorer(0.01)(jsae, X) == pytest.approx(scores["neg_jacobian_sparsity"])
    assert neg_l0_scorer(jsae, X) == pytest.approx(scores["neg_l0"])
    assert neg_dead_fraction_scorer(jsae, X) == pytest.approx(scores["neg_dead_fraction"])
    assert make_jacobian_sparsity_scorer(1e9)(jsae, X) == 0.0


def test_scorers_reject_other_estimators_and_bad_thresholds():
    X = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    sae = TopKSparseAutoencoder(n_components=6, k=2, max_iter=1).fit(X)
    with pytest.raises(TypeError, match="JacobianSparseAutoencoder"):
        make_scoring()(sae, X)
    with pytest.raises(TypeError, match="JacobianSparseAutoencoder"):
        explained_variance_scorer(sae, X)
    for threshold in (-1, True, "0.01", float("nan"), float("inf")):
        message = r"threshold must be a finite number >= 0 \(the τ of \|J\| > τ\), got " + re.escape(repr(threshold))
        with pytest.raises(ValueError, match=message):
            make_scoring(threshold=threshold)
    with pytest.raises(ValueError, match="tolerance"):
        sparsest_within_tolerance(-0.1)
    with pytest.raises(TypeError, match="reconstruction must be a scorer name .str., got int"):
        sparsest_within_tolerance(0.1, reconstruction=1)


def test_scoring_objects_pickle_for_parallel_searches(fitted):
    jsae, X = fitted
    scoring = pickle.loads(pickle.dumps(make_scoring(0.01)))
    assert scoring(jsae, X) == make_scoring(0.01)(jsae, X)
    refit = pickle.loads(pickle.dumps(sparsest_within_tolerance(0.05)))
    assert refit({"mean_test_explained_variance": [0.9, 0.88], "mean_test_neg_jacobian_sparsity": [-0.5, -0.1]}) == 1


def test_grid_search_over_l1_refits_the_sparsest_within_tolerance():
    mlp, X = make_data()
    refit = sparsest_within_tolerance(tolerance=0.1)
    search = GridSearchCV(
        JacobianSparseAutoencoder(mlp, n_components=24, k=3, max_iter=4, random_state=0),
        {"l1": [0.0, 2.0, 20.0]}, cv=2, scoring=make_scoring(0.01), refit=refit,
    ).fit(X)
    results = search.cv_results_
    for key in KEYS:
        assert results[f"mean_test_{key}"].shape == (3,)
    recon = results["mean_test_explained_variance"]
    sparse = results["mean_test_neg_jacobian_sparsity"]
    best = search.best_index_
    assert recon[best] >= recon.max() - 0.1
    assert sparse[best] == sparse[recon >= recon.max() - 0.1].max()
    assert search.best_estimator_.l1 == results["param_l1"][best]
    # the penalty does what it is for: the strongest l1 gives the sparsest Jacobian
    assert sparse[2] > sparse[0]


def test_scorers_work_in_cross_validate_as_a_dict(fitted):
    mlp, X = make_data(n=120)
    result = cross_validate(
        JacobianSparseAutoencoder(mlp, n_components=16, k=2, max_iter=2, random_state=0), X, cv=2,
        scoring={"ev": explained_variance_scorer, "sparsity": make_jacobian_sparsity_scorer(0.01)},
    )
    assert result["test_ev"].shape == (2,) and np.all(result["test_ev"] <= 1)
    assert np.all((result["test_sparsity"] <= 0) & (result["test_sparsity"] >= -1))


@settings(max_examples=60, deadline=None)
@given(
    recon=st.lists(st.floats(-1, 1), min_size=1, max_size=8),
    seed=st.integers(0, 10_000),
    tolerance=st.floats(0, 0.5),
    relative=st.booleans(),
)
def test_refit_rule_invariants(recon, seed, tolerance, relative):
    recon = np.asarray(recon)
    sparse = -np.random.default_rng(seed).random(recon.size)
    chosen = sparsest_within_tolerance(tolerance, relative=relative)(
        {"mean_test_explained_variance": recon, "mean_test_neg_jacobian_sparsity": sparse})
    margin = tolerance * abs(recon.max()) if relative else tolerance
    eligible = recon >= recon.max() - margin
    assert eligible[chosen]
    assert sparse[chosen] == sparse[eligible].max()
    if tolerance == 0 and not relative:
        assert recon[chosen] == recon.max()


def test_refit_rule_edge_cases():
    rule = sparsest_within_tolerance(0.05)
    tie = {"mean_test_explained_variance": [0.80, 0.84, 0.83], "mean_test_neg_jacobian_sparsity": [-0.1, -0.1, -0.1]}
    assert rule(tie) == 1  # equally sparse: the better reconstruction wins
    nan = {"mean_test_explained_variance": [np.nan, 0.7], "mean_test_neg_jacobian_sparsity": [-0.01, -0.3]}
    assert rule(nan) == 1  # a failed candidate is never chosen
    with pytest.raises(KeyError, match="make_scoring"):
        rule({"mean_test_score": [1.0]})
    with pytest.raises(ValueError, match="NaN"):
        rule({"mean_test_explained_variance": [np.nan], "mean_test_neg_jacobian_sparsity": [np.nan]})
    custom = sparsest_within_tolerance(0.0, reconstruction="ev", sparsity="sparsity")
    assert custom({"mean_test_ev": [0.5, 0.9], "mean_test_sparsity": [0.0, -1.0]}) == 1


@settings(max_examples=40, deadline=None)
@given(n_recon=st.integers(0, 6), n_sparse=st.integers(0, 6))
def test_refit_rule_refuses_columns_of_unequal_length(n_recon, n_sparse):
    """Ragged columns were cut to the shorter one (the rule then chose among the candidates that
    happened to line up) or, when one was empty, gave 0; equal columns give an index in range."""
    cv = {"mean_test_explained_variance": np.linspace(0.5, 0.9, n_recon),
          "mean_test_neg_jacobian_sparsity": -np.linspace(0.1, 0.5, n_sparse)}
    rule = sparsest_within_tolerance(0.1)
    if n_recon != n_sparse:
        message = (rf"differ in length \({{'mean_test_explained_variance': {n_recon}, "
                   rf"'mean_test_neg_jacobian_sparsity': {n_sparse}}}\)")
        with pytest.raises(ValueError, match=message):
            rule(cv)
    elif n_recon == 0:
        with pytest.raises(ValueError, match="holds no candidate"):
            rule(cv)
    else:
        assert 0 <= rule(cv) < n_recon


def test_refit_rule_names_bad_cv_results_and_flags():
    rule = sparsest_within_tolerance()
    with pytest.raises(TypeError, match="cv_results must be a dict of columns.*got NoneType"):
        rule(None)
    strings = {"mean_test_explained_variance": ["a"], "mean_test_neg_jacobian_sparsity": [-0.1]}
    with pytest.raises(ValueError, match=r"cv_results_\['mean_test_explained_variance'\] must hold one number "
                                         r"per candidate, got \['a'\]"):
        rule(strings)
    for relative in ("no", None, 1):
        with pytest.raises(TypeError, match=rf"relative must be True or False, got {re.escape(repr(relative))}"):
            sparsest_within_tolerance(0.5, relative=relative)
    assert sparsest_within_tolerance(0.5, relative=np.bool_(True)).relative is True
