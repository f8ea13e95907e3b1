"""Sphinx configuration for memofill's documentation.

Build (from the repository root), warnings as errors and every reference checked::

    python -m sphinx -W -n -b html docs docs/_build/html
    python -m sphinx -W -n -b doctest docs docs/_build/doctest

No extension needs the network, so there is no intersphinx: a small handler
below links standard-library names (``collections.abc.Mapping`` in a type hint,
say) to their page in the Python documentation by their module name alone, and
the few third-party names are listed in ``nitpick_ignore``.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The checkout first: memofill from this tree, and gen.cache_fill_registry (the
# default policies) that the examples load.
sys.path.insert(0, str(ROOT))
# The docs' own extension: ``.. bench-results::`` (see _ext/bench_results.py).
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

project = "memofill"
author = "the memofill authors"
try:
    release = metadata.version("memofill")
except metadata.PackageNotFoundError:  # a checkout that is not installed
    release = "0+unknown"
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "bench_results",
]

exclude_patterns = ["_build", "_ext"]
nitpicky = True
default_role = "py:obj"

# -- autodoc and napoleon ------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"

# Aliases stay names in signatures, linked to their own entries, instead of
# being expanded into the private types they are made of.
autodoc_type_aliases = {
    "Steps": "memofill.steps.Steps",
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- doctest -------------------------------------------------------------------
# Every Python example on the pages runs under the doctest builder. Examples
# that need Redis get fakeredis in a hidden ``testsetup`` on their page; none
# ever reaches a real server. memofill logs on the "memofill" logger and
# installs no handler; a NullHandler here keeps the doctest output to what the
# pages show (the logging page adds its own handlers).
doctest_global_setup = """
import logging
_memofill_logger = logging.getLogger("memofill")
if not any(isinstance(h, logging.NullHandler) for h in _memofill_logger.handlers):
    _memofill_logger.addHandler(logging.NullHandler())
"""

# -- references that cannot resolve without intersphinx (no network here) ------
nitpick_ignore = [
    # asyncio.Task as Sphinx resolves it on CPython (the C implementation's name).
    ("py:class", "_asyncio.Task"),
    # The standard library's compiled pattern, named by a tag template's fields.
    ("py:class", "re.Pattern"),
    # redis-py, a third-party dependency: named in Memofill's docstrings.
    ("py:class", "redis.Redis"),
    ("py:class", "redis.asyncio.Redis"),
    # The type variables of cached_dataset's signature: the decorated function's
    # parameters (P) and return type (R), which CachedDataset[P, R] keeps.
    ("py:class", "P"),
    ("py:class", "R"),
    ("py:class", "memofill.instance.P"),
    ("py:class", "memofill.instance.R"),
    ("py:class", "memofill.decorator.P"),
    ("py:class", "memofill.decorator.R"),
    # What a coroutine function's coroutine gives, named by its helpers' signatures.
    ("py:class", "memofill.decorator.T"),
    # The type of a CallResult's value.
    ("py:class", "memofill.outcomes.T"),
    # The exporters' third-party types, named in their signatures.
    ("py:class", "prometheus_client.metrics_core.Metric"),
    ("py:class", "prometheus_client.registry.Collector"),
    ("py:class", "opentelemetry.metrics.MeterProvider"),
    ("py:class", "opentelemetry.trace.TracerProvider"),
    ("py:class", "opentelemetry.metrics._internal.MeterProvider"),
    ("py:class", "opentelemetry.trace.Tracer"),
    ("py:class", "opentelemetry.metrics.Meter"),
]

#: Standard-library modules whose names autodoc's type hints may mention.
STDLIB_MODULES = frozenset(
    {
        "asyncio",
        "collections",
        "collections.abc",
        "contextlib",
        "contextvars",
        "logging",
        "pathlib",
        "random",
        "types",
        "typing",
    }
)


def link_stdlib(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve ``module.Name`` of the standard library to docs.python.org, offline.

    The URL is built from the name (``library/<module>.html#<module>.<Name>``), as
    intersphinx would find it, without downloading the inventory. Any other
    missing reference stays missing, so ``-n`` still reports it.
    """
    from docutils import nodes  # noqa: PLC0415  # Sphinx brings docutils

    target = node.get("reftarget", "")
    module = next(
        (m for m in sorted(STDLIB_MODULES, key=len, reverse=True) if target.startswith(m + ".")),
        None,
    )
    if node.get("refdomain") != "py" or module is None:
        return None
    uri = f"https://docs.python.org/3/library/{module}.html#{target}"
    reference = nodes.reference("", "", internal=False, refuri=uri, reftitle=target)
    reference += contnode
    return reference


def setup(app: Any) -> None:
    app.connect("missing-reference", link_stdlib)


# -- HTML ----------------------------------------------------------------------
html_theme = "furo"
html_title = f"memofill {release}"
html_static_path = ["_static"]
html_show_copyright = False
