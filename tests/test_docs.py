"""The documentation's own promises: its code runs, the API reference is complete, it builds offline.

The full Sphinx build (``make docs``, run by ``.ci/run``) checks the rest with warnings as errors.
"""

import doctest
import importlib
import pkgutil
import re
import zlib
from pathlib import Path

import pytest

import sklearn_jsae

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _public_modules():
    names = ["sklearn_jsae"]
    names += [f"sklearn_jsae.{module.name}" for module in pkgutil.iter_modules(sklearn_jsae.__path__)
              if not module.name.startswith("_")]
    return names


def _public_names(module_name):
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [name for name, obj in vars(module).items()
            if not name.startswith("_") and getattr(obj, "__module__", None) == module_name]


def test_getting_started_code_runs():
    """The ten-line fit on docs/getting_started.rst, as a doctest (on one thread: fast on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = doctest.testfile(str(DOCS / "getting_started.rst"), module_relative=False,
                                  optionflags=doctest.NORMALIZE_WHITESPACE)
    finally:
        torch.set_num_threads(threads)
    assert result.attempted >= 8
    assert result.failed == 0


def test_api_reference_lists_every_public_module_and_name():
    listed = set(re.findall(r"^\s+(sklearn_jsae[\w.]*)\s*$", (DOCS / "api.rst").read_text(), flags=re.M))
    missing = [module for module in _public_modules() if module not in listed]
    for module in _public_modules():
        missing += [f"{module}.{name}" for name in _public_names(module) if f"{module}.{name}" not in listed]
    assert not missing, f"add these to docs/api.rst: {missing}"


def test_api_reference_lists_only_names_that_exist():
    listed = re.findall(r"^\s+(sklearn_jsae[\w.]*)\s*$", (DOCS / "api.rst").read_text(), flags=re.M)
    assert len(listed) > 20
    for dotted in listed:
        module_name, _, attribute = dotted.rpartition(".")
        if dotted in _public_modules():
            continue
        assert hasattr(importlib.import_module(module_name), attribute), dotted


@pytest.mark.parametrize("name", ["python", "numpy", "scipy", "sklearn", "torch"])
def test_vendored_intersphinx_inventory_is_readable(name):
    """conf.py reads these instead of the network; each must be a valid version-2 inventory."""
    data = (DOCS / "_inventories" / f"{name}.inv").read_bytes()
    header = data.split(b"\n", 4)
    assert header[0] == b"# Sphinx inventory version 2"
    assert header[3].startswith(b"# The remainder of this file is compressed using zlib")
    lines = zlib.decompress(header[4]).decode().splitlines()
    assert len(lines) >= 20
    assert all(len(line.split(" ", 4)) == 5 for line in lines)


def test_vendored_inventories_cover_the_names_the_docs_use():
    expected = {
        "numpy": ["numpy.ndarray", "numpy.random.RandomState", "numpy.argsort"],
        "torch": ["torch.nn.Module", "torch.Generator", "torch.Tensor"],
        "sklearn": ["sklearn.model_selection.GridSearchCV", "sklearn.pipeline.Pipeline",
                    "sklearn.base.clone"],
        "scipy": ["scipy.sparse.csr_array", "scipy.sparse.coo_array"],
    }
    for name, objects in expected.items():
        data = (DOCS / "_inventories" / f"{name}.inv").read_bytes().split(b"\n", 4)[4]
        names = {line.split(" ", 1)[0] for line in zlib.decompress(data).decode().splitlines()}
        assert set(objects) <= names, (name, set(objects) - names)
