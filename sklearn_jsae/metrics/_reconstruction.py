"""Reconstruction quality of each SAE: FVU, explained variance, L0 and dead latents."""

from __future__ import annotations

import math

from .._sklearn_compat import check_is_fitted
from .._topk import _inference_device, _validate_X
from ._validation import _check_positive_int


def reconstruction_metrics(estimator, X, *, batch_size=None):
    """Reconstruction quality of both SAEs of a fitted JSAE, in one pass over X.

    For each side (``"input"``: Z = X, ``"output"``: Z = mlp(X), the true outputs)::

        fvu                 = Σ ||z - ẑ||² / Σ ||z - mean(z)||²        (0 is perfect)
        explained_variance  = 1 - fvu
        l0                  = mean number of latents with a value > 0 per row (<= k)
        dead_fraction       = fraction of latents with a value > 0 on no row of X

    On rows without variance (one row, or identical rows) FVU is undefined: it is reported as 0
    for an exact reconstruction and 1 otherwise, as ``score`` and scikit-learn's ``r2_score`` do.

    Parameters
    ----------
    estimator : fitted JacobianSparseAutoencoder or TopKSparseAutoencoder
        A single SAE gives only the ``"input"`` entry.
    X : array-like of shape (n_samples, n_features_in_)
        A memory-mapped array (``np.load(path, mmap_mode="r")``) is read ``batch_size`` rows at a
        time, so a store larger than memory can be measured.
    batch_size : int or None, default=None
        Rows per batch; None: 4,096, or fewer for a dictionary so wide that a batch's
        pre-activations would exceed scikit-learn's ``working_memory`` (``sklearn.set_config``).

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
    from .._backend.metrics import reconstruction_statistics
    from .._estimator import JacobianSparseAutoencoder
    from .._topk import TopKSparseAutoencoder

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
    if batch_size is None:
        from .._backend.inference import inference_rows

        batch_size = inference_rows(max(side.components_.shape[0] for side in sides if side is not None))
    batch_size = _check_positive_int(batch_size, "batch_size")
    # A memmap is read batch by batch (each batch checked for NaN / inf), never all at once.
    X = _validate_X(estimator, X, reset=False, checked_in_batches=True)
    stats = reconstruction_statistics(
        sides[0]._params(), None if sides[1] is None else sides[1]._params(), mlp_map, X,
        sides[0]._encoding_k(), None if sides[1] is None else sides[1]._encoding_k(),
        _inference_device(estimator), batch_size,
    )
    out = {}
    for name, s in stats.items():
        if not (math.isfinite(s["total"]) and math.isfinite(s["residual"])):
            # Outputs and codes are checked row by row; what is left is a sum beyond float64's range.
            raise ValueError(
                f"the {name} SAE's FVU is not finite on X (residual {s['residual']:.3g}, variance "
                f"{s['total']:.3g}): X's values are too large; is X on the scale the model was fitted on?"
            )
        if s["total"] > 0:
            fvu = s["residual"] / s["total"]
        else:  # rows without variance: score()'s convention (scikit-learn's force_finite), not inf
            fvu = 0.0 if s["residual"] == 0 else 1.0
        out[name] = {
            "fvu": float(fvu),
            "explained_variance": float(1.0 - fvu),
            "l0": float(s["l0"] / s["n"]),
            "dead_fraction": float(1.0 - s["fired"].mean()),
        }
    return out


def fraction_variance_unexplained(estimator, X, *, batch_size=None):
    """Fraction of variance unexplained of each SAE: ``{"input": FVU_x, "output": FVU_y}``.

    ``FVU = Σ ||z - ẑ||² / Σ ||z - mean(z)||²`` over all rows and features of X (input SAE)
    and of the true outputs mlp(X) (output SAE), the FVU sparsify trains on (equal to its
    ``SparseCoder(x).fvu`` on the exported SAE, tested); ``1 - FVU`` is the explained variance that
    :meth:`~sklearn_jsae.JacobianSparseAutoencoder.score` averages.  See
    :func:`reconstruction_metrics` for L0 and dead latents from the same pass.

    Parameters
    ----------
    estimator : fitted JacobianSparseAutoencoder (or TopKSparseAutoencoder: "input" only)
    X : array-like of shape (n_samples, n_features_in_)
    batch_size : int or None, default=None
        Rows per batch, as for :func:`reconstruction_metrics`.

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
