"""``memofill gen`` and ``memofill check``: exit codes, paths, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memofill.cli import main
from memofill.codegen import PACKAGE_INIT, load_registry, render
from memofill.errors import RegistryLoadError

VALID = """from memofill import CacheFill, Dataset

DATASETS = [
    Dataset("news:digest:v1", ttl_s=900, cache_fill=CacheFill(15_000, 10_000, 25, 500)),
    Dataset("weather:alerts:v2", ttl_s=300),
]
"""
INVALID = """from memofill import CacheFill, Dataset

DATASETS = [
    Dataset("a:v1", ttl_s=0),
    Dataset("b:v1", ttl_s=5, negative_ttl_s=-1),
    Dataset("c:v1", ttl_s=5, cache_fill=CacheFill(5_000, 6_000, 10, 250)),
    Dataset("d:{x}{y}", ttl_s=5),
]
"""
PYPROJECT = '[tool.memofill]\nregistry = "src/reg.py"\nout = "build/policies.py"\n'


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose pyproject.toml names src/reg.py and build/policies.py; cwd is its root."""
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "reg.py").write_text(VALID)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(err: str, *fragments: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("memofill: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory`` with its bytes and mtime, to prove nothing was written."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# -- gen -----------------------------------------------------------------------------------


def test_gen_writes_the_module_named_in_pyproject(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "gen") == (
        0,
        "memofill: wrote build/policies.py from src/reg.py\n"
        "memofill: wrote build/__init__.py, so that no other package named like it wins\n",
        "",
    )
    out = project / "build" / "policies.py"
    assert out.read_text() == render(load_registry(project / "src" / "reg.py"), "src/reg.py")
    assert out.stat().st_mode & 0o777 == 0o644
    assert (out.parent / "__init__.py").read_text() == PACKAGE_INIT
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["__init__.py", "policies.py"], "no temporary file left"


def test_gen_keeps_an_existing_package_init_and_check_wants_one(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "build").mkdir()
    (project / "build" / "__init__.py").write_text("OWN = 1\n")
    assert run(capsys, "gen") == (0, "memofill: wrote build/policies.py from src/reg.py\n", "")
    assert (project / "build" / "__init__.py").read_text() == "OWN = 1\n"
    (project / "build" / "__init__.py").unlink()
    code, _, err = run(capsys, "check")
    assert code == 1
    assert err == "memofill: build/__init__.py is missing; run 'memofill gen'\n"
    assert run(capsys, "gen")[0] == 0
    assert run(capsys, "check")[0] == 0


def test_gen_is_deterministic_from_any_directory(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = project / "build" / "policies.py"
    assert run(capsys, "gen")[0] == 0
    first = out.read_bytes()
    assert run(capsys, "gen")[0] == 0
    assert out.read_bytes() == first
    monkeypatch.chdir(project / "src")
    assert run(capsys, "gen") == (0, "memofill: wrote ../build/policies.py from reg.py\n", "")
    assert out.read_bytes() == first
    assert b"\n# source: src/reg.py\n" in first


def test_flags_override_pyproject(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "other.py").write_text(VALID.replace("ttl_s=300", "ttl_s=30"))
    code, out, _ = run(capsys, "gen", "--registry", "other.py", "--out", "x/y.py")
    assert (code, out.splitlines()[0]) == (0, "memofill: wrote x/y.py from other.py")
    assert '"ttl_s": 30,' in (project / "x" / "y.py").read_text()
    assert not (project / "build").exists()
    assert run(capsys, "gen", "--out", "z.py")[1] == "memofill: wrote z.py from src/reg.py\n"


def test_both_flags_need_no_readable_pyproject(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "pyproject.toml").write_text("this is [not toml")
    assert run(capsys, "gen", "--registry", "src/reg.py", "--out", "o.py")[0] == 0


def test_built_in_defaults_without_a_tool_memofill_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    (tmp_path / "registry.py").write_text(VALID)
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "gen")[1].splitlines()[0] == (
        "memofill: wrote gen/cache_fill_registry.py from registry.py"
    )
    assert (tmp_path / "gen" / "cache_fill_registry.py").is_file()
    assert (tmp_path / "gen" / "__init__.py").read_text() == PACKAGE_INIT


@pytest.mark.parametrize("command", ["gen", "check"])
def test_an_invalid_registry_lists_every_problem_and_writes_nothing(
    project: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert run(capsys, "gen")[0] == 0
    (project / "src" / "reg.py").write_text(INVALID)
    before = snapshot(project)
    code, out, err = run(capsys, command)
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "memofill: error: src/reg.py is invalid (4 problems):",
        "memofill: error: src/reg.py: a:v1: ttl_s=0: must be > 0",
        "memofill: error: src/reg.py: b:v1: negative_ttl_s=-1: must be >= 0",
        "memofill: error: src/reg.py: c:v1: cache_fill.wait_ms=6000: must be < lease_ms (5000)",
        "memofill: error: src/reg.py: d:{x}{y}: key='d:{x}{y}': "
        "fields {x} and {y} must be separated by ':' or '/'",
    ]
    assert snapshot(project) == before


def test_gen_on_an_invalid_registry_creates_no_file(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "src" / "reg.py").write_text(INVALID)
    assert run(capsys, "gen")[0] == 2
    assert not (project / "build").exists()


def test_gen_reports_an_unwritable_output_on_one_line(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "blocker").write_text("a file, not a directory")
    code, out, err = run(capsys, "gen", "--out", "blocker/policies.py")
    assert (code, out) == (2, "")
    assert_one_error(err, "blocker")


# -- check ---------------------------------------------------------------------------------


def test_check_in_sync(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "gen")
    before = snapshot(project)
    expected = "memofill: build/policies.py is in sync with src/reg.py\n"
    assert run(capsys, "check") == (0, expected, "")
    assert snapshot(project) == before


def test_check_reports_drift_with_a_diff_and_writes_nothing(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "gen")
    registry = project / "src" / "reg.py"
    registry.write_text(registry.read_text().replace("ttl_s=300", "ttl_s=301"))
    before = snapshot(project)
    code, out, err = run(capsys, "check")
    assert code == 1
    assert out.startswith("--- build/policies.py (on disk)\n+++ build/policies.py (generated)\n")
    assert '\n-        "ttl_s": 300,\n+        "ttl_s": 301,\n' in out
    expected = "memofill: build/policies.py is out of date; run 'memofill gen' to regenerate it\n"
    assert err == expected
    assert snapshot(project) == before


def test_check_sees_any_byte_changed_by_hand(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "gen")
    out = project / "build" / "policies.py"
    out.write_bytes(out.read_bytes() + b"\n")
    assert run(capsys, "check")[0] == 1


def test_check_counts_a_missing_output_as_drift(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "check")
    assert code == 1
    assert "+# generated by memofill gen — do not edit\n" in out
    assert "is missing" in err
    assert not (project / "build").exists()


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["gen", "check"])
@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        (None, ["src/reg.py: no such file"]),
        ("DATASETS = [\n", ["src/reg.py:1: syntax error"]),
        ("import sys\nDATASETS = [sys.no_such]\n", ["src/reg.py: raised AttributeError"]),
        ("X = 1\n", ["src/reg.py: defines no DATASETS"]),
        ("DATASETS = 'news'\n", ["src/reg.py: DATASETS must be a list or tuple, not str"]),
    ],
)
def test_registry_load_errors_are_one_line(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    source: str | None,
    fragments: list[str],
) -> None:
    registry = project / "src" / "reg.py"
    if source is None:
        registry.unlink()
    else:
        registry.write_text(source)
    code, out, err = run(capsys, command)
    assert (code, out) == (2, "")
    assert_one_error(err, *fragments)
    assert not (project / "build").exists()


def test_a_non_dataset_in_datasets(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "src" / "reg.py").write_text(VALID.replace("]\n", "    'x',\n]\n"))
    code, _, err = run(capsys, "gen")
    assert code == 2
    assert err.splitlines()[1:] == [
        "memofill: error: src/reg.py: DATASETS[2]: item='x': must be a memofill.Dataset"
    ]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[tool.memofill\n", "pyproject.toml: invalid TOML"),
        ("[tool.memofill]\nregistry = 5\n", "[tool.memofill] registry must be a string path"),
        ("[tool]\nmemofill = 1\n", "[tool.memofill] must be a table"),
    ],
)
def test_a_bad_pyproject_is_one_line(
    project: Path, capsys: pytest.CaptureFixture[str], content: str, fragment: str
) -> None:
    (project / "pyproject.toml").write_text(content)
    code, out, err = run(capsys, "check")
    assert (code, out) == (2, "")
    assert_one_error(err, fragment)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["gen", "--bogus"], "unrecognized arguments: --bogus"),
        (["check", "--registry"], "argument --registry: expected one argument"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_are_one_line(
    project: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert_one_error(err, fragment)


# -- as a process --------------------------------------------------------------------------


def python_m_memofill(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "memofill", *argv]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False, timeout=60)


def test_python_m_memofill_round_trip(project: Path) -> None:
    assert python_m_memofill(project, "check").returncode == 1
    generated = python_m_memofill(project, "gen")
    assert (generated.returncode, generated.stderr) == (0, "")
    checked = python_m_memofill(project, "check")
    assert (checked.returncode, checked.stderr) == (0, "")


@pytest.mark.parametrize(
    ("argv", "source"),
    [(["check"], "DATASETS = [\n"), (["gen"], "raise RuntimeError('boom')\n"), (["gen", "-x"], "")],
)
def test_python_m_memofill_errors_have_no_traceback(
    project: Path, argv: list[str], source: str
) -> None:
    (project / "src" / "reg.py").write_text(source)
    result = python_m_memofill(project, *argv)
    assert (result.returncode, result.stdout) == (2, "")
    assert "Traceback" not in result.stderr
    assert_one_error(result.stderr)


def memofill_script(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run the command as the installed ``memofill`` script runs it.

    A console script puts its own directory first on ``sys.path``, not the
    current directory as ``python -m`` does; this script is the same two lines
    pip writes, in a directory of its own, so the difference is reproduced.
    """
    bin_dir = cwd.parent / f"{cwd.name}-bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "memofill"
    script.write_text("import sys\nfrom memofill.cli import main\nsys.exit(main())\n")
    command = [sys.executable, str(script), *argv]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False, timeout=60)


ENTRY_POINTS = [python_m_memofill, memofill_script]
IMPORTING = """from memofill import Dataset
from mydatasets import TTL_S

DATASETS = [Dataset("news:digest:v1", ttl_s=TTL_S)]
"""


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=["python-m", "script"])
def test_a_registry_imports_a_module_beside_it(project: Path, entry: Any) -> None:
    (project / "src" / "reg.py").write_text(IMPORTING)
    (project / "src" / "mydatasets.py").write_text("TTL_S = 123\n")
    generated = entry(project, "gen")
    assert (generated.returncode, generated.stderr) == (0, ""), generated.stderr
    assert '"ttl_s": 123' in (project / "build" / "policies.py").read_text()
    checked = entry(project / "src", "check")  # from another directory, the same module
    assert (checked.returncode, checked.stderr) == (0, ""), checked.stderr


def test_both_entry_points_write_the_same_module(project: Path) -> None:
    (project / "src" / "reg.py").write_text(IMPORTING)
    (project / "src" / "mydatasets.py").write_text("TTL_S = 77\n")
    outputs = []
    for entry in ENTRY_POINTS:
        (project / "build" / "__init__.py").unlink(missing_ok=True)  # each run writes its own
        done = entry(project, "gen")
        assert done.returncode == 0, done.stderr
        outputs.append((done.stdout, (project / "build" / "policies.py").read_bytes()))
    assert outputs[0] == outputs[1]


def test_loading_a_registry_restores_sys_path(project: Path) -> None:
    (project / "src" / "reg.py").write_text(IMPORTING)
    (project / "src" / "mydatasets.py").write_text("TTL_S = 5\n")
    before = list(sys.path)
    load_registry(project / "src" / "reg.py")
    assert sys.path == before
    (project / "src" / "reg.py").write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(RegistryLoadError):
        load_registry(project / "src" / "reg.py")
    assert sys.path == before


DEEP = "x = " + "-" * 200_000 + "1\n"
STOPS = """class Stop(BaseException):
    pass

raise Stop("halt")
"""


@pytest.mark.parametrize("command", ["gen", "check"])
@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        (DEEP, "src/reg.py: too deeply nested for Python to compile"),
        ("x = " + "(lambda: " * 3000 + "1" + ")" * 3000 + "\n", "too deeply nested"),
        ("raise GeneratorExit\n", "src/reg.py: raised GeneratorExit while running"),
        (STOPS, "src/reg.py: raised Stop: halt while running"),
        ("import sys\nsys.exit(0)\n", "src/reg.py: exited (sys.exit(0)) while running"),
        ("raise SystemExit\n", "src/reg.py: exited (sys.exit(None)) while running"),
    ],
    ids=["deep-unary", "deep-lambdas", "generator-exit", "base-exception", "exit-0", "exit"],
)
def test_registry_that_stops_the_interpreter_is_one_line_exit_2(
    project: Path, command: str, source: str, fragment: str
) -> None:
    (project / "src" / "reg.py").write_text(source)
    done = python_m_memofill(project, command)
    assert (done.returncode, done.stdout) == (2, ""), done.stdout
    assert "Traceback" not in done.stderr
    assert_one_error(done.stderr, fragment)
    assert not (project / "build").exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("tool = 1\n", "[tool] must be a table, not an integer"),
        ("[tool]\nmemofill = 3\n", "[tool.memofill] must be a table, not an integer"),
        ("[tool]\nmemofill = [1]\n", "[tool.memofill] must be a table, not an array"),
        ("[tool.memofill]\nout = 5\n", "[tool.memofill] out must be a string path, not an integer"),
        ("[tool.memofill]\nprefix = true\n", "prefix must be a string, not a boolean"),
        ("[tool.memofill]\nurl = {a = 1}\n", "url must be a string, not a table"),
        ("a = " + "[" * 5000 + "]" * 5000 + "\n", "invalid TOML: nested too deeply"),
        (
            '[tool.memofill]\nouts = "gen/p.py"\n',
            "[tool.memofill] has an unknown key 'outs' (did you mean 'out'?); "
            "known keys: out, prefix, registry, url",
        ),
        (
            '[tool.memofill]\nregistry = "r.py"\ncolour = "red"\n[tool.memofill.extra]\n',
            "[tool.memofill] has unknown keys 'colour', 'extra'; known keys: out, prefix,",
        ),
    ],
)
def test_a_pyproject_of_the_wrong_shape_is_one_line(
    project: Path, content: str, fragment: str
) -> None:
    (project / "pyproject.toml").write_text(content)
    done = python_m_memofill(project, "check")
    assert (done.returncode, done.stdout) == (2, "")
    assert "Traceback" not in done.stderr
    assert_one_error(done.stderr, "pyproject.toml: ", fragment)


@pytest.mark.parametrize("table", ["memofil", "memo-fill", "MemoFill", "memofills"])
def test_a_misspelt_table_is_one_warning_naming_it_and_the_keys(project: Path, table: str) -> None:
    (project / "pyproject.toml").write_text(
        PYPROJECT.replace("[tool.memofill]", f"[tool.{table}]") + "[tool.ruff]\nline-length = 1\n"
    )
    (project / "registry.py").write_text(VALID)  # what the built-in defaults then read
    done = python_m_memofill(project, "gen")
    assert done.returncode == 0, done.stderr  # the table is optional: the defaults still work
    assert done.stderr.splitlines() == [
        f"{project / 'pyproject.toml'}: [tool.{table}] is not read by memofill (its table is "
        "[tool.memofill], with the keys out, prefix, registry, url): rename it, or memofill "
        "ignores its settings"
    ]
    assert (project / "gen" / "cache_fill_registry.py").is_file()
    assert not (project / "build").exists()  # the misspelt table's out was ignored, as warned


def test_a_correct_table_and_other_tools_are_not_warned_about(project: Path) -> None:
    (project / "pyproject.toml").write_text(
        PYPROJECT + "[tool.mypy]\nstrict = true\n[tool.memory-profiler]\nx = 1\n"
    )
    done = python_m_memofill(project, "gen")
    assert (done.returncode, done.stderr) == (0, "")


def test_absolute_paths_are_named_as_given(project: Path, tmp_path_factory: Any) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    registry, out = project / "src" / "reg.py", elsewhere / "policies.py"
    done = python_m_memofill(elsewhere, "gen", "--registry", str(registry), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"memofill: wrote {out} from {registry}\n"
    registry.write_text("DATASETS = [\n")
    done = python_m_memofill(elsewhere, "check", "--registry", str(registry), "--out", str(out))
    assert done.returncode == 2
    assert_one_error(done.stderr, f"{registry}:1: syntax error")


def test_a_failed_write_names_the_output_not_a_temporary_file(project: Path) -> None:
    (project / "build" / "policies.py").mkdir(parents=True)  # os.replace onto a directory fails
    done = python_m_memofill(project, "gen")
    assert (done.returncode, done.stdout) == (2, "")
    assert_one_error(done.stderr, "build/policies.py: cannot write")
    assert ".tmp" not in done.stderr
    assert [p.name for p in (project / "build").iterdir()] == ["policies.py"]


REPOSITORY = Path(__file__).resolve().parent.parent


def _the_registry_page_project(directory: Path, *edits: tuple[str, str]) -> None:
    """The repository's registry and generated module in ``directory``, the registry edited."""
    (directory / "gen").mkdir()
    for name in ("registry.py", "gen/cache_fill_registry.py", "gen/__init__.py"):
        (directory / name).write_bytes((REPOSITORY / name).read_bytes())
    (directory / "pyproject.toml").write_text(
        '[tool.memofill]\nregistry = "registry.py"\nout = "gen/cache_fill_registry.py"\n'
    )
    registry = (directory / "registry.py").read_text()
    for before, after in edits:
        assert before in registry, f"the page's edit no longer applies to registry.py: {before}"
        registry = registry.replace(before, after)
    (directory / "registry.py").write_text(registry)


def _console_block(page: str, command: str, end: str) -> list[str]:
    """The lines a console block of ``page`` shows after ``$ command``, up to ``end``."""
    block = page.split(f"   $ {command}\n", 1)[1].split(end, 1)[0]
    return [line.removeprefix("   ") for line in block.splitlines()]


def test_the_registry_pages_check_example_is_what_check_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/registry.rst shows ``memofill check`` on its registry after one edit: this output."""
    page = (REPOSITORY / "docs" / "registry.rst").read_text()
    shown = _console_block(page, "memofill check", "   $ echo $?\n")
    _the_registry_page_project(
        tmp_path,
        (
            '"market:quotes:{symbol}",\n        ttl_s=60,',
            '"market:quotes:{symbol}",\n        ttl_s=30,',
        ),
    )
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "check")
    assert code == 1, err
    assert out.splitlines() + err.splitlines() == shown


def test_the_registry_pages_invalid_gen_example_is_what_gen_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/registry.rst shows ``memofill gen`` on its registry after two edits: this output."""
    page = (REPOSITORY / "docs" / "registry.rst").read_text()
    shown = _console_block(page, "memofill gen", "\n\n")
    _the_registry_page_project(
        tmp_path,
        ("lease_ms=15_000, wait_ms=10_000", "lease_ms=2_000, wait_ms=3_000"),
        (
            '"market:quotes:{symbol}",\n        ttl_s=60,',
            '"market:quotes:{symbol}",\n        ttl_s=0,',
        ),
    )
    written = (tmp_path / "gen" / "cache_fill_registry.py").read_bytes()
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "gen")
    assert code == 2, err
    assert out.splitlines() + err.splitlines() == shown
    assert (tmp_path / "gen" / "cache_fill_registry.py").read_bytes() == written
