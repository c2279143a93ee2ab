"""Tests of sklearn_jsae.plotting (matplotlib, Agg backend)."""

from __future__ import annotations

import copy
import re
import sys

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae.metrics import global_jacobian_sparsity
from sklearn_jsae.plotting import (
    plot_jacobian_block,
    plot_jacobian_histogram,
    plot_l1_pareto,
    plot_top_edges,
)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 20), torch.nn.GELU(), torch.nn.Linear(20, 5))
    X = np.random.default_rng(0).normal(size=(80, 5)).astype(np.float32)
    fit = lambda l1: JacobianSparseAutoencoder(mlp, n_components=16, k=3, l1=l1, max_iter=2,
                                               random_state=0).fit(X)
    return {"JSAE": fit(2.0), "traditional": fit(0.0)}, X


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_histogram_draws_one_normalised_curve_per_model(models):
    named, X = models
    ax = plot_jacobian_histogram(named, X, thresholds=(0.005, 0.01), bins=20)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["JSAE", "traditional"]
    assert len(ax.patches) == 2  # one step histogram per model
    for patch, jsae in zip(ax.patches, named.values()):
        heights, edges, _ = patch.get_data()
        assert heights.sum() == pytest.approx(1.0)  # every entry counted once, as a fraction
        assert len(edges) == 21 and edges[0] == 1e-5
        assert edges[-1] >= np.abs(jsae.jacobian(X).data).max()
    assert len(ax.get_lines()) == 2 and ax.get_xscale() == "log"
    lone = plot_jacobian_histogram(named["JSAE"], X)
    assert len(lone.patches) == 1
    assert len(plot_jacobian_histogram(named, X, thresholds=()).get_lines()) == 0
    assert len(plot_jacobian_histogram(named, X, thresholds=0.02).get_lines()) == 1


def test_pareto_front_joins_only_undominated_candidates():
    cv_results = {
        "param_l1": [0.0, 0.5, 1.0, 2.0, 8.0],
        "mean_test_explained_variance": [0.90, 0.88, 0.80, 0.85, 0.60],
        "mean_test_neg_jacobian_sparsity": [-0.40, -0.20, -0.25, -0.10, -0.02],
    }
    ax = plot_l1_pareto(cv_results, chosen=3)
    front = ax.get_lines()[0]
    assert front.get_xdata().tolist() == [0.02, 0.10, 0.20, 0.40]  # l1 = 1.0 is dominated by 0.5
    assert front.get_ydata().tolist() == [0.60, 0.85, 0.88, 0.90]
    assert any("l1=2" in t.get_text() for t in ax.texts) and len(ax.texts) == 5
    assert len(ax.collections) == 2  # the candidates, and the starred choice


def test_a_failed_candidate_is_not_on_the_pareto_front():
    """A fit that failed under ``error_score=np.nan`` has NaN scores, which no point dominates: it
    was drawn as a point of the front."""
    cv_results = {
        "param_l1": [0.0, 1.0, 4.0, 8.0],
        "mean_test_explained_variance": [0.90, 0.85, np.nan, 0.60],
        "mean_test_neg_jacobian_sparsity": [-0.40, -0.10, np.nan, -0.02],
    }
    front = plot_l1_pareto(cv_results).get_lines()[0]
    assert front.get_xdata().tolist() == [0.02, 0.10, 0.40]
    assert front.get_ydata().tolist() == [0.60, 0.85, 0.90]


def test_pareto_reads_a_fitted_search_and_names_missing_scores():
    class Search:
        def __init__(self):
            self.cv_results_ = {"param_l1": [0.0, 1.0], "mean_test_explained_variance": [0.9, 0.8],
                                "mean_test_neg_jacobian_sparsity": [-0.5, -0.1]}
            self.best_index_ = 1

    ax = plot_l1_pareto(Search())
    starred = ax.collections[1].get_offsets()
    assert np.allclose(starred, [[0.1, 0.8]])
    with pytest.raises(KeyError, match="make_scoring"):
        plot_l1_pareto({"mean_test_score": [1.0]})


def test_jacobian_block_shows_the_sample_block_with_labels(models):
    named, X = models
    jsae = named["JSAE"]
    labels = {i: f"in-{i}" for i in range(16)}
    ax = plot_jacobian_block(jsae, X[3], input_labels=labels, sort=False)
    image = ax.images[0].get_array()
    J = jsae.jacobian(X[3:4])
    idx_x = np.unique(J.coords[2])
    assert image.shape == (3, 3)
    assert np.allclose(np.sort(np.abs(image).ravel()), np.sort(np.abs(J.data)), atol=1e-6)
    tick_labels = [t.get_text() for t in ax.get_xticklabels()]
    assert sorted(tick_labels) == sorted(f"in-{i}" for i in idx_x)
    vmin, vmax = ax.images[0].get_clim()
    assert vmin == -vmax  # centred colour scale


@pytest.mark.parametrize("output", ["sparse", "dense", "pandas"])
def test_jacobian_block_sorts_by_activation(models, output):
    """Both axes by decreasing activation, whatever ``transform`` returns (it read ``.toarray()`` of
    the codes, which dense and DataFrame outputs do not have)."""
    named, X = models
    jsae = copy.deepcopy(named["traditional"])
    if output != "sparse":
        jsae.set_params(sparse_output=False)
    if output == "pandas":
        pytest.importorskip("pandas")
        jsae.set_output(transform="pandas")
    ax = plot_jacobian_block(jsae, X[0])
    reference = copy.deepcopy(named["traditional"])
    s_x, s_y = reference.transform(X[:1]).toarray()[0], reference.transform_output(X[:1]).toarray()[0]
    shown_x = [int(t.get_text()) for t in ax.get_xticklabels()]
    shown_y = [int(t.get_text()) for t in ax.get_yticklabels()]
    assert list(s_x[shown_x]) == sorted(s_x[shown_x], reverse=True) and s_x[shown_x].min() > 0
    assert list(s_y[shown_y]) == sorted(s_y[shown_y], reverse=True) and s_y[shown_y].min() > 0
    assert len(set(s_x[shown_x])) > 1  # an order to check


def test_top_edges_are_the_largest_mean_jacobian_entries(models):
    named, X = models
    jsae = named["traditional"]
    _, G = global_jacobian_sparsity(jsae, X, thresholds=[0.0], return_matrix=True)
    latent = int(np.argmax(np.diff(G.indptr)))  # the output latent with the most edges
    ax = plot_top_edges(jsae, X, latent, n_edges=3, output_label="my latent")
    widths = [p.get_width() for p in ax.patches]
    row = np.sort(G[[latent], :].toarray()[0])[::-1]
    assert widths == pytest.approx(list(row[: len(widths)]))
    assert len(widths) == min(3, np.count_nonzero(row))
    assert "my latent" in ax.get_title() and ax.get_ylabel() == "input latent"


def test_top_edges_rejects_inactive_or_out_of_range_latents(models):
    named, X = models
    jsae = named["JSAE"]
    with pytest.raises(ValueError, match="out of range"):
        plot_top_edges(jsae, X, 99)
    silenced = copy.deepcopy(jsae)
    silenced.output_sae_.encoder_bias_[5] = -1e4  # never among the top k
    assert 5 not in set(silenced.transform_output(X).indices.tolist())
    with pytest.raises(ValueError, match="output latent 5 is never active"):
        plot_top_edges(silenced, X, 5)


@pytest.mark.parametrize("call, message", [
    (lambda named, X: plot_jacobian_histogram({}, X), "models is empty"),
    (lambda named, X: plot_jacobian_histogram(named, X, bins=0), "bins must be an int >= 1, got 0"),
    (lambda named, X: plot_jacobian_histogram(named, X, min_value=0.0), "min_value must be a finite number > 0"),
    (lambda named, X: plot_jacobian_histogram(named, X, thresholds=(-1,)), "thresholds must be a non-empty"),
    (lambda named, X: plot_jacobian_block(named["JSAE"], X[:2]), r"x must be one MLP input.*got shape \(2, 5\)"),
    (lambda named, X: plot_top_edges(named["JSAE"], X, 0, n_edges=0), "n_edges must be an int >= 1, got 0"),
])
def test_bad_plot_arguments_are_named(models, call, message):
    named, X = models
    with pytest.raises(ValueError, match=message):
        call(named, X)


def test_missing_matplotlib_gives_an_install_hint(monkeypatch, models):
    named, X = models
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"sklearn-jsae\[plot\]"):
        plot_jacobian_block(named["JSAE"], X[0])


PARETO = {
    "param_l1": [0.0, 0.5, 2.0],
    "mean_test_explained_variance": [0.9, 0.89, 0.85],
    "mean_test_neg_jacobian_sparsity": [-0.4, -0.1, -0.05],
}


@pytest.mark.parametrize("chosen, error, message", [
    (10, ValueError, r"chosen=10 is out of range: there are 3 candidates, so it must be in \[0, 2\]"),
    (-1, ValueError, r"chosen=-1 is out of range"),
    ("a", TypeError, r"chosen must be an int \(an index into the 3 candidates\), got 'a'"),
    (1.0, TypeError, r"chosen must be an int .*got 1.0"),
    (True, TypeError, r"chosen must be an int .*got True"),
])
def test_pareto_chosen_must_be_a_candidate_index(chosen, error, message):
    """chosen=10 or "a" was a bare IndexError from numpy."""
    with pytest.raises(error, match=message):
        plot_l1_pareto(PARETO, chosen=chosen)


def test_pareto_stars_a_numpy_int_choice():
    ax = plot_l1_pareto(PARETO, chosen=np.int64(2))
    assert np.allclose(ax.collections[1].get_offsets(), [[0.05, 0.85]])


def test_pareto_refuses_an_unfitted_search_and_ragged_columns():
    from sklearn.model_selection import GridSearchCV

    with pytest.raises(TypeError, match=r"got GridSearchCV \(not fitted yet: fit it first\)"):
        plot_l1_pareto(GridSearchCV(JacobianSparseAutoencoder(), {"l1": [0.0, 1.0]}))
    with pytest.raises(TypeError, match="cv_results_ dict, got NoneType"):
        plot_l1_pareto(None)
    ragged = dict(PARETO, mean_test_neg_jacobian_sparsity=[-0.4])
    with pytest.raises(ValueError, match=r"differ in length .*'mean_test_explained_variance': 3, "
                                         r"'mean_test_neg_jacobian_sparsity': 1"):
        plot_l1_pareto(ragged)
    with pytest.raises(ValueError, match=r"cv_results\['param_l1'\] has 2 values but the score columns have 3"):
        plot_l1_pareto(dict(PARETO, param_l1=[0.0, 0.5]))


@pytest.mark.parametrize("latent", [2.7, "3", "a", None, float("nan"), True])
def test_top_edges_output_latent_must_be_an_int(models, latent):
    """output_latent=2.7, "3" or True was silently cast with int(); "a", None and nan gave int()'s
    own errors, which do not name output_latent."""
    named, X = models
    with pytest.raises(TypeError, match=rf"output_latent must be an int \(an index into the 16 output-SAE "
                                        rf"latents\), got {re.escape(repr(latent))}"):
        plot_top_edges(named["JSAE"], X, latent)


def test_top_edges_take_a_numpy_int_latent(models):
    named, X = models
    jsae = named["traditional"]
    latent = jsae.transform_output(X).indices[0]  # a numpy int32
    assert plot_top_edges(jsae, X, latent).get_title() == f"Strongest edges into output latent {int(latent)}"


def test_jacobian_block_sort_must_be_a_bool(models):
    named, X = models
    with pytest.raises(TypeError, match="sort must be True or False, got 'no'"):
        plot_jacobian_block(named["JSAE"], X[0], sort="no")
