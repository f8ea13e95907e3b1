"""What ``mypy --strict`` reports on code that uses memofill: a forgotten ``await`` is an error.

tests/typing/typecheck_api.py is what must type-check (CI runs mypy on it); here mypy runs
on small modules in a temporary directory, all in one run (it takes seconds), and every
line it reports is compared with what the line itself expects: ``# E: <code>`` an error
of that code, ``# T: <type>`` that ``reveal_type`` shows that type. A line with neither
must draw nothing. Needs mypy, which comes with the dev extra.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: What the modules below decorate, imported by each of them.
CACHED = """
from __future__ import annotations

from memofill import Dataset, Memofill

cache = Memofill(None, policies={"item:{name}": Dataset("item:{name}", ttl_s=60)})


@cache.cached_dataset("item:{name}")
def fetch(name: str) -> dict[str, int]:
    return {name: 1}


@cache.cached_dataset("item:{name}")
async def afetch(name: str) -> dict[str, int]:
    return {name: 1}


class Repository:
    @cache.cached_dataset("item:{name}")
    async def item(self, name: str) -> list[str]:
        return [name]
"""

#: Module name -> source. Each checks one thing; mypy checks them all at once.
MODULES = {
    "awaited": """
        from cached import Repository, afetch


        async def main() -> None:
            reveal_type(await afetch("a"))  # T: dict[str, int]
            reveal_type(await afetch.invalidate("a"))  # T: int | None
            reveal_type(await afetch.invalidate_dataset(soft=True))  # T: int
            reveal_type(await afetch.refresh("a"))  # T: dict[str, int]
            result = await afetch.call_with_outcome("a")
            reveal_type(result)  # T: memofill.outcomes.CallResult[dict[str, int]]
            reveal_type(result.value)  # T: dict[str, int]
            item = Repository().item
            reveal_type(await item.invalidate("a"))  # T: int | None
            reveal_type(await item.invalidate_dataset())  # T: int
            reveal_type(await item.refresh("a"))  # T: list[str]
            outcome = await item.call_with_outcome("a")
            reveal_type(outcome)  # T: memofill.outcomes.CallResult[list[str]]
    """,
    "forgotten": """
        from memofill import CallResult

        from cached import Repository, afetch


        async def main() -> None:
            afetch.invalidate("a")  # E: unused-coroutine
            afetch.invalidate_dataset()  # E: unused-coroutine
            afetch.refresh("a")  # E: unused-coroutine
            afetch.call_with_outcome("a")  # E: unused-coroutine
            Repository().item.invalidate("a")  # E: unused-coroutine
            Repository().item.call_with_outcome("a")  # E: unused-coroutine
            deleted: int | None = afetch.invalidate("a")  # E: assignment
            mark: int = afetch.invalidate_dataset()  # E: assignment
            result: CallResult[dict[str, int]] = afetch.call_with_outcome("a")  # E: assignment
            value: dict[str, int] = afetch.refresh("a")  # E: assignment
            print(deleted, mark, result, value)
    """,
    "plain": """
        from cached import fetch


        async def main() -> None:
            reveal_type(fetch.invalidate("a"))  # T: int | None
            reveal_type(fetch.invalidate_dataset())  # T: int
            reveal_type(fetch.refresh("a"))  # T: dict[str, int]
            result = fetch.call_with_outcome("a")
            reveal_type(result)  # T: memofill.outcomes.CallResult[dict[str, int]]
            await fetch.invalidate("a")  # E: misc
            await fetch.call_with_outcome("a")  # E: misc
    """,
}

EXPECTATION = re.compile(r"#\s*(?P<kind>[ET]): (?P<what>.+?)\s*$")
REPORT = re.compile(
    r"^(?P<module>\w+)\.py:(?P<line>\d+): (?:error: .*\[(?P<code>[\w-]+)\]"
    r'|note: Revealed type is "(?P<type>.+)")$'
)


def expectations(module: str, source: str) -> set[tuple[str, int, str]]:
    """``(module, line, "E: code" or "T: type")`` for each line's own expectation."""
    expected = set()
    for number, line in enumerate(source.splitlines(), start=1):
        match = EXPECTATION.search(line)
        if match:
            expected.add((module, number, f"{match['kind']}: {match['what']}"))
    return expected


def reported(output: str) -> set[tuple[str, int, str]]:
    """The same, for each error and revealed type mypy printed (other notes aside)."""
    seen = set()
    for line in output.splitlines():
        match = REPORT.match(line)
        if match:
            what = f"E: {match['code']}" if match["code"] else f"T: {match['type']}"
            seen.add((match["module"], int(match["line"]), what))
    return seen


@pytest.mark.slow
def test_mypy_reports_a_forgotten_await_and_types_the_awaited_helpers(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy comes with the dev extra")
    sources = {"cached": CACHED, **{name: textwrap.dedent(s) for name, s in MODULES.items()}}
    for name, source in sources.items():
        (tmp_path / f"{name}.py").write_text(source, encoding="utf-8")
    # mypy finds this checkout's memofill by MYPYPATH: it cannot follow an editable
    # install's import hook (README).
    env = {**os.environ, "MYPYPATH": str(REPO)}
    command = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(
        [*command, *(f"{name}.py" for name in sources)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 2: mypy itself failed
    expected = set().union(*(expectations(name, source) for name, source in sources.items()))
    assert reported(result.stdout) == expected, result.stdout
    assert result.stdout.count("Are you missing an await?") == 6, result.stdout
