"""Does the Jacobian predict the effect of removing one unit of an input latent?"""

from __future__ import annotations

import numpy as np

from .._topk import _inference_device, _validate_X
from ._validation import _check_bool, _check_jsae, _check_positive_int, _check_positive_real


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
    from .._backend.metrics import unit_interventions

    _check_jsae(estimator)
    X = _validate_X(estimator, X, reset=False, checked_in_batches=True)  # a memmap: batch by batch
    delta = _check_positive_real(delta, "delta")
    tol = _check_positive_real(tol, "tol", allow_zero=True)
    return_details = _check_bool(return_details, "return_details")
    if batch_size is not None:
        batch_size = _check_positive_int(batch_size, "batch_size")
    agree, total = 0, 0
    keep = {"jacobian": [], "observed": [], "output_latent": [], "input_latent": []}
    for J, observed, idx_y, idx_x in unit_interventions(
        estimator._mlp_map, estimator.input_sae_._params(), estimator.output_sae_._params(),
        estimator.input_sae_._encoding_k(), estimator.output_sae_._encoding_k(), X, delta,
        _inference_device(estimator), batch_size,
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
