"""Print pip constraints that pin memofill's direct dependencies to their declared floors.

CI installs a second environment with these, so that every ``>=`` in pyproject.toml is
a version the test suite has run against, not a guess. Covered: the run-time
dependencies (with their environment markers) and the floors of the optional extras a
user installs (``hiredis``, ``prometheus``, ``otel``). The test tools themselves are
left to resolve to their newest releases. Usage: ``python .ci/lowest_constraints.py``
(Python 3.11+, for tomllib) from the repository root.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

#: The extras whose floors are promises to users (the others are tools: tests, docs, bench).
USER_EXTRAS = ("hiredis", "prometheus", "otel")

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)\s*(;.*)?$")


def constraints(pyproject: dict[str, object]) -> list[str]:
    project = pyproject["project"]
    assert isinstance(project, dict)
    declared = list(project["dependencies"])
    for extra in USER_EXTRAS:
        declared += project["optional-dependencies"][extra]
    pins = []
    for requirement in declared:
        match = REQUIREMENT.match(requirement.split("#")[0])
        if match is None:
            sys.exit(f"lowest_constraints: {requirement!r} has no '>=' floor to pin")
        name, floor, marker = match.groups()
        pins.append(f"{name}=={floor}{marker or ''}")
    return pins


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    with (root / "pyproject.toml").open("rb") as f:
        print("\n".join(constraints(tomllib.load(f))))
