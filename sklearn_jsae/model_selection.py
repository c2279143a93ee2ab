"""Scorers and a ``refit`` rule for choosing ``l1`` with scikit-learn's model selection tools.

An l1 sweep trades reconstruction for Jacobian sparsity.  The scorers here follow
scikit-learn's convention that higher is better, so quantities where lower is better carry
a ``neg_`` prefix (as ``neg_mean_squared_error`` does):

====================================  ===================================================================
``explained_variance``                mean explained variance of the two SAEs (= ``estimator.score``)
``explained_variance_input``          explained variance of the input SAE on X
``explained_variance_output``         explained variance of the output SAE on mlp(X)
``neg_jacobian_sparsity``             minus the mean fraction of active Jacobian entries with ``|J|`` > τ
                                      (or ``(c_x / c_y) · |J|`` > τ: :func:`make_scoring`'s ``scale``)
``neg_jacobian_sparsity_absolute``    the same with τ on ``|J|`` (the paper's view), whatever ``scale``
``neg_jacobian_sparsity_normalized``  the same with τ on ``(c_x / c_y) · |J|``, whatever ``scale``
``neg_l0``                            minus the mean number of non-zero latents per row (both SAEs)
``neg_dead_fraction``                 minus the fraction of latents (both SAEs) never active on X
====================================  ===================================================================

:func:`make_scoring` returns one callable that computes all of them in a single pass over
the test fold (one reconstruction pass, one Jacobian pass), usable directly as
``GridSearchCV(scoring=make_scoring())``; the ``*_scorer`` objects compute one each.  The
Jacobian scores take the ``scale`` of :func:`~sklearn_jsae.metrics.jacobian_sparsity`:
``"absolute"`` (the paper's τ on J, the default) or ``"normalized"`` (τ on
``(c_x / c_y) · J``, each candidate's own scales), so that a sweep can be read in either view
(:ref:`absolute-normalised-thresholds`).
:func:`sparsest_within_tolerance` is a ``refit`` callable that picks the sparsest Jacobian
among the candidates whose reconstruction is within a tolerance of the best.  Every scorer also
scores a fitted :class:`~sklearn.pipeline.Pipeline` with one ``JacobianSparseAutoencoder`` step
(a search over ``make_pipeline(..., JacobianSparseAutoencoder(...))``): that step, on X sent
through the steps before it.

Examples
--------
>>> import numpy as np, torch
>>> from sklearn.model_selection import GridSearchCV
>>> from sklearn_jsae import JacobianSparseAutoencoder
>>> from sklearn_jsae.model_selection import make_scoring, sparsest_within_tolerance
>>> torch.manual_seed(0) and None
>>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
>>> X = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
>>> search = GridSearchCV(
...     JacobianSparseAutoencoder(mlp, n_components=32, k=4, max_iter=3, random_state=0),
...     {"l1": [0.0, 0.5, 5.0]}, cv=2,
...     scoring=make_scoring(threshold=0.01),
...     refit=sparsest_within_tolerance(tolerance=0.05),
... ).fit(X)
>>> search.best_params_["l1"] in (0.0, 0.5, 5.0), hasattr(search.best_estimator_, "jacobian_")
(True, True)
>>> sorted(k for k in search.cv_results_ if k.startswith("mean_test_"))[:2]
['mean_test_explained_variance', 'mean_test_explained_variance_input']
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np

from .metrics import jacobian_sparsity, reconstruction_metrics
from .metrics._sparsity import _check_scale, _jacobian_sparsity_views
from .metrics._validation import _check_bool, _check_jsae

__all__ = [
    "explained_variance_scorer",
    "make_jacobian_sparsity_scorer",
    "make_scoring",
    "neg_dead_fraction_scorer",
    "neg_jacobian_sparsity_scorer",
    "neg_l0_scorer",
    "sparsest_within_tolerance",
]


def _reconstruction_scores(estimator, X) -> dict:
    metrics = reconstruction_metrics(estimator, X)
    x, y = metrics["input"], metrics["output"]
    n_x = estimator.input_sae_.components_.shape[0]
    n_y = estimator.output_sae_.components_.shape[0]
    return {
        "explained_variance": (x["explained_variance"] + y["explained_variance"]) / 2,
        "explained_variance_input": x["explained_variance"],
        "explained_variance_output": y["explained_variance"],
        "neg_l0": -(x["l0"] + y["l0"]) / 2,
        "neg_dead_fraction": -(x["dead_fraction"] * n_x + y["dead_fraction"] * n_y) / (n_x + n_y),
    }


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) \
            or not 0 <= threshold < math.inf:
        raise ValueError(f"threshold must be a finite number >= 0 (the τ of |J| > τ), got {threshold!r}.")
    return float(threshold)


def _scored_jsae(estimator, X):
    """``(jsae, X)`` for a scorer: a fitted JSAE as it is, or the one JSAE step of a fitted
    ``Pipeline`` (a search over ``make_pipeline(..., JacobianSparseAutoencoder(...))``) with X
    sent through the steps before it, as the pipeline's own ``fit`` sent the training data."""
    from sklearn.frozen import FrozenEstimator
    from sklearn.pipeline import Pipeline

    from ._estimator import JacobianSparseAutoencoder

    def unfrozen(step):  # a fitted JSAE kept as it is in a pipeline (scikit-learn's FrozenEstimator)
        return step.estimator if isinstance(step, FrozenEstimator) else step

    if isinstance(estimator, Pipeline):
        at = [i for i, (_, step) in enumerate(estimator.steps)
              if isinstance(unfrozen(step), JacobianSparseAutoencoder)]
        if len(at) != 1:
            raise TypeError(
                f"estimator is a Pipeline with {len(at)} JacobianSparseAutoencoder steps; the JSAE scorers "
                f"score one: pass a pipeline with exactly one, or score its JSAE step directly."
            )
        jsae = unfrozen(estimator.steps[at[0]][1])
        _check_jsae(jsae, f"the pipeline's step {estimator.steps[at[0]][0]!r}")
        return jsae, (estimator[: at[0]].transform(X) if at[0] else X)
    _check_jsae(unfrozen(estimator))
    return unfrozen(estimator), X


class _JSAEScoring:
    """Callable ``(estimator, X, y=None) -> dict`` of every score (see module docstring)."""

    def __init__(self, threshold, scale):
        self.threshold = _check_threshold(threshold)
        self.scale = _check_scale(scale)

    def __call__(self, estimator, X, y=None):
        estimator, X = _scored_jsae(estimator, X)
        scores = _reconstruction_scores(estimator, X)
        tau = self.threshold
        views = _jacobian_sparsity_views(estimator, X, [tau], [self.scale, "absolute", "normalized"])
        chosen, absolute, normalized = (-per_sample[tau] for per_sample, _ in views)
        scores["neg_jacobian_sparsity"] = chosen
        scores["neg_jacobian_sparsity_absolute"] = absolute
        scores["neg_jacobian_sparsity_normalized"] = normalized
        return scores

    def __repr__(self):
        return f"make_scoring(threshold={self.threshold!r}, scale={self.scale!r})"


def make_scoring(threshold=0.01, scale="absolute"):
    """All JSAE scores in one pass, for ``GridSearchCV(scoring=...)`` / ``cross_validate``.

    Parameters
    ----------
    threshold : float, default=0.01
        τ of ``neg_jacobian_sparsity`` (minus the mean fraction of active entries with ``|J|`` > τ).
    scale : {"absolute", "normalized"} or float, default="absolute"
        What τ of ``neg_jacobian_sparsity`` is compared with, as in
        :func:`~sklearn_jsae.metrics.jacobian_sparsity`: ``|J|`` (the paper's τ),
        ``(c_x / c_y) · |J|`` with each candidate's own scales (the normalised Jacobian, which
        the penalty acts on; comparable across layers whose activation scales differ) or
        ``a · |J|``.  The refit rule and :func:`~sklearn_jsae.plotting.plot_l1_pareto` read
        ``neg_jacobian_sparsity``, so this chooses the view the sweep is decided in;
        ``neg_jacobian_sparsity_absolute`` and ``neg_jacobian_sparsity_normalized`` are
        recorded either way, from the same Jacobian pass.

    Returns
    -------
    scoring : callable
        ``scoring(estimator, X, y=None)`` returns a dict with the keys ``explained_variance``,
        ``explained_variance_input``, ``explained_variance_output``, ``neg_jacobian_sparsity``,
        ``neg_jacobian_sparsity_absolute``, ``neg_jacobian_sparsity_normalized``, ``neg_l0``
        and ``neg_dead_fraction``; scikit-learn records each as ``mean_test_<key>`` in
        ``cv_results_``.  With a dict-returning scorer, ``refit`` must be a key or a callable
        such as :func:`sparsest_within_tolerance`.

    Raises
    ------
    ValueError
        If ``threshold`` is not a number >= 0 or ``scale`` is none of the above.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_jsae import JacobianSparseAutoencoder
    >>> from sklearn_jsae.model_selection import make_scoring
    >>> X = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    >>> jsae = JacobianSparseAutoencoder(n_components=8, k=2, max_iter=2, random_state=0).fit(X)
    >>> scores = make_scoring()(jsae, X)
    >>> bool(np.isclose(scores["explained_variance"], jsae.score(X), atol=1e-5))
    True
    >>> -1 <= scores["neg_jacobian_sparsity"] <= 0
    True
    >>> scores["neg_jacobian_sparsity"] == scores["neg_jacobian_sparsity_absolute"]
    True
    >>> scoring = make_scoring(scale="normalized")
    >>> scoring
    make_scoring(threshold=0.01, scale='normalized')
    >>> scoring(jsae, X)["neg_jacobian_sparsity"] == scores["neg_jacobian_sparsity_normalized"]
    True
    """
    return _JSAEScoring(threshold, scale)


class _SingleScorer:
    def __init__(self, name, fn):
        self.name, self._fn = name, fn

    def __call__(self, estimator, X, y=None):
        estimator, X = _scored_jsae(estimator, X)
        return float(self._fn(estimator, X))

    def __repr__(self):
        return f"<sklearn_jsae scorer {self.name}>"


class _JacobianSparsityScorer:
    """Scorer ``-jacobian_sparsity(estimator, X, [τ], scale=scale)[τ]``."""

    def __init__(self, threshold, scale):
        self.threshold = _check_threshold(threshold)
        self.scale = _check_scale(scale)

    def __call__(self, estimator, X, y=None):
        estimator, X = _scored_jsae(estimator, X)
        return -jacobian_sparsity(estimator, X, [self.threshold], scale=self.scale)[self.threshold]

    def __repr__(self):
        return f"make_jacobian_sparsity_scorer(threshold={self.threshold!r}, scale={self.scale!r})"


def make_jacobian_sparsity_scorer(threshold=0.01, scale="absolute"):
    """Scorer ``-jacobian_sparsity(estimator, X, [τ], scale=scale)[τ]``: higher (closer to 0) is sparser.

    Parameters
    ----------
    threshold : float, default=0.01
    scale : {"absolute", "normalized"} or float, default="absolute"
        As in :func:`make_scoring`: τ on ``|J|`` (the paper's), on ``(c_x / c_y) · |J|`` with
        the scored estimator's own scales, or on ``a · |J|``.

    Returns
    -------
    scorer : callable ``(estimator, X, y=None) -> float`` in [-1, 0].

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_jsae import JacobianSparseAutoencoder
    >>> from sklearn_jsae.metrics import jacobian_sparsity
    >>> from sklearn_jsae.model_selection import make_jacobian_sparsity_scorer
    >>> X = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    >>> jsae = JacobianSparseAutoencoder(n_components=8, k=2, max_iter=2, random_state=0).fit(X)
    >>> -1.0 <= make_jacobian_sparsity_scorer(0.01)(jsae, X) <= 0.0
    True
    >>> scorer = make_jacobian_sparsity_scorer(0.01, scale="normalized")
    >>> scorer(jsae, X) == -jacobian_sparsity(jsae, X, 0.01, scale="normalized")[0.01]
    True
    """
    return _JacobianSparsityScorer(threshold, scale)


#: Mean explained variance of the two SAEs (higher is better).
explained_variance_scorer = _SingleScorer(
    "explained_variance", lambda est, X: _reconstruction_scores(est, X)["explained_variance"])
#: Minus the mean fraction of active Jacobian entries with ``|J|`` > 0.01 (the paper's absolute τ).
neg_jacobian_sparsity_scorer = make_jacobian_sparsity_scorer(0.01)
#: Minus the mean L0 of the two SAEs.
neg_l0_scorer = _SingleScorer("neg_l0", lambda est, X: _reconstruction_scores(est, X)["neg_l0"])
#: Minus the fraction of latents of the two SAEs never active on X.
neg_dead_fraction_scorer = _SingleScorer(
    "neg_dead_fraction", lambda est, X: _reconstruction_scores(est, X)["neg_dead_fraction"])


def _score_columns(cv_results, names):
    """The ``mean_test_<name>`` columns of ``cv_results`` as float64 arrays, one score per candidate.

    Shared by the refit rule and :func:`~sklearn_jsae.plotting.plot_l1_pareto`: a missing, non-numeric
    or ragged column is refused here, naming it, rather than read as a shorter list of candidates.
    """
    if not isinstance(cv_results, Mapping):
        raise TypeError(
            f"cv_results must be a dict of columns, such as a fitted search's cv_results_, got "
            f"{type(cv_results).__name__}."
        )
    columns = []
    for name in names:
        key = f"mean_test_{name}"
        if key not in cv_results:
            available = sorted(k[len("mean_test_"):] for k in cv_results if k.startswith("mean_test_"))
            if available == ["score"] and np.isnan(np.asarray(cv_results["mean_test_score"], dtype=float)).all():
                # scikit-learn records a failed dict scorer as one NaN "score" per candidate
                raise ValueError(
                    "the scoring failed on every candidate (cv_results_['mean_test_score'] is all NaN, "
                    "and no named scores were recorded): scikit-learn's 'Scoring failed' warnings above "
                    "give the cause."
                )
            raise KeyError(
                f"cv_results_ has no {key!r}: the search's scoring must produce a score named "
                f"{name!r} (available: {available}). Use scoring=make_scoring() or pass "
                f"reconstruction=/sparsity= names that exist."
            )
        try:
            column = np.asarray(cv_results[key], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cv_results_[{key!r}] must hold one number per candidate, got "
                             f"{cv_results[key]!r:.100}.") from exc
        if column.ndim != 1:
            raise ValueError(f"cv_results_[{key!r}] must be 1-D (one score per candidate), got shape "
                             f"{column.shape}.")
        columns.append(column)
    lengths = {f"mean_test_{name}": column.size for name, column in zip(names, columns)}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"the score columns of cv_results_ differ in length ({lengths}); each must hold one score per "
            f"candidate. Pass the cv_results_ of one search, unedited."
        )
    return columns


class _SparsestWithinTolerance:
    def __init__(self, tolerance, reconstruction, sparsity, relative):
        self.tolerance = tolerance
        self.reconstruction = reconstruction
        self.sparsity = sparsity
        self.relative = relative

    def __call__(self, cv_results):
        recon, sparse = _score_columns(cv_results, (self.reconstruction, self.sparsity))
        if recon.size == 0:
            raise ValueError("cv_results_ holds no candidate (its score columns are empty): nothing to "
                             "choose from.")
        finite = np.isfinite(recon) & np.isfinite(sparse)
        if not finite.any():
            raise ValueError("every candidate has a NaN score; check the search's error_score and warnings.")
        best = recon[finite].max()
        margin = self.tolerance * abs(best) if self.relative else self.tolerance
        eligible = finite & (recon >= best - margin)
        candidates = np.flatnonzero(eligible)
        # sparsest first; among equally sparse candidates the better reconstruction wins
        order = np.lexsort((-recon[candidates], -sparse[candidates]))
        return int(candidates[order[0]])

    def __repr__(self):
        return (f"sparsest_within_tolerance(tolerance={self.tolerance!r}, reconstruction={self.reconstruction!r}, "
                f"sparsity={self.sparsity!r}, relative={self.relative!r})")


def sparsest_within_tolerance(tolerance=0.02, *, reconstruction="explained_variance",
                              sparsity="neg_jacobian_sparsity", relative=False):
    """A ``refit`` callable: the sparsest Jacobian among candidates that reconstruct well enough.

    Among the candidates whose mean test ``reconstruction`` score is at least
    ``best - tolerance`` (``best`` is the highest over all candidates), pick the one with the
    highest mean test ``sparsity`` score (scores are higher-is-better, so this is the sparsest
    Jacobian); ties go to the better reconstruction, then to the earlier candidate.  This is
    the choice a user makes from an l1 sweep: give up at most ``tolerance`` explained
    variance, and take the sparsest computation that remains.

    Parameters
    ----------
    tolerance : float, default=0.02
        Allowed drop of the reconstruction score below the best (0.02 = two points of
        explained variance).
    reconstruction : str, default="explained_variance"
        Scorer name whose ``mean_test_<name>`` measures reconstruction (higher is better).
    sparsity : str, default="neg_jacobian_sparsity"
        Scorer name whose ``mean_test_<name>`` measures sparsity (higher is sparser).
    relative : bool, default=False
        If True the allowed drop is ``tolerance · |best|``.

    Returns
    -------
    refit : callable
        ``refit(cv_results) -> int`` index of the chosen candidate, for
        ``GridSearchCV(refit=...)``.  It raises KeyError if a score column is missing, and
        ValueError if the columns differ in length, hold non-numbers, are empty or all NaN.

    Raises
    ------
    ValueError
        If ``tolerance`` is not a number >= 0.
    TypeError
        If ``reconstruction`` or ``sparsity`` is not a str, or ``relative`` is not a bool.

    Examples
    --------
    >>> from sklearn_jsae.model_selection import sparsest_within_tolerance
    >>> cv_results = {"mean_test_explained_variance": [0.90, 0.89, 0.85, 0.60],
    ...               "mean_test_neg_jacobian_sparsity": [-0.40, -0.10, -0.05, -0.01]}
    >>> sparsest_within_tolerance(0.02)(cv_results)   # 0.85 is more than 0.02 below 0.90
    1
    >>> sparsest_within_tolerance(0.1)(cv_results)
    2
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}.")
    for name, value in (("reconstruction", reconstruction), ("sparsity", sparsity)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a scorer name (str), got {type(value).__name__}.")
    relative = _check_bool(relative, "relative")
    return _SparsestWithinTolerance(float(tolerance), reconstruction, sparsity, relative)
