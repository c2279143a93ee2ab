"""The private scikit-learn names this package relies on, imported in one place."""

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils._set_output import ADAPTERS_MANAGER, _get_output_config
from sklearn.utils.validation import _check_feature_names_in, check_is_fitted, validate_data

__all__ = [
    "ADAPTERS_MANAGER", "HasMethods", "Interval", "NumberInterval", "StrOptions", "_check_feature_names_in",
    "_fit_context", "_get_output_config", "check_is_fitted", "validate_data",
]


class NumberInterval(Interval):
    """scikit-learn's ``Interval`` without bools: Python counts ``True`` as the integer 1, so
    ``max_iter=True`` or ``k=True`` (a flag passed to the wrong parameter) would be one epoch or one
    latent without a word."""

    def is_satisfied_by(self, val):
        return not isinstance(val, (bool, np.bool_)) and super().is_satisfied_by(val)
