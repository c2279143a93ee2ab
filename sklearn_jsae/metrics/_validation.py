"""Argument checks shared by the metrics: a clear error that names the parameter and its value."""

from __future__ import annotations

import numbers

import numpy as np

from .._sklearn_compat import check_is_fitted


def _check_jsae(estimator, name="estimator"):
    from .._estimator import JacobianSparseAutoencoder

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
