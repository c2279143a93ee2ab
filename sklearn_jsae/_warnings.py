"""Warnings attributed to the user's line, not to this package's internals.

``warnings.warn``'s ``stacklevel`` counts frames from the call, and the same warning is reached
through calls of different depths (``fit``, ``partial_fit``, ``fit_stream``, a decorator, a
``GridSearchCV``), so a fixed level pointed at one of this package's files on every path but
one: the user read ``sklearn_jsae/_backend/train.py:343`` instead of the line of their script,
and a ``warnings.filterwarnings(..., module=...)`` on their own module missed it.  Here the level
is counted at run time, to the first frame outside this package (and outside torch,
``contextlib`` and scikit-learn's method wrappers, whose frames a hook, a context manager or a
decorator put in between).  Python 3.12's ``skip_file_prefixes`` does the same, but the package
supports 3.10.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _passed_through() -> tuple[str, ...]:
    """The folders and files whose frames are skipped: this package's, torch's, contextlib's and
    scikit-learn's wrappers around an estimator's methods (``_fit_context`` and ``fit_transform``
    in ``sklearn/base.py``, ``set_output``'s in ``sklearn/utils/_set_output.py``).  A search or a
    pipeline is a caller: its own line is named, as scikit-learn's own warnings do."""
    prefixes = [_PACKAGE, os.path.abspath(contextlib.__file__)]
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "__file__", None):
        prefixes.append(os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    sklearn = sys.modules.get("sklearn")
    if sklearn is not None and getattr(sklearn, "__file__", None):
        folder = os.path.dirname(os.path.abspath(sklearn.__file__))
        prefixes += [os.path.join(folder, "base.py"), os.path.join(folder, "utils", "_set_output.py")]
    return tuple(prefixes)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` at the first caller outside this package."""
    skipped = _passed_through()
    frame, level = sys._getframe(1), 2  # level 1 is this function, 2 its caller
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(skipped):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
