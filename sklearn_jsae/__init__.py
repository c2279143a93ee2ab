"""sklearn-jsae: Jacobian Sparse Autoencoders as scikit-learn estimators."""

from ._backend.stop import graceful_stop
from ._estimator import JacobianSparseAutoencoder
from ._persistence import load
from ._topk import TopKSparseAutoencoder

__all__ = ["JacobianSparseAutoencoder", "TopKSparseAutoencoder", "graceful_stop", "load"]
__version__ = "0.1.0"
