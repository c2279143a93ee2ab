"""The paper's linearity test of f_s: sweep one input latent, classify each output latent's curve."""

from __future__ import annotations

import re

import numpy as np

from .._topk import _inference_device, _validate_X
from ._validation import (
    _check_bool,
    _check_jsae,
    _check_positive_int,
    _check_positive_real,
    _check_random_state,
)


def _line_residuals(grid, curves, weights=None):
    """Max |residual| of the weighted least-squares line of each curve (P,)."""
    w = np.ones_like(curves) if weights is None else weights
    count = w.sum(axis=1)
    safe = np.maximum(count, 1)
    mx = (w * grid).sum(axis=1) / safe
    my = (w * curves).sum(axis=1) / safe
    dx = grid - mx[:, None]
    sxx = (w * dx * dx).sum(axis=1)
    sxy = (w * dx * (curves - my[:, None])).sum(axis=1)
    slope = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1), 0.0)
    residual = np.abs(curves - (my[:, None] + slope[:, None] * dx)) * w
    return residual.max(axis=1)


def classify_curves(grid, curves, tol=0.01):
    """Label each sweep ``"linear"``, ``"jumprelu"`` or ``"other"`` (the paper's rule).

    - ``"linear"``: every residual of the least-squares line through all points is < ``tol``;
    - ``"jumprelu"``: otherwise, if the points that are exactly 0 form one contiguous run
      containing the first or the last grid point and the least-squares line through the
      remaining points has every residual < ``tol`` (a single remaining point counts as
      linear: the authors' script calls that case "other", although it is a ReLU whose kink
      falls between the first two grid points);
    - ``"other"``: everything else.

    Parameters
    ----------
    grid : ndarray of shape (n_curves, n_points) or (n_points,)
        Swept input-latent values, increasing along each row (one row for all sweeps).
    curves : ndarray of shape (n_curves, n_points)
        Output-latent values at those points.
    tol : float, default=0.01

    Returns
    -------
    labels : ndarray of str, shape (n_curves,)

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_jsae.metrics import classify_curves
    >>> v = np.tile(np.linspace(0, 5, 100), (3, 1))
    >>> curves = np.stack([2 * v[0] + 1, np.maximum(v[1] - 2, 0), np.sin(v[2])])
    >>> classify_curves(v, curves).tolist()
    ['linear', 'jumprelu', 'other']
    """
    grid = np.asarray(grid, dtype=np.float64)
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim == 2 and grid.shape == curves.shape[1:]:  # one grid shared by every sweep
        grid = np.broadcast_to(grid, curves.shape)
    if curves.ndim != 2 or grid.shape != curves.shape:
        raise ValueError(f"curves must have shape (n_curves, n_points), one sweep per row, and grid the same "
                         f"shape or (n_points,); got grid {grid.shape} and curves {curves.shape}.")
    if curves.shape[1] < 2:
        raise ValueError(f"each sweep needs at least 2 points to fit a line; got {curves.shape[1]}.")
    for name, array in (("grid", grid), ("curves", curves)):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} holds NaN or inf (first at row {int(np.argwhere(~np.isfinite(array))[0, 0])}); "
                             f"every swept point must be finite to be classified.")
    tol = _check_positive_real(tol, "tol")
    n_curves, n_points = curves.shape
    labels = np.full(n_curves, "other", dtype=object)
    linear = _line_residuals(grid, curves) < tol
    zero = curves == 0
    n_zero = zero.sum(axis=1)
    position = np.arange(n_points)
    prefix = (zero | (position[None, :] >= n_zero[:, None])).all(axis=1)
    suffix = (zero | (position[None, :] < (n_points - n_zero)[:, None])).all(axis=1)
    candidate = (n_zero > 0) & (n_zero < n_points) & (prefix | suffix)
    rest_linear = _line_residuals(grid, curves, (~zero).astype(np.float64)) < tol
    labels[candidate & rest_linear] = "jumprelu"
    labels[linear] = "linear"
    return labels.astype(str)


def linearity(estimator, X, *, n_samples=256, n_pairs=None, n_points=100, sweep_min=5.0, sweep_pad=1.0,
              tol=0.01, random_state=None, return_curves=False):
    """How linear is the latent-to-latent function f_s?  The paper's sweep-and-classify test.

    For ``n_samples`` rows t drawn from X and, in each, ``n_pairs`` (output i, input j)
    pairs drawn uniformly with replacement from the active sets I_y(t) × I_x(t):

    1. ``s = s_x[j](x_t)`` is the current value of input latent j and ``d_j`` its (unit)
       decoder row; the grid is ``v = linspace(0, max(sweep_min, s + sweep_pad), n_points)``;
    2. the input moves along the decoder direction only:
       ``x(v) = x_t + (v - s) · d_j``, so ``x(s) = x_t`` and the input SAE's error term and
       every other latent stay at their values at x_t (this is ``d_x`` with s_x[j] set to v);
    3. the curve is ``s_y[i](v) = e_y(mlp(x(v)))[i]`` through the full output encoder (TopK,
       then ReLU: it is exactly 0 wherever i leaves the top k);
    4. each curve is labelled with :func:`classify_curves` (``tol`` on the residuals).

    Tolerances and ranges are in the latents' own units, as in the paper.

    Parameters
    ----------
    estimator : fitted JacobianSparseAutoencoder
    X : array-like of shape (n_rows, n_features_in_)
    n_samples : int, default=256
        Rows drawn (without replacement; all rows if X has fewer).
    n_pairs : int or None, default=None
        Pairs per row; None means the fitted k (the paper's choice).
    n_points : int, default=100
    sweep_min : float, default=5.0
    sweep_pad : float, default=1.0
        The sweep reaches ``max(sweep_min, s + sweep_pad)``.
    tol : float, default=0.01
    random_state : int, RandomState instance or None, default=None
    return_curves : bool, default=False
        Also return a dict with ``grid`` and ``curves`` (n_curves, n_points), ``labels``,
        ``rows``, ``output_latent``, ``input_latent`` and ``jacobian`` (the J entry of the pair).

    Returns
    -------
    fractions : dict
        ``{"linear": ..., "jumprelu": ..., "other": ...}``, summing to 1.
    details : dict
        Only if ``return_curves``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn_jsae import JacobianSparseAutoencoder
    >>> from sklearn_jsae.metrics import linearity
    >>> mlp = torch.nn.Linear(6, 6)            # an affine MLP: f_s is piecewise linear
    >>> X = np.random.default_rng(0).normal(size=(128, 6)).astype(np.float32)
    >>> jsae = JacobianSparseAutoencoder(mlp, n_components=16, k=3, max_iter=2, random_state=0).fit(X)
    >>> fractions = linearity(jsae, X, n_samples=20, random_state=0)
    >>> sorted(fractions), bool(np.isclose(sum(fractions.values()), 1.0))
    (['jumprelu', 'linear', 'other'], True)
    """
    import torch

    from .._backend.metrics import sweep_curves
    from .._backend.train import _Rows

    _check_jsae(estimator)
    # a memmap (a store larger than memory) is neither scanned nor converted whole: only the
    # sampled rows are read, and checked below
    X = _validate_X(estimator, X, reset=False, checked_in_batches=True)
    n_samples = _check_positive_int(n_samples, "n_samples")
    n_points = _check_positive_int(n_points, "n_points")
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2 to fit a line, got {n_points}.")
    # the fitted k: estimator.k is the constructor parameter, which set_params may have changed since
    n_pairs = estimator.input_sae_._encoding_k() if n_pairs is None else _check_positive_int(n_pairs, "n_pairs")
    sweep_min = _check_positive_real(sweep_min, "sweep_min")
    sweep_pad = _check_positive_real(sweep_pad, "sweep_pad", allow_zero=True)
    tol = _check_positive_real(tol, "tol")
    return_curves = _check_bool(return_curves, "return_curves")
    rng = _check_random_state(random_state)
    rows = _sample_rows(rng, X.shape[0], min(n_samples, X.shape[0]))
    # the sampled rows alone, read and checked (naming the row) as every pass over a store is
    sampled = _Rows(X, "cpu", torch.float32, resident=False)
    Xs = next(sampled.batches(len(rows), order=torch.from_numpy(rows), check_finite=True)).numpy()

    try:
        values_x, idx_x = estimator.input_sae_._codes(Xs, _inference_device(estimator))
        blocks = list(estimator._iter_blocks(Xs))
    except ValueError as exc:  # a non-finite code or MLP output, numbered among the sampled rows
        raise ValueError(re.sub(r"on row (\d+) of X", lambda m: f"on row {rows[int(m.group(1))]} of X",
                                str(exc), count=1)) from exc
    J = np.concatenate([b[0] for b in blocks])
    idx_y = np.concatenate([b[1] for b in blocks])
    idx_x_blocks = np.concatenate([b[2] for b in blocks])
    # _iter_blocks and _codes run the same encoder: align the input-latent order through the indices.
    k_y, k_x = idx_y.shape[1], idx_x.shape[1]
    a = rng.randint(k_y, size=(len(rows), n_pairs))
    b = rng.randint(k_x, size=(len(rows), n_pairs))
    sample = np.repeat(np.arange(len(rows)), n_pairs)
    out_latent = idx_y[sample, a.ravel()]
    in_latent = idx_x_blocks[sample, b.ravel()]
    current = _value_of(values_x, idx_x, sample, in_latent)
    jac = J[sample, a.ravel(), b.ravel()]
    upper = np.maximum(sweep_min, current + sweep_pad)
    grid = np.linspace(0.0, 1.0, n_points)[None, :] * upper[:, None]
    curves = sweep_curves(
        estimator._mlp_map, estimator.input_sae_._params(), estimator.output_sae_._params(),
        estimator.output_sae_._encoding_k(), Xs[sample], current, in_latent, out_latent, grid,
        device=_inference_device(estimator),
    )
    labels = classify_curves(grid, curves, tol)
    fractions = {name: float(np.mean(labels == name)) for name in ("linear", "jumprelu", "other")}
    if not return_curves:
        return fractions
    details = {"grid": grid, "curves": curves, "labels": labels, "rows": rows[sample], "output_latent": out_latent,
                   "input_latent": in_latent, "jacobian": jac}
    return fractions, details


def _value_of(values, indices, sample, latent):
    """values[sample, position of latent in indices[sample]] (0 if absent)."""
    match = indices[sample] == latent[:, None]
    return np.where(match.any(axis=1), (values[sample] * match).sum(axis=1), 0.0)


# Up to this many rows, the sample is RandomState.choice's (a permutation of every row index, 8 MB
# here), so the rows a seed picks are those of earlier versions; beyond it, a permutation of all
# rows costs 8 bytes a row (2.4 GB and minutes for 300M tokens, to pick 256 rows).
_PERMUTED_ROWS = 1 << 20


def _sample_rows(rng: np.random.RandomState, n: int, size: int) -> np.ndarray:
    """``size`` distinct row numbers of ``range(n)``, ascending, drawn with ``rng``: memory and time
    O(size), not O(n), beyond :data:`_PERMUTED_ROWS` rows."""
    if n <= _PERMUTED_ROWS or 2 * size > n:  # (most of the rows: the permutation is the draw's size anyway)
        return np.sort(rng.choice(n, size=size, replace=False))
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < size:  # size <= n_samples << n: a draw or two
        draw = rng.randint(0, n, size=2 * (size - len(chosen)), dtype=np.int64)
        chosen = np.concatenate([chosen, draw])
        _, first = np.unique(chosen, return_index=True)
        chosen = chosen[np.sort(first)]  # distinct, in the order drawn: the first ``size`` are a uniform sample
    return np.sort(chosen[:size])
