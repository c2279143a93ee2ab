"""The evaluation suite of Farnik et al. (2025) for fitted Jacobian sparse autoencoders.

Every function takes a fitted :class:`~sklearn_jsae.JacobianSparseAutoencoder` and the MLP
inputs ``X`` (numpy or memmap, one row per token), processes ``X`` in batches on the
estimator's ``device`` (CPU or CUDA) and returns plain Python / numpy / SciPy objects.
:func:`jacobian_sparsity` and :func:`global_jacobian_sparsity` also accept the 3-D
``scipy.sparse.coo_array`` returned by :meth:`JacobianSparseAutoencoder.jacobian` in place
of the estimator (with ``X=None``).

======================================  ============================================================
:func:`jacobian_sparsity`               per sample, fraction of the k_out·k_in active entries with
                                        ``|J| > τ``, averaged over samples (or the mean count)
:func:`global_jacobian_sparsity`        mean ``|J_ij|`` over the samples where output latent i is
                                        active; fraction of all n_out·n_in pairs above τ
:func:`jacobian_scale`                  ``c_x / c_y``: both sparsities take ``scale="normalized"``
                                        to put τ on ``(c_x / c_y) · J`` instead of the paper's J
:func:`fraction_variance_unexplained`   FVU of each SAE
:func:`reconstruction_metrics`          FVU, explained variance, L0 and dead fraction of each SAE
:func:`linearity`                       the paper's sweep-and-classify test of f_s
:func:`intervention_agreement`          does J predict the effect of removing one unit of a latent?
:func:`randomize_mlp`                   the randomised-model control
:func:`spliced_ce_score`                downstream CE-loss score of splicing each SAE into an LM
======================================  ============================================================

References
----------
L. Farnik, T. Lawson, C. Houghton, L. Aitchison. "Jacobian Sparse Autoencoders: Sparsify
Computations, Not Just Activations", ICML 2025, arXiv:2502.18147.
"""

from __future__ import annotations

import copy
import numbers

import numpy as np
import scipy.sparse as sp
from sklearn.utils import check_random_state

from ._sklearn_compat import check_is_fitted
from ._topk import _inference_device, _validate_X

__all__ = [
    "DEFAULT_THRESHOLDS",
    "fraction_variance_unexplained",
    "global_jacobian_sparsity",
    "intervention_agreement",
    "jacobian_scale",
    "jacobian_sparsity",
    "linearity",
    "randomize_mlp",
    "reconstruction_metrics",
    "spliced_ce_score",
]

#: The paper's thresholds τ for "``|J|`` > τ".
DEFAULT_THRESHOLDS = (0.005, 0.01, 0.015, 0.02)


# ------------------------------------------------------------------------------------- helpers


def _check_jsae(estimator, name="estimator"):
    from ._estimator import JacobianSparseAutoencoder

    if not isinstance(estimator, JacobianSparseAutoencoder):
        raise TypeError(
            f"{name} must be a fitted JacobianSparseAutoencoder, got {type(estimator).__name__}. "
            f"Fit one with JacobianSparseAutoencoder(mlp=...).fit(X) first."
        )
    check_is_fitted(estimator)


def _check_thresholds(thresholds, name="thresholds") -> tuple[float, ...]:
    """τ values as floats; ``name`` is the parameter named in the error."""
    if isinstance(thresholds, numbers.Real) and not isinstance(thresholds, bool):
        thresholds = (thresholds,)
    try:
        values = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {thresholds!r}.") from exc
    if not values or any(not np.isfinite(t) or t < 0 for t in values):
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers >= 0, got {thresholds!r}.")
    return values


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    return int(value)


def _check_positive_real(value, name, allow_zero=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")
    return float(value)


def _is_jacobian_array(obj) -> bool:
    return sp.issparse(obj) and getattr(obj, "ndim", 2) == 3


def _entry_batches(source, X):
    """Batches of active Jacobian entries, from a fitted estimator + X (its active blocks) or
    from a 3-D COO Jacobian (its stored entries).

    Yields ``(sample (m,), out (m,), in (m,), |value| (m,), block_size (B,), active (out_sample, out_latent))``
    with sample ids local to the batch (0..B-1): ``block_size[b]`` is the number of active
    entries of sample b and ``active`` lists its active output latents once each.
    """
    if _is_jacobian_array(source):
        if X is not None:
            raise ValueError("X must be None when a Jacobian array is passed instead of an estimator.")
        J = source.tocoo() if source.format != "coo" else source
        t, i, j = (np.asarray(c, dtype=np.int64) for c in J.coords)
        n, n_out = J.shape[0], J.shape[1]
        pairs = np.unique(t * n_out + i)
        values = np.abs(np.asarray(J.data, dtype=np.float64))
        yield t, i, j, values, np.bincount(t, minlength=n), (pairs // n_out, pairs % n_out)
        return
    _check_jsae(source)
    if X is None:
        raise ValueError("X is required with a fitted estimator: pass the MLP inputs to evaluate on.")
    X = _validate_X(source, X, reset=False)
    for J, idx_y, idx_x in source._iter_blocks(X):
        B, k_out, k_in = J.shape
        t = np.repeat(np.arange(B), k_out * k_in)
        i = np.repeat(idx_y, k_in, axis=1).ravel()
        j = np.tile(idx_x, (1, k_out)).ravel()
        active = (np.repeat(np.arange(B), k_out), idx_y.ravel())
        yield t, i, j, np.abs(J.astype(np.float64)).ravel(), np.full(B, k_out * k_in), active


def _jacobian_shape(source):
    if _is_jacobian_array(source):
        return source.shape[1], source.shape[2]
    return source.output_sae_.components_.shape[0], source.input_sae_.components_.shape[0]


# ----------------------------------------------------------------------------- Jacobian sparsity

_SCALES = ("absolute", "normalized")


def _check_scale(scale, name="scale"):
    """``"absolute"``, ``"normalized"`` or a positive float (the factor J is multiplied by)."""
    if isinstance(scale, str) and scale in _SCALES:
        return scale
    if (isinstance(scale, numbers.Real) and not isinstance(scale, bool) and np.isfinite(scale)
            and scale > 0):
        return float(scale)
    raise ValueError(
        f"{name} must be 'absolute' (the paper's τ on J = ∂s_y/∂s_x), 'normalized' (τ on "
        f"(c_x / c_y)·J, from the fitted estimator's scales) or a finite number > 0 (the factor J is "
        f"multiplied by), got {scale!r}."
    )


def _resolve_scale(source, scale, name="scale") -> float:
    """The factor for ``source`` (an estimator or a Jacobian array) under a checked ``scale``."""
    if scale == "absolute":
        return 1.0
    if scale == "normalized":
        if _is_jacobian_array(source):
            raise ValueError(
                f"{name}='normalized' needs the fitted estimator's data scales c_x and c_y, which a "
                f"Jacobian array does not carry: pass the estimator and X instead of the array, or the "
                f"factor as a number, {name}=jacobian_scale(estimator)."
            )
        return jacobian_scale(source)
    return scale


def jacobian_scale(estimator):
    """The factor ``c_x / c_y`` that turns a fitted model's Jacobian into the normalised one.

    A JSAE trains on ``x / c_x`` and ``y / c_y`` (``c_x``, ``c_y``: the root-mean-square of
    the centred training inputs and MLP outputs, ``input_sae_.scale_`` and
    ``output_sae_.scale_``), but its latents, and so ``J = ∂s_y/∂s_x``, are in raw activation
    units.  The Jacobian between the latents of the normalised data is ``(c_x / c_y) · J``: the
    quantity the penalty acts on, and what ``scale="normalized"`` of
    :func:`jacobian_sparsity` and :func:`global_jacobian_sparsity` thresholds.  A typical entry
    of J is of order ``c_y / c_x``, which differs between layers and models (0.84 and 3.0 on
    two MiniLM layers, 20.4 on a SmolLM2 layer), so a fixed τ on J means something different
    on each; τ on the normalised Jacobian does not depend on the activation scales.

    Parameters
    ----------
    estimator : fitted JacobianSparseAutoencoder

    Returns
    -------
    factor : float
        ``estimator.input_sae_.scale_ / estimator.output_sae_.scale_``.

    Raises
    ------
    ValueError
        If an SAE has no scale (``scale_`` None: imported from SAELens or sparsify with
        :mod:`sklearn_jsae.interop` and not trained since).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn_jsae import JacobianSparseAutoencoder
    >>> from sklearn_jsae.metrics import jacobian_scale, jacobian_sparsity
    >>> torch.manual_seed(0) and None
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 6))
    >>> X = np.random.default_rng(0).normal(size=(128, 6)).astype(np.float32)
    >>> jsae = JacobianSparseAutoencoder(mlp, n_components=16, k=3, max_iter=2, random_state=0).fit(X)
    >>> a = jacobian_scale(jsae)
    >>> a == jsae.input_sae_.scale_ / jsae.output_sae_.scale_
    True
    >>> normalized = jacobian_sparsity(jsae, X, [0.01, 0.1], scale="normalized")
    >>> normalized == jacobian_sparsity(jsae.jacobian(X), thresholds=[0.01, 0.1], scale=a)
    True
    """
    _check_jsae(estimator)
    c_x, c_y = estimator.input_sae_.scale_, estimator.output_sae_.scale_
    if c_x is None or c_y is None or not c_x > 0 or not c_y > 0:
        raise ValueError(
            f"the estimator's data scales are unknown or not positive (input_sae_.scale_={c_x!r}, "
            f"output_sae_.scale_={c_y!r}; an SAE imported with sklearn_jsae.interop has none until it "
            f"is trained), so the normalised Jacobian is undefined: pass scale='absolute' or the factor "
            f"as a number."
        )
    return float(c_x) / float(c_y)


def _sparsity_pass(source, X, thresholds, factors, *, per_sample=True, global_matrix=False, normalize=True):
    """One pass over the active Jacobian entries of ``source``, for several factors at once.

    Returns ``(per_sample, G)``: ``per_sample[f]`` is ``{τ: mean over samples of the fraction
    (or count) of entries with factors[f]·|J| > τ}`` (None unless ``per_sample``) and ``G`` the
    unscaled (n_out, n_in) CSR mean of |J| over the samples where each output latent is active
    (None unless ``global_matrix``).
    """
    above = np.zeros((len(factors), len(thresholds)))
    n_samples = 0
    if global_matrix:
        n_out, n_in = _jacobian_shape(source)
        total = sp.csr_array((n_out, n_in), dtype=np.float64)
        active_count = np.zeros(n_out, dtype=np.int64)
        pending, pending_size = [], 0
    for t, i, j, values, sizes, (_, active_out) in _entry_batches(source, X):
        B = sizes.shape[0]
        n_samples += B
        if per_sample:
            for f, factor in enumerate(factors):
                scaled = values if factor == 1.0 else values * factor
                counts = np.stack([np.bincount(t, weights=(scaled > tau), minlength=B) for tau in thresholds])
                if normalize:
                    counts = np.where(sizes > 0, counts / np.maximum(sizes, 1), 0.0)
                above[f] += counts.sum(axis=1)
        if global_matrix:
            active_count += np.bincount(active_out, minlength=n_out)
            pending.append((values, i, j))
            pending_size += values.size
            if pending_size >= 1 << 22:
                total = total + _coo_sum(pending, (n_out, n_in))
                pending, pending_size = [], 0
    fractions = G = None
    if per_sample:
        if n_samples == 0:
            raise ValueError("the Jacobian has no samples; pass at least one row of X.")
        fractions = [{tau: float(v / n_samples) for tau, v in zip(thresholds, row)} for row in above]
    if global_matrix:
        if pending:
            total = total + _coo_sum(pending, (n_out, n_in))
        inverse = np.where(active_count > 0, 1.0 / np.maximum(active_count, 1), 0.0)
        G = sp.csr_array(sp.diags_array(inverse) @ total)
        G.eliminate_zeros()
        G.sort_indices()
    return fractions, G


def _global_fractions(G, thresholds, factor=1.0):
    """``{τ: fraction of all pairs with factor · G > τ}``."""
    scaled = G.data if factor == 1.0 else G.data * factor
    n_pairs = G.shape[0] * G.shape[1]
    return {tau: float(np.count_nonzero(scaled > tau) / n_pairs) for tau in thresholds}


def _jacobian_sparsity_views(estimator, X, thresholds, scales, *, global_sparsity=False):
    """:func:`jacobian_sparsity` (and :func:`global_jacobian_sparsity` if ``global_sparsity``)
    under each of ``scales``, from a single pass over the Jacobian.

    Returns a list with one ``(per_sample dict, global dict or None)`` per scale.
    """
    thresholds = _check_thresholds(thresholds)
    factors = [_resolve_scale(estimator, _check_scale(scale)) for scale in scales]
    per_sample, G = _sparsity_pass(estimator, X, thresholds, factors, global_matrix=global_sparsity)
    return [(fractions, _global_fractions(G, thresholds, factor) if global_sparsity else None)
            for fractions, factor in zip(per_sample, factors)]


def jacobian_sparsity(estimator, X=None, thresholds=DEFAULT_THRESHOLDS, *, normalize=True, scale="absolute"):
    """Per-sample Jacobian density: the fraction of active entries with ``|J| > τ``.

    For each sample t the Jacobian ``J_t = ∂s_y/∂s_x`` is a k_out × k_in block (the active
    output latents by the active input latents, evaluated at the true input).  This returns,
    for each τ, the mean over samples of ``#{(a, b): |J_t[a, b]| > τ} / (k_out · k_in)``:
    the paper's "Jacobian sparsity" (lower is sparser).  With ``scale``, τ applies to
    ``(c_x / c_y) · |J|`` (the normalised Jacobian) or ``a · |J|`` instead.

    Parameters
    ----------
    estimator : fitted JacobianSparseAutoencoder or scipy.sparse.coo_array
        The model, or a 3-D Jacobian ``(n_samples, n_out, n_in)`` from
        :meth:`~sklearn_jsae.JacobianSparseAutoencoder.jacobian`; for an array the entries
        stored for a sample are taken to be its active block.
    X : array-like of shape (n_samples, n_features_in_), default=None
        MLP inputs; required with an estimator, None with an array.
    thresholds : float or sequence of float, default=DEFAULT_THRESHOLDS
        ``(0.005, 0.01, 0.015, 0.02)``, the paper's values.  The comparison is strict.
    normalize : bool, default=True
        If False, return the mean *count* of entries above τ per sample instead of the
        fraction (this is about fraction versus count; ``scale`` is about the units of J).
    scale : {"absolute", "normalized"} or float, default="absolute"
        What τ is compared with.  ``"absolute"``: ``|J|`` itself, ``J = ∂s_y/∂s_x`` in raw
        activation units, as in the paper (so the numbers compare with its table).
        ``"normalized"``: ``(c_x / c_y) · |J|``, the Jacobian between the latents of the
        normalised data the model trained on (the one the penalty acts on; ``c_x / c_y`` is
        :func:`jacobian_scale` of the estimator).  A number ``a > 0``: ``a · |J|``; with a
        Jacobian array, ``scale=jacobian_scale(estimator)`` gives the normalised view.  A
        typical ``|J|`` is of order ``c_y / c_x`` (0.84 and 3.0 on two MiniLM layers, 20.4 on
        a SmolLM2 layer), so the absolute τ = 0.01 is strict on some layers and says nothing
        on others; the normalised view compares layers and models.

    Returns
    -------
    sparsity : dict
        ``{τ: value}`` for each threshold, in the order given; fractions lie in [0, 1] and
        do not increase with τ.

    Raises
    ------
    ValueError
        If ``scale="normalized"`` is given with a Jacobian array (it has no scales: pass the
        estimator, or ``scale=jacobian_scale(estimator)``), or ``scale`` is none of the above.

    See Also
    --------
    global_jacobian_sparsity : the same question for the mean ``|J|`` over samples.
    jacobian_scale : the factor ``c_x / c_y`` of ``scale="normalized"``.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> from sklearn_jsae.metrics import jacobian_sparsity
    >>> # two samples, 2 x 2 active blocks, written as a 3-D COO Jacobian
    >>> t = np.array([0, 0, 0, 0, 1, 1, 1, 1]); i = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    >>> j = np.array([0, 1, 0, 1, 0, 1, 0, 1]); v = np.array([.5, 0, 0, 0, .5, .5, .02, 0])
    >>> J = sp.coo_array((v, (t, i, j)), shape=(2, 4, 2))
    >>> jacobian_sparsity(J, thresholds=[0.01, 0.1])
    {0.01: 0.5, 0.1: 0.375}
    >>> jacobian_sparsity(J, thresholds=0.1, normalize=False)
    {0.1: 1.5}

    τ on ``10 · |J|``: the entry 0.02 becomes 0.2 and passes τ = 0.1; the same as thresholding
    the array ``10 · J``:

    >>> jacobian_sparsity(J, thresholds=0.1, scale=10)
    {0.1: 0.5}
    >>> jacobian_sparsity(J, thresholds=0.1, scale=10) == jacobian_sparsity(10 * J, thresholds=0.1)
    True
    """
    thresholds = _check_thresholds(thresholds)
    factor = _resolve_scale(estimator, _check_scale(scale))
    (fractions,), _ = _sparsity_pass(estimator, X, thresholds, [factor], normalize=normalize)
    return fractions


def global_jacobian_sparsity(estimator, X=None, thresholds=DEFAULT_THRESHOLDS, *, return_matrix=False,
                             scale="absolute"):
    """Global Jacobian density: how many latent pairs are ever connected.

    For every (output i, input j) pair, ``G[i, j]`` is the mean of ``|J_t[i, j]|`` over the
    samples t where output latent i is active (a sample where i is active but j is not
    contributes 0).  Returns, for each τ, the fraction of *all* ``n_out · n_in`` pairs with
    ``G[i, j] > τ``.  The sums are accumulated sparsely batch by batch: no dense
    ``n_out × n_in`` array is ever formed (only the final sparse ``G``).  With ``scale``,
    ``G`` is that of ``(c_x / c_y) · |J|`` (the normalised Jacobian) or ``a · |J|``.

    Parameters
    ----------
    estimator : fitted JacobianSparseAutoencoder or scipy.sparse.coo_array
        As in :func:`jacobian_sparsity`.
    X : array-like of shape (n_samples, n_features_in_), default=None
    thresholds : float or sequence of float, default=DEFAULT_THRESHOLDS
    return_matrix : bool, default=False
        Also return ``G`` (in the units ``scale`` chooses) as a CSR array of shape (n_out, n_in).
    scale : {"absolute", "normalized"} or float, default="absolute"
        As in :func:`jacobian_sparsity`: ``G`` is the mean of ``|J|``, of
        ``(c_x / c_y) · |J|`` or of ``a · |J|``.

    Returns
    -------
    sparsity : dict
        ``{τ: fraction of the n_out·n_in pairs with G > τ}``.
    G : scipy.sparse.csr_array of shape (n_out, n_in)
        Only if ``return_matrix``.

    Raises
    ------
    ValueError
        As :func:`jacobian_sparsity` for ``scale``.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> from sklearn_jsae.metrics import global_jacobian_sparsity
    >>> t = np.array([0, 0, 1, 1]); i = np.array([0, 0, 0, 0]); j = np.array([0, 1, 0, 2])
    >>> J = sp.coo_array((np.array([0.4, 0.1, 0.2, -0.3]), (t, i, j)), shape=(2, 2, 3))
    >>> fractions, G = global_jacobian_sparsity(J, thresholds=[0.1], return_matrix=True)
    >>> G.toarray().round(3).tolist()   # output 0 is active in both samples
    [[0.3, 0.05, 0.15], [0.0, 0.0, 0.0]]
    >>> fractions
    {0.1: 0.3333333333333333}
    >>> global_jacobian_sparsity(J, thresholds=[0.1], scale=0.5)   # 0.5 · G = [[.15, .025, .075], ...]
    {0.1: 0.16666666666666666}
    """
    thresholds = _check_thresholds(thresholds)
    factor = _resolve_scale(estimator, _check_scale(scale))
    _, G = _sparsity_pass(estimator, X, thresholds, [factor], per_sample=False, global_matrix=True)
    fractions = _global_fractions(G, thresholds, factor)
    if not return_matrix:
        return fractions
    return fractions, (G if factor == 1.0 else sp.csr_array(G * factor))


def _coo_sum(chunks, shape):
    values = np.concatenate([c[0] for c in chunks])
    rows = np.concatenate([c[1] for c in chunks])
    cols = np.concatenate([c[2] for c in chunks])
    out = sp.coo_array((values, (rows, cols)), shape=shape).tocsr()
    out.sum_duplicates()
    return out


# -------------------------------------------------------------------------------- reconstruction


def reconstruction_metrics(estimator, X, *, batch_size=4096):
    """Reconstruction quality of both SAEs of a fitted JSAE, in one pass over X.

    For each side (``"input"``: Z = X, ``"output"``: Z = mlp(X), the true outputs)::

        fvu                 = Σ ||z - ẑ||² / Σ ||z - mean(z)||²        (0 is perfect)
        explained_variance  = 1 - fvu
        l0                  = mean number of latents with a value > 0 per row (<= k)
        dead_fraction       = fraction of latents with a value > 0 on no row of X

    Parameters
    ----------
    estimator : fitted JacobianSparseAutoencoder or TopKSparseAutoencoder
        A single SAE gives only the ``"input"`` entry.
    X : array-like of shape (n_samples, n_features_in_)
    batch_size : int, default=4096

    Returns
    -------
    metrics : dict
        ``{"input": {"fvu", "explained_variance", "l0", "dead_fraction"}, "output": {...}}``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_jsae import TopKSparseAutoencoder
    >>> from sklearn_jsae.metrics import reconstruction_metrics
    >>> X = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    >>> sae = TopKSparseAutoencoder(n_components=16, k=4, max_iter=2, random_state=0).fit(X)
    >>> m = reconstruction_metrics(sae, X)["input"]
    >>> 0 <= m["fvu"] <= 1.5 and m["l0"] <= 4 and 0 <= m["dead_fraction"] <= 1
    True
    >>> bool(np.isclose(m["explained_variance"], sae.score(X), atol=1e-5))
    True
    """
    from ._backend.metrics import reconstruction_statistics
    from ._estimator import JacobianSparseAutoencoder
    from ._topk import TopKSparseAutoencoder

    if isinstance(estimator, JacobianSparseAutoencoder):
        check_is_fitted(estimator)
        sides = (estimator.input_sae_, estimator.output_sae_)
        mlp_map = estimator._mlp_map
    elif isinstance(estimator, TopKSparseAutoencoder):
        check_is_fitted(estimator)
        sides, mlp_map = (estimator, None), None
    else:
        raise TypeError(
            f"estimator must be a fitted JacobianSparseAutoencoder or TopKSparseAutoencoder, got "
            f"{type(estimator).__name__}."
        )
    batch_size = _check_positive_int(batch_size, "batch_size")
    X = _validate_X(estimator, X, reset=False)
    stats = reconstruction_statistics(
        sides[0]._params(), None if sides[1] is None else sides[1]._params(), mlp_map, X,
        sides[0].k, None if sides[1] is None else sides[1].k,
        _inference_device(estimator), batch_size,
    )
    out = {}
    for name, s in stats.items():
        if s["total"] > 0:
            fvu = s["residual"] / s["total"]
        else:
            fvu = 0.0 if s["residual"] == 0 else float("inf")
        out[name] = {
            "fvu": float(fvu),
            "explained_variance": float(1.0 - fvu),
            "l0": float(s["l0"] / s["n"]),
            "dead_fraction": float(1.0 - s["fired"].mean()),
        }
    return out


def fraction_variance_unexplained(estimator, X, *, batch_size=4096):
    """Fraction of variance unexplained of each SAE: ``{"input": FVU_x, "output": FVU_y}``.

    ``FVU = Σ ||z - ẑ||² / Σ ||z - mean(z)||²`` over all rows and features of X (input SAE)
    and of the true outputs mlp(X) (output SAE); ``1 - FVU`` is the explained variance that
    :meth:`~sklearn_jsae.JacobianSparseAutoencoder.score` averages.  See
    :func:`reconstruction_metrics` for L0 and dead latents from the same pass.

    Parameters
    ----------
    estimator : fitted JacobianSparseAutoencoder (or TopKSparseAutoencoder: "input" only)
    X : array-like of shape (n_samples, n_features_in_)
    batch_size : int, default=4096

    Returns
    -------
    fvu : dict
        ``{"input": float, "output": float}``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn_jsae import JacobianSparseAutoencoder
    >>> from sklearn_jsae.metrics import fraction_variance_unexplained
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6))
    >>> X = np.random.default_rng(0).normal(size=(128, 6)).astype(np.float32)
    >>> jsae = JacobianSparseAutoencoder(mlp, n_components=16, k=3, max_iter=2, random_state=0).fit(X)
    >>> fvu = fraction_variance_unexplained(jsae, X)
    >>> sorted(fvu), bool(np.isclose(1 - (fvu["input"] + fvu["output"]) / 2, jsae.score(X), atol=1e-5))
    (['input', 'output'], True)
    """
    metrics = reconstruction_metrics(estimator, X, batch_size=batch_size)
    return {name: side["fvu"] for name, side in metrics.items()}


# ------------------------------------------------------------------------------------- linearity


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
    grid : ndarray of shape (n_curves, n_points)
        Swept input-latent values, increasing along each row.
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
        Pairs per row; None means k (the paper's choice).
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
    from ._backend.metrics import sweep_curves

    _check_jsae(estimator)
    X = _validate_X(estimator, X, reset=False)
    n_samples = _check_positive_int(n_samples, "n_samples")
    n_points = _check_positive_int(n_points, "n_points")
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2 to fit a line, got {n_points}.")
    n_pairs = estimator.k if n_pairs is None else _check_positive_int(n_pairs, "n_pairs")
    sweep_min = _check_positive_real(sweep_min, "sweep_min")
    sweep_pad = _check_positive_real(sweep_pad, "sweep_pad", allow_zero=True)
    tol = _check_positive_real(tol, "tol")
    rng = check_random_state(random_state)
    rows = np.sort(rng.choice(X.shape[0], size=min(n_samples, X.shape[0]), replace=False))
    Xs = np.ascontiguousarray(X[rows], dtype=np.float32)

    values_x, idx_x = estimator.input_sae_._codes(Xs, _inference_device(estimator))
    blocks = list(estimator._iter_blocks(Xs))
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
        estimator.output_sae_.k, Xs[sample], current, in_latent, out_latent, grid,
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


# ------------------------------------------------------------------------------ interventions


def intervention_agreement(estimator, X, *, delta=1.0, tol=0.1, return_details=False, batch_size=None):
    """Does the Jacobian predict what removing a unit of an input latent does?

    For every row t, every active input latent j ∈ I_x(t) and every active output latent
    i ∈ I_y(t) (all k_out · k_in pairs, not only matched positions), the input moves by
    ``-delta`` along j's decoder row, ``x' = x_t - delta · d_j``, and the observed change is
    ``Δ = e_y(mlp(x_t))[i] - e_y(mlp(x'))[i]`` through the full output encoder (TopK and
    ReLU).  The Jacobian predicts ``Δ ≈ delta · J_t[i, j]``; a triple agrees when
    ``|Δ - delta · J_t[i, j]| <= tol``.

    Parameters
    ----------
    estimator : fitted JacobianSparseAutoencoder
    X : array-like of shape (n_samples, n_features_in_)
        Every row is used; pass a subsample to bound the cost (k_in MLP evaluations per row).
    delta : float, default=1.0
        Units removed (the paper removes one).
    tol : float, default=0.1
        The paper's tolerance, in output-latent units.
    return_details : bool, default=False
        Also return ``{"jacobian", "observed"}`` arrays of shape (n_samples, k_out, k_in)
        and the matching ``output_latent`` (n_samples, k_out) / ``input_latent`` (n_samples, k_in).
    batch_size : int or None, default=None
        Rows per batch; None picks one that bounds memory.

    Returns
    -------
    agreement : float
        Fraction of (sample, output, input) triples that agree, in [0, 1].
    details : dict
        Only if ``return_details``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn_jsae import JacobianSparseAutoencoder
    >>> from sklearn_jsae.metrics import intervention_agreement
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 6))
    >>> X = np.random.default_rng(0).normal(size=(128, 6)).astype(np.float32)
    >>> jsae = JacobianSparseAutoencoder(mlp, n_components=16, k=3, max_iter=2, random_state=0).fit(X)
    >>> 0.0 <= intervention_agreement(jsae, X[:32]) <= 1.0
    True
    """
    from ._backend.metrics import unit_interventions

    _check_jsae(estimator)
    X = _validate_X(estimator, X, reset=False)
    delta = _check_positive_real(delta, "delta")
    tol = _check_positive_real(tol, "tol", allow_zero=True)
    if batch_size is not None:
        batch_size = _check_positive_int(batch_size, "batch_size")
    agree, total = 0, 0
    keep = {"jacobian": [], "observed": [], "output_latent": [], "input_latent": []}
    for J, observed, idx_y, idx_x in unit_interventions(
        estimator._mlp_map, estimator.input_sae_._params(), estimator.output_sae_._params(),
        estimator.input_sae_.k, estimator.output_sae_.k, X, delta, _inference_device(estimator), batch_size,
    ):
        agree += int(np.count_nonzero(np.abs(observed - delta * J) <= tol))
        total += J.size
        if return_details:
            for name, value in zip(keep, (J, observed, idx_y, idx_x)):
                keep[name].append(value)
    fraction = agree / total if total else float("nan")
    if not return_details:
        return float(fraction)
    return float(fraction), {name: np.concatenate(parts) for name, parts in keep.items()}


# --------------------------------------------------------------------------- randomised control


def randomize_mlp(mlp, random_state=None):
    """A copy of ``mlp`` with its weight matrices re-drawn at the same scale: the paper's control.

    Exactly what happens: ``mlp`` is deep-copied; in the copy every floating-point parameter
    or buffer with two or more dimensions (the weight matrices: ``nn.Linear.weight``,
    ``W_in``/``W_out`` of :class:`~sklearn_jsae.mlp.ElementwiseMLP`, ``W_gate``/``W_up``/
    ``W_down`` of :class:`~sklearn_jsae.mlp.GatedMLP`, ...) is replaced by a matrix of i.i.d.
    standard normal draws rescaled so that its Frobenius norm equals the original's (same
    shape, dtype, device and root-mean-square entry).  Everything with fewer than two
    dimensions (biases, normalisation gains) and every non-tensor attribute (activation,
    shapes) is kept.  ``mlp`` itself is never modified.  Training the same JSAE on ``mlp`` and
    on ``randomize_mlp(mlp)`` shows how much of the Jacobian sparsity comes from the trained
    weights rather than from the method.

    Parameters
    ----------
    mlp : torch.nn.Module
        ``nn.Sequential(nn.Linear, activation, nn.Linear)``, ``nn.Linear``, an
        :class:`~sklearn_jsae.mlp.ElementwiseMLP` / :class:`~sklearn_jsae.mlp.GatedMLP`
        (e.g. from :func:`sklearn_jsae.hf.mlp_of`), or any ``nn.Module`` holding weight matrices.
    random_state : int, RandomState instance or None, default=None
        Seeds a private ``torch.Generator`` (the global torch RNG is untouched).

    Returns
    -------
    randomized : torch.nn.Module
        Same class as ``mlp``.

    Raises
    ------
    TypeError
        If ``mlp`` is not a torch ``nn.Module`` (a plain function has no weights to re-draw).
    ValueError
        If ``mlp`` holds no floating-point tensor with two or more dimensions.

    Examples
    --------
    >>> import torch
    >>> from sklearn_jsae.metrics import randomize_mlp
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    >>> rand = randomize_mlp(mlp, random_state=0)
    >>> bool(torch.equal(rand[0].bias, mlp[0].bias)), bool(torch.equal(rand[0].weight, mlp[0].weight))
    (True, False)
    >>> bool(torch.isclose(rand[2].weight.norm(), mlp[2].weight.norm()))
    True
    """
    import torch

    from ._backend.metrics import redraw_matrices_

    if not isinstance(mlp, torch.nn.Module):
        raise TypeError(
            f"randomize_mlp needs a torch.nn.Module whose weight matrices it can re-draw, got "
            f"{type(mlp).__name__}. Supported: nn.Sequential(nn.Linear, activation, nn.Linear), "
            f"nn.Linear, sklearn_jsae.mlp.ElementwiseMLP / GatedMLP (e.g. from sklearn_jsae.hf.mlp_of), "
            f"or any nn.Module with weight-matrix parameters; a plain function has no weights."
        )
    seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    randomized = copy.deepcopy(mlp)
    redrawn = redraw_matrices_(randomized, torch.Generator().manual_seed(seed))
    if not redrawn:
        raise ValueError(
            f"mlp ({type(mlp).__name__}) has no floating-point parameter or buffer with 2 or more "
            f"dimensions, so there is no weight matrix to re-draw (the identity map, for instance). "
            f"Pass the MLP module itself, e.g. nn.Sequential(nn.Linear, nn.GELU(), nn.Linear)."
        )
    return randomized


# ------------------------------------------------------------------------------ downstream cost


def _hook_modules(model, layer, module):
    if module is not None:
        if isinstance(module, (tuple, list)) and len(module) == 2:
            return module[0], module[1]
        return module, module
    try:
        from .hf import mlp_hook_points
    except ImportError:  # pragma: no cover - sklearn_jsae.hf is part of the package
        mlp_hook_points = None
    if mlp_hook_points is not None:
        return mlp_hook_points(model, layer)
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "layers", "h"):
        blocks = model
        for name in path.split("."):
            blocks = getattr(blocks, name, None)
        if blocks is not None and hasattr(blocks[layer], "mlp"):
            return blocks[layer].mlp, blocks[layer].mlp
    raise ValueError(f"cannot find the MLP of layer {layer} in {type(model).__name__}; pass module=...")


def spliced_ce_score(model, layer, estimator, input_ids, *, attention_mask=None, module=None, batch_size=8):
    """Downstream cost of each SAE: splice its reconstruction into a causal LM.

    Five passes of ``model`` over ``input_ids`` give the mean next-token cross-entropy

    - ``ce_clean``: unchanged;
    - ``ce_zero_input``: the MLP *input* of block ``layer`` replaced by zeros (the MLP then
      computes f(0), which is not 0 when the MLP has biases);
    - ``ce_zero_output`` (also ``ce_zero``): the MLP *output* of block ``layer`` replaced by
      zeros;
    - ``ce_input``: the MLP *input* replaced by the input SAE's reconstruction x̂ (the MLP
      then computes f(x̂));
    - ``ce_output``: the MLP *output* replaced by the output SAE's reconstruction ŷ of the
      true output (the input untouched);

    and the CE-loss score of each SAE against the zero ablation of the same place, as in
    Farnik et al. (2025)::

        score_input  = (ce_zero_input  - ce_input)  / (ce_zero_input  - ce_clean)
        score_output = (ce_zero_output - ce_output) / (ce_zero_output - ce_clean)

    (1: no loss from splicing; 0: as bad as zeroing that activation).

    Parameters
    ----------
    model : transformers causal LM (``...ForCausalLM``)
        In eval mode during the call (its training flag is restored), never modified.
    layer : int
        0-based block index of the MLP the estimator was trained on.
    estimator : fitted JacobianSparseAutoencoder
        Trained on that MLP's inputs (after the block's normalisation).
    input_ids : array-like of int, shape (n_seq, seq_len)
    attention_mask : array-like of {0, 1}, shape (n_seq, seq_len), default=None
        Targets whose position or predecessor is masked are ignored.
    module : torch.nn.Module or (input_module, output_module), default=None
        Where to hook; None uses :func:`sklearn_jsae.hf.mlp_hook_points`.
    batch_size : int, default=8
        Sequences per forward pass.

    Returns
    -------
    scores : dict
        ``ce_clean``, ``ce_zero_input``, ``ce_zero_output``, ``ce_zero`` (the same value as
        ``ce_zero_output``, the name of earlier versions), ``ce_input``, ``ce_output``,
        ``score_input``, ``score_output`` (NaN where the zero ablation costs nothing),
        ``score_mean`` (their average, the paper's λ-sweep number) and ``n_tokens``
        (targets scored).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from sklearn_jsae import JacobianSparseAutoencoder
    >>> from sklearn_jsae.hf import harvest, mlp_of
    >>> from sklearn_jsae.metrics import spliced_ce_score
    >>> torch.manual_seed(0) and None
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=2, initializer_range=0.3)
    >>> model = LlamaForCausalLM(config)
    >>> ids = np.random.default_rng(0).integers(0, 64, size=(8, 24))
    >>> X, _ = harvest(model, 0, input_ids=ids, progress=False)
    >>> jsae = JacobianSparseAutoencoder(mlp_of(model, 0), n_components=32, k=4, max_iter=3,
    ...                                  random_state=0).fit(X)
    >>> scores = spliced_ce_score(model, 0, jsae, ids)
    >>> scores["ce_zero_input"] != scores["ce_clean"], scores["score_input"] <= 1.01
    (True, True)

    LLaMA's MLP has no biases, so f(0) = 0 and both zero ablations cost the same here:

    >>> scores["ce_zero_input"] == scores["ce_zero_output"] == scores["ce_zero"]
    True
    """
    import torch

    from ._backend.metrics import spliced_cross_entropies

    _check_jsae(estimator)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a transformers causal LM (a torch.nn.Module), got {type(model).__name__}.")
    batch_size = _check_positive_int(batch_size, "batch_size")
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(
            f"input_ids must be a 2-D array (n_seq, seq_len) with seq_len >= 2, got shape {tuple(ids.shape)}."
        )
    mask = None
    if attention_mask is not None:
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}.")
    input_module, output_module = _hook_modules(model, layer, module)
    d_model = _hidden_size(model)
    if d_model is not None and estimator.n_features_in_ != d_model:
        raise ValueError(
            f"estimator was fitted on {estimator.n_features_in_} features but the model's hidden size "
            f"is {d_model}; pass the JSAE trained on this model's layer-{layer} MLP inputs."
        )
    ce = spliced_cross_entropies(
        model, input_module, output_module, estimator.input_sae_._params(), estimator.input_sae_.k,
        estimator.output_sae_._params(), estimator.output_sae_.k, ids, mask, batch_size,
    )
    scores = {f"ce_{name}": ce[name] for name in ("clean", "zero_input", "zero_output", "input", "output")}
    scores["ce_zero"] = ce["zero_output"]
    for side in ("input", "output"):
        # each SAE against deleting what it replaces: the MLP's input (so f(0)) or its output
        baseline = ce[f"zero_{side}"]
        gap = baseline - ce["clean"]
        scores[f"score_{side}"] = float((baseline - ce[side]) / gap) if gap != 0 else float("nan")
    scores["score_mean"] = (scores["score_input"] + scores["score_output"]) / 2
    scores["n_tokens"] = ce["n_tokens"]
    return scores


def _hidden_size(model):
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
