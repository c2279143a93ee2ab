"""The private scikit-learn names this package relies on, imported in one place."""

from sklearn.base import _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils._set_output import ADAPTERS_MANAGER, _get_output_config
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = [
    "ADAPTERS_MANAGER", "HasMethods", "Interval", "StrOptions", "_fit_context",
    "_get_output_config", "check_is_fitted", "validate_data",
]
