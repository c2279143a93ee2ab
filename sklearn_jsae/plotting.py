"""Figures for Jacobian sparse autoencoders (matplotlib is optional: ``pip install sklearn-jsae[plot]``).

====================================  ========================================================
:func:`plot_jacobian_histogram`       distribution of ``|J|`` over active entries, several models
:func:`plot_l1_pareto`                reconstruction vs Jacobian density of an l1 sweep
:func:`plot_jacobian_block`           the k_out × k_in Jacobian of one sample, latent labels
:func:`plot_top_edges`                the strongest input latents feeding one output latent
====================================  ========================================================

Every function draws on ``ax`` (a new figure when None) and returns the axes.  The histogram
and the Pareto front take the ``scale`` of :func:`~sklearn_jsae.metrics.jacobian_sparsity`
(``"absolute"``: the paper's ``|J|``; ``"normalized"``: ``(c_x / c_y) · |J|``, see
:ref:`absolute-normalised-thresholds`) and label their axis with it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np

from ._topk import _inference_device, _validate_X
from .metrics import global_jacobian_sparsity
from .metrics._sparsity import _check_scale, _resolve_scale
from .metrics._validation import (
    _check_bool,
    _check_index,
    _check_jsae,
    _check_positive_int,
    _check_positive_real,
    _check_thresholds,
)
from .model_selection import _JSAEScoring, _score_columns

__all__ = ["plot_jacobian_block", "plot_jacobian_histogram", "plot_l1_pareto", "plot_top_edges"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError(
            "sklearn_jsae.plotting needs matplotlib, an optional dependency: "
            "pip install 'sklearn-jsae[plot]' (or pip install matplotlib)."
        ) from exc
    return plt


def _axes(ax):
    if ax is not None:
        return ax
    return _pyplot().subplots()[1]


def _code_values(values, indices, latents):
    """The codes ``(values, indices)`` (1, k) of one row read at ``latents`` (0 where inactive)."""
    by_latent = dict(zip(indices[0].tolist(), values[0].tolist()))
    return np.array([by_latent.get(int(latent), 0.0) for latent in latents])


def _label(labels, latent):
    if labels is None:
        return str(int(latent))
    try:
        return str(labels[int(latent)])
    except (KeyError, IndexError, TypeError):
        return str(int(latent))


def _quantity(scale):
    """How ``scale`` writes the thresholded quantity on an axis."""
    if scale == "absolute":
        return "|J|"
    if scale == "normalized":
        return "(c_x/c_y)·|J|"
    return f"{scale:g}·|J|"


def _named(models):
    if isinstance(models, dict):
        return list(models.items())
    if isinstance(models, (list, tuple)):
        return [(f"model {i}", m) for i, m in enumerate(models)]
    return [(type(models).__name__, models)]


def plot_jacobian_histogram(models, X, *, thresholds=(0.01,), bins=60, min_value=1e-5, scale="absolute",
                            ax=None):
    """Histogram of ``|J|`` over the active Jacobian entries of one or several fitted models.

    Log-spaced bins from ``min_value`` to the largest entry; entries below ``min_value``
    (including exact zeros) are counted in the first bin.  Each curve is normalised to the
    fraction of that model's entries, so models with different k compare directly.  With
    ``scale="normalized"`` each model's entries are multiplied by its own ``c_x / c_y``
    (:func:`~sklearn_jsae.metrics.jacobian_scale`): the normalised Jacobian, which puts
    models and layers with different activation scales on one axis.

    Parameters
    ----------
    models : JacobianSparseAutoencoder, list of them, or dict {label: model}
        Fitted models, e.g. ``{"JSAE": jsae, "traditional": trad}``.
    X : array-like of shape (n_samples, n_features_in_)
    thresholds : float or sequence of float, default=(0.01,)
        Drawn as dashed vertical lines (none for an empty sequence).
    bins : int, default=60
    min_value : float, default=1e-5
    scale : {"absolute", "normalized"} or float, default="absolute"
        The quantity histogrammed (and what ``thresholds`` mark), as in
        :func:`~sklearn_jsae.metrics.jacobian_sparsity`: ``|J|``, ``(c_x / c_y) · |J|`` with
        each model's own scales, or ``a · |J|``; the x label says which.
    ax : matplotlib Axes, default=None

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np, torch
    >>> from sklearn_jsae import JacobianSparseAutoencoder
    >>> from sklearn_jsae.plotting import plot_jacobian_histogram
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 6))
    >>> X = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    >>> fit = lambda l1: JacobianSparseAutoencoder(mlp, n_components=16, k=3, l1=l1, max_iter=2,
    ...                                            random_state=0).fit(X)
    >>> ax = plot_jacobian_histogram({"JSAE": fit(1.0), "traditional": fit(0.0)}, X)
    >>> [t.get_text() for t in ax.get_legend().get_texts()][:2]
    ['JSAE', 'traditional']
    >>> ax = plot_jacobian_histogram(fit(1.0), X, scale="normalized")
    >>> ax.get_xlabel().startswith("(c_x/c_y)·|J|")
    True
    """
    scale = _check_scale(scale)
    thresholds = _check_thresholds(thresholds) if len(np.atleast_1d(thresholds)) else ()  # () draws no line
    bins = _check_positive_int(bins, "bins")
    min_value = _check_positive_real(min_value, "min_value")
    named = _named(models)
    if not named:
        raise ValueError("models is empty: pass a fitted JacobianSparseAutoencoder, a list or a dict of them.")
    values = {label: _abs_entries(model, X, scale) for label, model in named}
    top = max(max(float(v.max()) for v in values.values() if v.size), min_value * 10)
    edges = np.geomspace(min_value, top * 1.0001, bins + 1)
    ax = _axes(ax)
    for label, v in values.items():
        np.maximum(v, min_value, out=v)  # below min_value: the first bin (v is this call's own array)
        # By blocks: np.histogram sorts a copy of what it is given for uneven bins.
        counts = sum(np.histogram(v[start:start + (1 << 20)], bins=edges)[0] for start in range(0, v.size, 1 << 20))
        ax.stairs(counts / max(1, v.size), edges, linewidth=1.5, label=label)
    for tau in thresholds:
        ax.axvline(tau, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel(f"{_quantity(scale)} over active entries (first bin: below {min_value:g})")
    ax.set_ylabel("fraction of entries")
    ax.set_title("Normalised Jacobian magnitudes" if scale == "normalized" else "Jacobian magnitudes")
    ax.legend()
    return ax


def _abs_entries(model, X, scale) -> np.ndarray:
    """``factor · |J|`` of every active entry of ``model`` on X, in one array filled batch by batch.

    A list of the batches' blocks, concatenated, then ``abs`` and the factor (each a new array)
    held four copies of the entries at once: n · k² values, 4 KB a row at k = 32.  A memmap is read
    and checked batch by batch, not converted whole (a float16 store)."""
    _check_jsae(model, "every model")
    factor = _resolve_scale(model, scale)
    rows = _validate_X(model, X, reset=False, checked_in_batches=True)
    v, filled = None, 0
    for J, _, _ in model._iter_blocks(rows):
        if v is None:  # every row's block is k_out x k_in
            v = np.empty(rows.shape[0] * J.shape[1] * J.shape[2], dtype=J.dtype)
        part = v[filled:filled + J.size]
        np.abs(J.reshape(-1), out=part)
        if factor != 1:
            part *= factor
        filled += J.size
    return np.empty(0, dtype=np.float32) if v is None else v[:filled]


def _pareto_mask(cost, gain):
    """True where no other point has cost <= and gain >= with one strict; False for a point with
    a NaN (a failed fit under ``error_score=np.nan``), which no comparison would dominate."""
    finite = np.isfinite(cost) & np.isfinite(gain)
    mask = finite.copy()
    for a in np.flatnonzero(finite):
        dominated = (cost <= cost[a]) & (gain >= gain[a]) & ((cost < cost[a]) | (gain > gain[a]))
        mask[a] = not dominated.any()
    return mask


def plot_l1_pareto(search, *, reconstruction="explained_variance", sparsity="neg_jacobian_sparsity",
                   scale=None, param="l1", chosen=None, ax=None):
    """Reconstruction against Jacobian density for every candidate of an l1 sweep.

    The x axis is the Jacobian density (``-mean_test_<sparsity>``: the fraction of active
    entries above τ, lower is sparser) and the y axis the mean test ``reconstruction`` score;
    each point is labelled with its ``param`` value and the Pareto-optimal candidates are
    joined by a line.  The chosen candidate (``best_index_`` of a fitted search, or
    ``chosen``) is starred.  The x label says whether τ was on ``|J|`` or on the normalised
    ``(c_x / c_y) · |J|`` when that is known: from ``scale``, or from the search's
    ``scoring`` when it is a :func:`~sklearn_jsae.model_selection.make_scoring`.

    Parameters
    ----------
    search : fitted GridSearchCV / RandomizedSearchCV, or its ``cv_results_`` dict
        Scored with :func:`sklearn_jsae.model_selection.make_scoring` (or scorers with the
        names given below).
    reconstruction : str, default="explained_variance"
    sparsity : str, default="neg_jacobian_sparsity"
    scale : {"absolute", "normalized"} or None, default=None
        None plots the ``sparsity`` column, in whatever view the search was scored
        (``make_scoring(scale=...)``).  ``"absolute"`` or ``"normalized"`` plots
        ``make_scoring``'s ``neg_jacobian_sparsity_absolute`` or
        ``neg_jacobian_sparsity_normalized`` column instead (both are recorded whatever
        ``scale`` the scoring had), so one sweep can be drawn in either view; ``sparsity``
        must then be left at its default.  A number is refused: the scores are already
        computed, so a factor belongs in ``make_scoring(scale=...)``.
    param : str, default="l1"
    chosen : int or None, default=None
        Candidate index to star, in ``[0, n_candidates)``; None uses ``search.best_index_`` if
        it exists.
    ax : matplotlib Axes, default=None

    Returns
    -------
    ax : matplotlib Axes

    Raises
    ------
    TypeError
        If ``search`` is neither a fitted search nor a dict, or ``chosen`` is not an int.
    KeyError
        If a score column is missing.
    ValueError
        If ``chosen`` is out of range, or the score (and ``param_<param>``) columns differ in
        length or hold non-numbers.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from sklearn_jsae.plotting import plot_l1_pareto
    >>> cv_results = {"param_l1": [0.0, 0.5, 2.0, 8.0],
    ...               "mean_test_explained_variance": [0.90, 0.89, 0.85, 0.60],
    ...               "mean_test_neg_jacobian_sparsity": [-0.40, -0.10, -0.12, -0.01]}
    >>> ax = plot_l1_pareto(cv_results, chosen=1)
    >>> ax.get_lines()[0].get_xdata().tolist()   # the Pareto front: l1 = 0.0, 0.5, 8.0
    [0.01, 0.1, 0.4]
    >>> cv_results["mean_test_neg_jacobian_sparsity_normalized"] = [-0.30, -0.05, -0.08, -0.01]
    >>> ax = plot_l1_pareto(cv_results, scale="normalized")
    >>> ax.get_lines()[0].get_xdata().tolist(), "(c_x/c_y)·|J|" in ax.get_xlabel()
    ([0.01, 0.05, 0.3], True)
    """
    cv_results = getattr(search, "cv_results_", search)
    if not isinstance(cv_results, Mapping):
        fitted_later = " (not fitted yet: fit it first)" if hasattr(search, "get_params") else ""
        raise TypeError(
            f"search must be a fitted GridSearchCV / RandomizedSearchCV or its cv_results_ dict, got "
            f"{type(search).__name__}{fitted_later}."
        )
    if chosen is None:
        chosen = getattr(search, "best_index_", None)
    sparsity, view, tau = _pareto_column(search, sparsity, scale)
    gain, cost = _score_columns(cv_results, (reconstruction, sparsity))
    cost = -cost
    values = list(cv_results.get(f"param_{param}", [None] * gain.size))
    if len(values) != gain.size:
        raise ValueError(f"cv_results['param_{param}'] has {len(values)} values but the score columns have "
                         f"{gain.size}; each must hold one entry per candidate.")
    if chosen is not None:
        chosen = _check_index(chosen, "chosen", gain.size, "candidates")
    ax = _axes(ax)
    front = _pareto_mask(cost, gain)
    order = np.argsort(cost[front])
    ax.plot(cost[front][order], gain[front][order], "-", color="tab:blue", label="Pareto front")
    ax.scatter(cost, gain, color="tab:blue", zorder=3)
    for a, value in enumerate(values):
        if value is not None:
            ax.annotate(f"{param}={value:g}" if isinstance(value, numbers.Real) else f"{param}={value}",
                        (cost[a], gain[a]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if chosen is not None:
        ax.scatter([cost[chosen]], [gain[chosen]], marker="*", s=250, color="tab:red", zorder=4, label="chosen")
    if view is None:
        ax.set_xlabel(f"Jacobian density (-{sparsity}; lower is sparser)")
    else:
        above = f"{_quantity(view)} > " + ("τ" if tau is None else f"{tau:g}")
        ax.set_xlabel(f"Jacobian density: fraction of active entries with {above} (lower is sparser)")
    ax.set_ylabel(reconstruction.replace("_", " "))
    ax.set_title("l1 sweep")
    ax.legend()
    return ax


def _pareto_column(search, sparsity, scale):
    """``(column name, scale of that column or None if unknown, τ or None)`` for plot_l1_pareto."""
    scoring = getattr(search, "scoring", None)
    scoring = scoring if isinstance(scoring, _JSAEScoring) else None
    tau = None if scoring is None else scoring.threshold
    if scale is None:
        if scoring is not None and sparsity == "neg_jacobian_sparsity":
            return sparsity, scoring.scale, tau
        for view in ("absolute", "normalized"):
            if sparsity == f"neg_jacobian_sparsity_{view}":
                return sparsity, view, tau
        return sparsity, None, None
    if scale not in ("absolute", "normalized"):
        raise ValueError(
            f"scale must be None, 'absolute' or 'normalized' (which make_scoring column to plot), got "
            f"{scale!r}; the scores are already computed, so a factor belongs in make_scoring(scale=...)."
        )
    if sparsity != "neg_jacobian_sparsity":
        raise ValueError(
            f"scale={scale!r} plots make_scoring's neg_jacobian_sparsity_{scale} column, but sparsity="
            f"{sparsity!r} names another; pass one of them (scale=None to plot {sparsity!r})."
        )
    return f"neg_jacobian_sparsity_{scale}", scale, tau


def plot_jacobian_block(estimator, x, *, input_labels=None, output_labels=None, sort=True, cmap="RdBu_r", ax=None):
    """Heatmap of the k_out × k_in Jacobian of one sample, rows and columns labelled by latent.

    Parameters
    ----------
    estimator : fitted JacobianSparseAutoencoder
    x : array-like of shape (n_features_in_,) or (1, n_features_in_)
        One MLP input.
    input_labels, output_labels : sequence or dict, default=None
        Names of latents indexed by latent id (e.g. from auto-interpretation); missing
        entries fall back to the id.
    sort : bool, default=True
        Order rows and columns by decreasing latent activation (else by position in TopK).
    cmap : str, default="RdBu_r"
        A diverging map, centred on 0.
    ax : matplotlib Axes, default=None

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from sklearn_jsae import JacobianSparseAutoencoder
    >>> from sklearn_jsae.plotting import plot_jacobian_block
    >>> X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    >>> jsae = JacobianSparseAutoencoder(n_components=12, k=3, max_iter=2, random_state=0).fit(X)
    >>> ax = plot_jacobian_block(jsae, X[0])
    >>> ax.images[0].get_array().shape
    (3, 3)
    """
    _check_jsae(estimator)
    sort = _check_bool(sort, "sort")
    x = np.asarray(x)
    if x.ndim > 2 or (x.ndim == 2 and x.shape[0] != 1):
        raise ValueError(f"x must be one MLP input, of shape (n_features_in_,) or (1, n_features_in_); got "
                         f"shape {x.shape}. Pass a single row, e.g. X[0].")
    x = _validate_X(estimator, x.reshape(1, -1), reset=False)
    (J, idx_y, idx_x), = list(estimator._iter_blocks(x))
    J, idx_y, idx_x = J[0], idx_y[0], idx_x[0]
    if sort:  # the codes' values, whatever container transform returns (CSR, ndarray, DataFrame)
        rows = np.argsort(-_code_values(*estimator._output_codes(x), idx_y), kind="stable")
        cols = np.argsort(-_code_values(*estimator.input_sae_._codes(x, _inference_device(estimator)), idx_x),
                          kind="stable")
        J, idx_y, idx_x = J[np.ix_(rows, cols)], idx_y[rows], idx_x[cols]
    ax = _axes(ax)
    limit = float(np.abs(J).max()) or 1.0
    image = ax.imshow(J, cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    ax.figure.colorbar(image, ax=ax, label="∂s_y/∂s_x")
    ax.set_xticks(range(len(idx_x)))
    ax.set_xticklabels([_label(input_labels, j) for j in idx_x], rotation=90, fontsize=7)
    ax.set_yticks(range(len(idx_y)))
    ax.set_yticklabels([_label(output_labels, i) for i in idx_y], fontsize=7)
    ax.set_xlabel("active input latent")
    ax.set_ylabel("active output latent")
    ax.set_title("Jacobian of one sample")
    return ax


def plot_top_edges(estimator, X, output_latent, *, n_edges=10, input_labels=None, output_label=None, ax=None):
    """The input latents with the largest mean ``|J|`` into one output latent (its strongest edges).

    Uses the global mean ``G[i, j]`` of :func:`~sklearn_jsae.metrics.global_jacobian_sparsity`:
    the mean of |J_t[i, j]| over the rows of X where output latent i is active.

    Parameters
    ----------
    estimator : fitted JacobianSparseAutoencoder
    X : array-like of shape (n_samples, n_features_in_)
    output_latent : int
    n_edges : int, default=10
    input_labels : sequence or dict, default=None
    output_label : str, default=None
    ax : matplotlib Axes, default=None

    Returns
    -------
    ax : matplotlib Axes
        Horizontal bars, strongest edge on top.

    Raises
    ------
    TypeError
        If ``output_latent`` is not an int (a bool, float or str is refused, not rounded).
    ValueError
        If the output latent is out of range or never active on X.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from sklearn_jsae import JacobianSparseAutoencoder
    >>> from sklearn_jsae.plotting import plot_top_edges
    >>> X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    >>> jsae = JacobianSparseAutoencoder(n_components=12, k=3, max_iter=2, random_state=0).fit(X)
    >>> latent = int(jsae.transform_output(X).indices[0])
    >>> ax = plot_top_edges(jsae, X, latent, n_edges=4)
    >>> 1 <= len(ax.patches) <= 4
    True
    """
    _check_jsae(estimator)
    n_edges = _check_positive_int(n_edges, "n_edges")
    n_out = estimator.output_sae_.components_.shape[0]
    output_latent = _check_index(output_latent, "output_latent", n_out, "output-SAE latents")
    _, G = global_jacobian_sparsity(estimator, X, thresholds=[0.0], return_matrix=True)
    row = G[[output_latent], :].tocoo()
    if row.nnz == 0:
        raise ValueError(
            f"output latent {output_latent} is never active on X (or all its Jacobian entries are 0); "
            f"pick one that fires, e.g. from estimator.transform_output(X).indices."
        )
    cols = np.asarray(row.coords[1])
    order = np.argsort(-row.data, kind="stable")[:n_edges]
    latents, strengths = cols[order], row.data[order]
    ax = _axes(ax)
    positions = np.arange(len(latents))[::-1]
    ax.barh(positions, strengths, color="tab:blue")
    ax.set_yticks(positions)
    ax.set_yticklabels([_label(input_labels, j) for j in latents], fontsize=8)
    ax.set_xlabel("mean |J| when the output latent is active")
    ax.set_ylabel("input latent")
    name = output_label if output_label is not None else f"output latent {output_latent}"
    ax.set_title(f"Strongest edges into {name}")
    return ax
