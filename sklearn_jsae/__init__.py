"""sklearn-jsae: Jacobian Sparse Autoencoders as scikit-learn estimators."""

from ._estimator import JacobianSparseAutoencoder
from ._persistence import load
from ._topk import TopKSparseAutoencoder

__all__ = ["JacobianSparseAutoencoder", "TopKSparseAutoencoder", "load"]
__version__ = "0.1.0"
