"""Sphinx configuration: ``make docs`` builds HTML into docs/_build/html, warnings as errors.

The build needs no network: intersphinx reads the inventories vendored in ``_inventories/``
(see its README), and the gallery (``../examples/plot_*.py``, run by sphinx-gallery at build time)
uses only the bundled data and the locally installed test models.
"""

import os
import re
import sys
from pathlib import Path

import sklearn_jsae

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "sphinxext"))

project = "sklearn-jsae"
author = "sklearn-jsae developers"
copyright = "sklearn-jsae developers (BSD-3-Clause)"
release = version = sklearn_jsae.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "_inventories", "sphinxext", "**/README.md"]
root_doc = "index"

# -- API reference --------------------------------------------------------------------------------
autosummary_generate = True
autosummary_ignore_module_all = False  # a module page lists exactly its __all__
autodoc_typehints = "none"  # numpydoc's Parameters sections say the types
toc_object_entries_show_parents = "hide"  # "fit()", not "JacobianSparseAutoencoder.fit()", in page tables
numpydoc_show_class_members = False

# -- Links to other projects, offline ------------------------------------------------------------
# name -> (the project's documentation site, the inventory file vendored in _inventories/)
_INVENTORIES = {
    "python": ("https://docs.python.org/3", "python.inv"),
    "numpy": ("https://numpy.org/doc/stable", "numpy.inv"),
    "scipy": ("https://docs.scipy.org/doc/scipy", "scipy.inv"),
    "sklearn": ("https://scikit-learn.org/stable", "sklearn.inv"),
    "torch": ("https://docs.pytorch.org/docs/stable", "torch.inv"),
}
# A missing file drops that project's links instead of reaching for the network.
intersphinx_mapping = {
    name: (url, str(HERE / "_inventories" / inv))
    for name, (url, inv) in _INVENTORIES.items()
    if (HERE / "_inventories" / inv).is_file()
}
intersphinx_timeout = 5

# -- Gallery ---------------------------------------------------------------------------------------
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the SmolLM2 example reads a local folder only
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The examples run in this process.  Their small products gain little from a second thread and
# lose several times over when other jobs share the cores (the quick start: 17 s on one thread,
# 53 s on two, on a 2-core machine running other work).  SKLEARN_JSAE_DOCS_THREADS=0 keeps torch's
# own choice.
_threads = int(os.environ.get("SKLEARN_JSAE_DOCS_THREADS", "1"))
if _threads > 0:
    import torch

    torch.set_num_threads(_threads)
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",  # run every example
    "within_subsection_order": "gallery_order.GalleryOrder",
    "doc_module": ("sklearn_jsae",),
    "backreferences_dir": "generated/backreferences",
    "reference_url": {"sklearn_jsae": None},
    "min_reported_time": 0,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "show_memory": False,
}

# -- HTML ----------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"sklearn-jsae {release}"
html_theme_options = {
    "logo": {"text": "sklearn-jsae"},
    "navbar_align": "left",
    "header_links_before_dropdown": 6,
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "secondary_sidebar_items": ["page-toc"],  # an example's downloads are at the end of its page
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version", "theme-version"],
}
html_sidebars = {"index": [], "getting_started": [], "changelog": []}
html_show_sourcelink = False
html_copy_source = False

# -- Pages other issues add ----------------------------------------------------------------------
# The user guide lists these (in its table of contents and its page list) as soon as the file
# exists: a toctree entry for a missing page, or a page in no toctree, fails a -W build.
OPTIONAL_GUIDE_PAGES = {
    "saving": "One safe file per model, pickles, and export to SAELens and sparsify.",
    "long_runs": "Streaming activations from a live model, resuming a killed run, data larger than memory.",
    "scaling": "Data-parallel training with torchrun on several processes or GPUs, and l1 sweeps on Dask.",
}
_TOC_MARKER = "   optional-pages-listed-by-conf-py\n"
_LIST_MARKER = ".. optional page descriptions, listed by conf.py\n"


def _list_optional_pages(app, docname, source):
    if docname != "user_guide":
        return
    present = [page for page in OPTIONAL_GUIDE_PAGES if (Path(app.srcdir) / f"{page}.rst").is_file()]
    toc = "".join(f"   {page}\n" for page in present)
    listing = "".join(f":doc:`{page}`\n    {OPTIONAL_GUIDE_PAGES[page]}\n" for page in present)
    source[0] = source[0].replace(_TOC_MARKER, toc).replace(_LIST_MARKER, listing)


# -- Docstrings written as plain text --------------------------------------------------------------
# numpydoc copies a parameter's type into reST as it stands, where "(n_samples, n_features_in_)"
# reads as a link to a target "n_features_in".  Escape a trailing underscore in the type of each
# "name : type" line before numpydoc (priority 500) turns it into reST.
_PARAM_LINE = re.compile(r"^(\s*[\w*][\w*, ]* : )([^`]+)$")
_TRAILING_UNDERSCORE = re.compile(r"(?<=\w)_(?=[,)\]}\s]|$)")


def _escape_param_types(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        match = _PARAM_LINE.match(line)
        if match and not line.lstrip().startswith((">>>", "...")):
            lines[i] = match.group(1) + _TRAILING_UNDERSCORE.sub(r"\\_", match.group(2))


# A docstring's "|J_t[i, j]|" (an absolute value) reads as a substitution in reST: define it as itself.
rst_prolog = r"""
.. |J_t[i, j]| replace:: \|J_t[i, j]\|
"""


def setup(app):
    app.connect("source-read", _list_optional_pages)
    app.connect("autodoc-process-docstring", _escape_param_types, priority=400)
