"""Sphinx configuration: API reference, user guide and the example gallery.

Built by ``nox -s docs`` into ``docs/_build/html``. The build is offline: no
intersphinx inventories are fetched, and the gallery examples use only weights
and data that pip packages ship.
"""

from __future__ import annotations

import os
import re
import sys

import sklearn_cnn

project = "sklearn-cnn"
author = "sklearn-cnn developers"
copyright = "sklearn-cnn developers"
release = sklearn_cnn.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"
default_role = "literal"
# Keep the build self-contained: no network at build time.
intersphinx_mapping: dict = {}

# -- autodoc / autosummary / numpydoc ---------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "none"  # types are in the numpydoc "Parameters" sections
autodoc_member_order = "groupwise"
autodoc_default_options = {"members": True, "inherited-members": True}
numpydoc_show_class_members = False  # members come from the class template
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True

# -- sphinx-gallery -----------------------------------------------------------
# docs/gallery_order.py orders the examples; it is imported by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py",
    "abort_on_example_error": True,
    "within_subsection_order": "gallery_order.ExampleOrder",
    "remove_config_comments": True,
    # A cell's last value is shown only when it renders as HTML (a DataFrame):
    # not the Text or Line2D objects that matplotlib calls return.
    "capture_repr": ("_repr_html_",),
    "download_all_examples": False,
    "show_memory": False,
    "doc_module": ("sklearn_cnn",),
    "backreferences_dir": "generated/backreferences",
}

# -- HTML --------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"sklearn-cnn {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    # The examples and the API pages give their width to code and signatures
    # (88 columns fit at 1280 px); the guides keep their table of contents.
    "secondary_sidebar_items": {
        "auto_examples/*": [],
        "generated/*": [],
        "index": ["page-toc"],
        "user_guide": ["page-toc"],
        "scaling": ["page-toc"],
        "models": ["page-toc"],
    },
}
html_show_sourcelink = False
# The guides are single pages: their "Section Navigation" sidebar would stay
# empty and take a quarter of the width from the code blocks.
html_sidebars = {page: [] for page in ("index", "user_guide", "scaling", "models")}


# -- Inherited scikit-learn docstrings ----------------------------------------
def _sklearn_label(app, env, node, contnode):
    """Show ``:ref:`` and ``:term:`` targets of scikit-learn's docs as plain text.

    Methods inherited from scikit-learn's mixins (``set_output``,
    ``get_metadata_routing``, ...) refer to labels of scikit-learn's
    documentation and glossary, which an offline build cannot link to. Any other
    unknown label or term still fails the build.
    """
    source = getattr(node, "source", None) or ""
    if node.get("reftype") in ("ref", "term") and "docstring of sklearn." in source:
        return contnode
    return None


# -- Progress bars in the gallery's output ------------------------------------
# The examples run with verbose=1 so that a long build shows its progress on
# the console; the captured output would list every update of every bar (tqdm
# redraws with carriage returns, which become line breaks). The pages keep
# each bar's final state only.
_PROGRESS = re.compile(
    r"^\s*(?P<desc>[^|\n]*?):? *\d+%\|[^|]*\| *(?P<n>\d+)/(?P<total>\d+) "
)


def _final_progress_only(app, docname, source):
    if not docname.startswith("auto_examples/"):
        return
    kept: list[str] = []
    last_bar = None  # (desc, line index in kept) of the last finished bar
    for line in source[0].split("\n"):
        match = _PROGRESS.match(line)
        if match is None:
            kept.append(line)
            last_bar = None
            continue
        if match["n"] == "0":
            last_bar = None  # a new bar starts
        if match["n"] != match["total"]:
            continue  # an intermediate state
        if last_bar is not None and last_bar[0] == match["desc"]:
            kept[last_bar[1]] = line  # the same bar, closed: keep the last
            continue
        kept.append(line)
        last_bar = (match["desc"], len(kept) - 1)
    source[0] = "\n".join(kept)


def setup(app):
    app.connect("missing-reference", _sklearn_label)
    app.connect("source-read", _final_progress_only)
