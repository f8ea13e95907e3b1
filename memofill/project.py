"""Where the run time finds a project's policies: ``policies=``, the environment, pyproject.toml.

One rule, in this order, the first place that is set wins (it never falls
through, so a missing file cannot quietly load another project's policies):

1. the ``policies=`` given to :class:`~memofill.Memofill` or ``configure()``;
2. the ``MEMOFILL_POLICIES`` environment variable: a dotted module name, or a
   file path (ending in ``.py`` or containing a path separator);
3. ``out`` in ``[tool.memofill]`` of the nearest pyproject.toml, from the current
   directory upwards (relative to that file), imported from its path;
4. the module ``gen.cache_fill_registry``.

:func:`tool_settings` reads ``[tool.memofill]`` for anyone who needs it (the
command line too).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

from memofill.errors import ConfigurationError
from memofill.policy import DEFAULT_POLICY_MODULE, Dataset, PolicySource, load_policies

#: The environment variable naming the policies module (dotted name or file path).
POLICIES_ENV = "MEMOFILL_POLICIES"

TomlLoader = Callable[[BinaryIO], dict[str, Any]]

logger = logging.getLogger("memofill")


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml in ``start`` or above it, as tools such as ruff look."""
    for directory in (start, *start.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _toml_loader() -> TomlLoader | None:
    """tomllib's ``load``; tomli's on Python 3.10; ``None`` when neither can be imported."""
    if sys.version_info >= (3, 11):
        import tomllib  # noqa: PLC0415  # chosen by version, so imported here

        return tomllib.load
    try:
        import tomli  # noqa: PLC0415
    except ImportError:
        return None
    load: TomlLoader = tomli.load
    return load


#: The ``[tool.memofill]`` keys, each a string: two paths (``memofill gen`` and ``check``, and
#: ``out`` for the run time), then what ``memofill inspect`` reads.
SETTINGS = {
    "registry": "a string path",
    "out": "a string path",
    "prefix": "a string",
    "url": "a string",
}


def tool_settings(pyproject: Path | None) -> dict[str, str]:
    """The ``[tool.memofill]`` table of ``pyproject``: ``{}`` without a file, table or reader.

    Every level is checked for its shape (``tool = 1`` is a mistake to report,
    not a crash), every key must be one of ``SETTINGS`` and every value a
    string. Raises :class:`~memofill.errors.ConfigurationError`, one line naming
    the file, when it cannot be read or parsed or has the wrong shape, or names
    a key memofill does not know. A table whose name is a near miss of
    ``memofill`` (``[tool.memofil]``) is logged once as a WARNING on the
    ``memofill`` logger: its settings would otherwise be ignored without a word.
    """
    load = _toml_loader()
    if pyproject is None or load is None:
        return {}
    try:
        with pyproject.open("rb") as file:
            data = load(file)
    except OSError as exc:
        raise ConfigurationError(f"{pyproject}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError, or bytes that are not UTF-8
        raise ConfigurationError(f"{pyproject}: invalid TOML: {exc}") from None
    except (MemoryError, RecursionError):  # arrays or tables nested thousands deep
        raise ConfigurationError(f"{pyproject}: invalid TOML: nested too deeply to read") from None
    tool = data.get("tool", {})
    if not isinstance(tool, dict):
        raise ConfigurationError(f"{pyproject}: [tool] must be a table, not {_toml_type(tool)}")
    _warn_misspelt_tables(pyproject, tool)
    section = tool.get("memofill", {})
    if not isinstance(section, dict):
        raise ConfigurationError(
            f"{pyproject}: [tool.memofill] must be a table, not {_toml_type(section)}"
        )
    unknown = sorted(set(section) - set(SETTINGS))
    if unknown:
        raise ConfigurationError(f"{pyproject}: [tool.memofill] {_unknown_keys(unknown)}")
    for name, kind in SETTINGS.items():
        value = section.get(name, "")
        if not isinstance(value, str):
            raise ConfigurationError(
                f"{pyproject}: [tool.memofill] {name} must be {kind}, not {_toml_type(value)}"
            )
    return section


def _unknown_keys(unknown: list[str]) -> str:
    """``has an unknown key 'outt' (did you mean 'out'?); known keys: ...``, on one line."""
    shown = []
    for name in unknown:
        close = difflib.get_close_matches(name.lower(), SETTINGS, n=1, cutoff=0.6)
        shown.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    noun = "an unknown key" if len(unknown) == 1 else "unknown keys"
    return f"has {noun} {', '.join(shown)}; known keys: {', '.join(sorted(SETTINGS))}"


#: The pyproject files and table names already warned about, in this process.
_told_misspelt: set[tuple[Path, str]] = set()


def _warn_misspelt_tables(pyproject: Path, tool: dict[str, Any]) -> None:
    """Warn once for each ``[tool.X]`` whose name is a near miss of ``memofill`` (ignored).

    A warning, not an error: the table is optional, so a project without it is
    fine, and the near miss may belong to another tool. ``memofil``,
    ``memo-fill`` and ``MemoFill`` are near misses; ``memofill`` is not.
    """
    for name in tool:
        if name == "memofill":
            continue
        plain = name.lower().replace("-", "").replace("_", "")
        if plain != "memofill" and not difflib.get_close_matches(plain, ["memofill"], cutoff=0.85):
            continue
        if (pyproject, name) in _told_misspelt:
            continue
        _told_misspelt.add((pyproject, name))
        logger.warning(
            "%s: [tool.%s] is not read by memofill (its table is [tool.memofill], with the keys "
            "%s): rename it, or memofill ignores its settings",
            pyproject,
            name,
            ", ".join(sorted(SETTINGS)),
        )


def _toml_type(value: object) -> str:
    """What a TOML value is called in TOML's own words, for messages about pyproject.toml."""
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names.update({list: "an array", dict: "a table"})
    return names.get(type(value), "a date or time")


def import_file(path: Path) -> ModuleType:
    """Import the module at ``path`` under a name of its own (not in ``sys.modules``).

    By path, not by a dotted name, so that no other package of the same name
    (an installed ``gen``, say) can stand in for it.
    """
    digest = hashlib.sha1(str(path.resolve()).encode(), usedforsecurity=False).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"_memofill_policies_{digest}", path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_named(name: str) -> dict[str, Dataset]:
    """A dotted module name, or a file path when it looks like one."""
    if name.endswith(".py") or os.sep in name or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigurationError(f"{path}: no such file")
        return load_policies(import_file(path))
    return load_policies(importlib.import_module(name))


def resolve_policies(source: PolicySource | None) -> dict[str, Dataset]:
    """The policies from the first place that is set (see the module docstring), validated.

    Raises :class:`~memofill.errors.ConfigurationError` listing every place it
    looked when the one in force cannot be loaded, and
    :class:`~memofill.errors.RegistryError` when it loads but breaks a rule.
    """
    if source is not None:
        try:
            return load_policies(source)
        except ModuleNotFoundError as exc:
            if not isinstance(source, str) or exc.name is None or not source.startswith(exc.name):
                raise  # the module was found, and an import inside it failed
            raise ConfigurationError(
                f"cannot import policies {source!r}: run `memofill gen`, or pass policies= (a "
                "module, its dotted name, a mapping of key -> Dataset, or the registry's DATASETS)"
            ) from exc
    looked = ["policies= (not given)"]
    try:
        named = os.environ.get(POLICIES_ENV)
        if named:
            looked.append(f"${POLICIES_ENV}={named}")
            return _load_named(named)
        looked.append(f"${POLICIES_ENV} (not set)")
        pyproject = find_pyproject(Path.cwd())
        out = tool_settings(pyproject).get("out")
        if pyproject is None:
            looked.append(f"pyproject.toml (none in {Path.cwd()} or above)")
        elif not out:
            looked.append(f"{pyproject} (no [tool.memofill] out)")
        else:
            path = pyproject.parent / out
            looked.append(f"[tool.memofill] out of {pyproject}: {path}")
            if not path.is_file():
                raise ConfigurationError(f"{path}: no such file")
            return load_policies(import_file(path))
        looked.append(f"module {DEFAULT_POLICY_MODULE}")
        return load_policies(importlib.import_module(DEFAULT_POLICY_MODULE))
    except (ImportError, ConfigurationError) as exc:
        raise ConfigurationError(
            f"cannot load the policies ({exc}); looked at, in order: {'; '.join(looked)}. "
            "Run `memofill gen`, or pass policies= (a module, its dotted name, a mapping of "
            f"key -> Dataset, or the registry's DATASETS), or set ${POLICIES_ENV}"
        ) from exc
