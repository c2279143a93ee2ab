"""Sphinx configuration: `make docs` builds HTML into docs/_build/html."""

import importlib.util

project = "sklearn-jsae"
author = "sklearn-jsae developers"
release = "0.1.0"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.mathjax", "sphinx.ext.doctest"]
extensions.append("numpydoc" if importlib.util.find_spec("numpydoc") else "sphinx.ext.napoleon")
autosummary_generate = True
numpydoc_show_class_members = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
