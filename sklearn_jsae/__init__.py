"""sklearn-jsae: Jacobian Sparse Autoencoders as scikit-learn estimators."""

from ._estimator import JacobianSparseAutoencoder
from ._topk import TopKSparseAutoencoder

__all__ = ["JacobianSparseAutoencoder", "TopKSparseAutoencoder"]
__version__ = "0.1.0"
