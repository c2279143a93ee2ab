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


def _check_bool(value, name):
    """``value`` as a bool; a string such as ``"no"`` is truthy, so anything but a bool is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def _check_index(value, name, size, what):
    """``value`` as an int in ``[0, size)``; ``what`` says what the ``size`` items are."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int (an index into the {size} {what}), got {value!r}.")
    if not 0 <= value < size:
        valid = f"so it must be in [0, {size - 1}]" if size else "so no index is valid"
        raise ValueError(f"{name}={int(value)} is out of range: there are {size} {what}, {valid}.")
    return int(value)


def _check_random_state(random_state, name="random_state"):
    """``sklearn.utils.check_random_state``, with an error that names the parameter (numpy's own, for
    a negative seed, names neither it nor the value)."""
    from sklearn.utils import check_random_state

    try:
        return check_random_state(random_state)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name} must be None, an int in [0, 2**32 - 1] or a numpy RandomState, got {random_state!r}."
        ) from exc
