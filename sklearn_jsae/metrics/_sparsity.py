"""Jacobian sparsity, per sample and global, in the paper's absolute units or normalised.

Both measures are computed by one pass over the active Jacobian entries (:func:`_sparsity_pass`),
from a fitted estimator and X or from a 3-D COO Jacobian; the global one accumulates its
(n_out, n_in) mean sparsely, batch by batch.
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp

from .._topk import _validate_X
from ._validation import _check_bool, _check_jsae, _check_thresholds

# The paper's thresholds τ; documented in the package, which exports them.
DEFAULT_THRESHOLDS = (0.005, 0.01, 0.015, 0.02)
# The global matrix sums its pending entries into the running CSR total once it holds this many
# and at least as many as the total (as AbsJacobianSum does): one sum per batch would rebuild the
# total every batch, one sum at the end would hold all entries, and a fixed size rebuilt a total
# of up to n_out · n_in entries every 4M entries (quadratic in the rows until it fills).  Growing
# with the total, the flushes cost O(entries) in all and hold at most as many pending entries.
GLOBAL_FLUSH_ENTRIES = 1 << 22


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
        if np.iscomplexobj(J.data) or not np.issubdtype(J.dtype, np.number):
            raise ValueError(f"the Jacobian array must hold real numbers, got dtype {J.dtype}; pass the "
                             f"array jacobian() returns (or its real part, J.real).")
        if not J.has_canonical_format:
            # SciPy's meaning of repeated coordinates is their sum (what tocsr or todense give):
            # read one by one they would count as several entries of other values.
            J = J.copy()
            J.sum_duplicates()
        t, i, j = (np.asarray(c, dtype=np.int64) for c in J.coords)
        n, n_out = J.shape[0], J.shape[1]
        finite = np.isfinite(J.data)
        if not finite.all():
            raise ValueError(
                f"the Jacobian array holds NaN or inf ({int((~finite).sum())} of its entries, the first in "
                f"sample {int(t[~finite][0])}); no fraction above a threshold is defined for "
                f"them. Pass the array jacobian() returns, or drop those samples."
            )
        pairs = np.unique(t * n_out + i)
        values = np.abs(np.asarray(J.data, dtype=np.float64))
        yield t, i, j, values, np.bincount(t, minlength=n), (pairs // n_out, pairs % n_out)
        return
    _check_jsae(source)
    if X is None:
        raise ValueError("X is required with a fitted estimator: pass the MLP inputs to evaluate on.")
    X = _validate_X(source, X, reset=False, checked_in_batches=True)  # a memmap: batch by batch
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
    of J is of order ``c_y / c_x``, which differs between layers and models (0.84 and 2.9 on
    MiniLM layers 3 and 5, 22.8 on SmolLM2 layer 25), so a fixed τ on J means something different
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
            if pending_size >= max(GLOBAL_FLUSH_ENTRIES, total.nnz):
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
        typical ``|J|`` is of order ``c_y / c_x`` (0.84 and 2.9 on MiniLM layers 3 and 5, 22.8
        on SmolLM2 layer 25), so the absolute τ = 0.01 is strict on some layers and says nothing
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
    TypeError
        If ``normalize`` is not a bool.

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
    normalize = _check_bool(normalize, "normalize")
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
    TypeError
        If ``return_matrix`` is not a bool.

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
    return_matrix = _check_bool(return_matrix, "return_matrix")
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
