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
:func:`classify_curves`                 its rule: linear, JumpReLU or other, for any swept curves
:func:`intervention_agreement`          does J predict the effect of removing one unit of a latent?
:func:`randomize_mlp`                   the randomised-model control
:func:`spliced_ce_score`                downstream CE-loss score of splicing each SAE into an LM
======================================  ============================================================

References
----------
L. Farnik, T. Lawson, C. Houghton, L. Aitchison. "Jacobian Sparse Autoencoders: Sparsify
Computations, Not Just Activations", ICML 2025, arXiv:2502.18147.
"""

from . import _sparsity
from ._intervention import intervention_agreement
from ._linearity import classify_curves, linearity
from ._randomized import randomize_mlp
from ._reconstruction import fraction_variance_unexplained, reconstruction_metrics
from ._sparsity import global_jacobian_sparsity, jacobian_scale, jacobian_sparsity
from ._spliced_ce import spliced_ce_score

#: The paper's thresholds τ for "``|J|`` > τ" (the default of every ``thresholds`` here).
DEFAULT_THRESHOLDS = _sparsity.DEFAULT_THRESHOLDS

__all__ = [
    "DEFAULT_THRESHOLDS",
    "classify_curves",
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
