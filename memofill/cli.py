"""The ``memofill`` command line: one table of subcommands, each a parser setup and a handler.

Every failure the user can cause ends as lines starting ``memofill: error:`` on
stderr and exit status 2, never a traceback: argparse errors included. Exit 1
is kept for ``check`` finding drift, so CI can tell "out of date" from "broken".
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import attrs
import orjson
import redis
import redis.cluster

from memofill import codegen, demo, inspection, purge, timeline
from memofill.commands import Commands
from memofill.errors import MemofillError, RegistryError, UnknownTagError
from memofill.failures import REDIS_ERRORS
from memofill.generations import mark_field
from memofill.keys import meta_key, prefix_problem, tags_key
from memofill.policy import Dataset, load_policies, tag_index
from memofill.project import find_pyproject, tool_settings
from memofill.scripts import TOMB_MS

#: Used when no pyproject.toml sets ``[tool.memofill]`` (or none can be read).
DEFAULT_REGISTRY = "registry.py"
DEFAULT_OUT = "gen/cache_fill_registry.py"


class CommandError(MemofillError):
    """A command cannot go on; its message is the one line the user sees."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors reach :func:`main` as one line instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(message)


@attrs.frozen
class Command:
    """One subcommand: its help line, how it adds its arguments, and what runs it."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


@attrs.frozen
class Project:
    """Where ``gen`` and ``check`` read and write.

    ``registry`` and ``out`` are as the user gave them (a flag, or an absolute
    path in pyproject.toml), else relative to the current directory, so
    messages name the paths the user knows; ``label`` names the registry
    relative to the project root, so the generated header is the same on every
    machine and from every working directory.
    """

    registry: Path
    out: Path
    label: str


def _path_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", metavar="PATH", help="registry file to read")
    parser.add_argument("--out", metavar="PATH", help="generated module to write or check")


def _relative(path: Path, start: Path) -> Path:
    """``path`` relative to ``start``, or unchanged when it has none (another drive)."""
    try:
        return Path(os.path.relpath(path, start))
    except ValueError:
        return path


def _project(args: argparse.Namespace) -> Project:
    """Paths from the flags, else from the nearest pyproject.toml, else the defaults.

    Flag paths are relative to the current directory, as a shell user expects;
    pyproject paths are relative to the directory holding pyproject.toml, so the
    commands work from any subdirectory.
    """
    cwd = Path.cwd()
    pyproject = find_pyproject(cwd)
    root = cwd if pyproject is None else pyproject.parent
    settings = {} if args.registry and args.out else tool_settings(pyproject)

    def where(flag: str | None, name: str, default: str) -> Path:
        if flag:
            return Path(flag)  # as the user typed it, so messages name it the same way
        setting = Path(settings.get(name, default))
        return setting if setting.is_absolute() else _relative(root / setting, cwd)

    registry = where(args.registry, "registry", DEFAULT_REGISTRY)
    out = where(args.out, "out", DEFAULT_OUT)
    return Project(registry=registry, out=out, label=_relative(registry, root).as_posix())


def _render(project: Project) -> str:
    return codegen.render(codegen.load_registry(project.registry), project.label)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write through a temporary file and ``os.replace``: readers never see half a module.

    Failures name ``path`` (or its directory), never the temporary file, which
    the user did not ask for and which is gone by the time they read the line.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(
            f"{path.parent.as_posix()}: cannot create the directory: {exc.strerror or exc}"
        ) from None
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CommandError(f"{path.as_posix()}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(temp, 0o644)  # mkstemp makes 0600; a source file is world-readable
        os.replace(temp, path)
    except BaseException as exc:
        os.unlink(temp)
        if isinstance(exc, OSError):
            raise CommandError(f"{path.as_posix()}: cannot write: {exc.strerror or exc}") from None
        raise


def _package_init(project: Project) -> Path | None:
    """The ``__init__.py`` the generated module's directory lacks, or ``None``.

    Never in the working directory or a project root (a directory holding
    pyproject.toml), which must not become packages; an existing one, hand-written
    or generated, is left as it is.
    """
    directory = project.out.parent
    init = directory / "__init__.py"
    if directory.resolve() == Path.cwd().resolve() or (directory / "pyproject.toml").exists():
        return None
    return None if init.exists() else init


def run_gen(args: argparse.Namespace) -> int:
    """Render the registry and write the module; nothing is written if the registry is invalid."""
    project = _project(args)
    text = _render(project)
    _write_atomically(project.out, text.encode("utf-8"))
    print(f"memofill: wrote {project.out.as_posix()} from {project.registry.as_posix()}")
    init = _package_init(project)
    if init is not None:
        _write_atomically(init, codegen.PACKAGE_INIT.encode("utf-8"))
        print(f"memofill: wrote {init.as_posix()}, so that no other package named like it wins")
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Compare the module on disk with a fresh render, byte for byte; never writes."""
    project = _project(args)
    expected = _render(project)
    out = project.out.as_posix()
    try:
        actual: bytes | None = project.out.read_bytes()
    except FileNotFoundError:
        actual = None
    init = _package_init(project)
    if actual == expected.encode("utf-8") and init is None:
        print(f"memofill: {out} is in sync with {project.registry.as_posix()}")
        return 0
    if init is not None and actual == expected.encode("utf-8"):
        print(f"memofill: {init.as_posix()} is missing; run 'memofill gen'", file=sys.stderr)
        return 1
    on_disk = "" if actual is None else actual.decode("utf-8", "replace")
    sys.stdout.write(codegen.diff(expected, on_disk, out))
    state = "is missing" if actual is None else "is out of date"
    print(f"memofill: {out} {state}; run 'memofill gen' to regenerate it", file=sys.stderr)
    return 1


def _policies_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policies",
        metavar="PATH",
        help="generated policy module to read (default: out in [tool.memofill])",
    )


def _policies(args: argparse.Namespace) -> tuple[Path, dict[str, Dataset] | None]:
    """The generated module's policies, validated; ``None`` when the file does not exist."""
    if args.policies:
        path = Path(args.policies)
    else:
        path = _project(argparse.Namespace(registry=None, out=None)).out
    if not path.is_file():
        if args.policies:
            raise CommandError(f"{path.as_posix()}: no such file")
        return path, None
    spec = importlib.util.spec_from_file_location("_memofill_policies", path)
    if spec is None or spec.loader is None:
        raise CommandError(f"{path.as_posix()}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a hand-edited module, even one calling sys.exit(): one line
        raise CommandError(f"{path.as_posix()}: cannot load: {codegen.failure(exc)}") from None
    return path, load_policies(module)


def _count(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in ``low..high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--procs", type=_count(1, 64), default=4, metavar="N", help="caller processes (default: 4)"
    )
    parser.add_argument(
        "--threads",
        type=_count(1, 500),
        default=25,
        metavar="N",
        help="caller threads per process (default: 25)",
    )
    parser.add_argument(
        "--origin-ms",
        type=_count(0, 60_000),
        default=200,
        metavar="MS",
        help="how long the origin takes (default: 200)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report as one JSON object on the last line of stdout",
    )
    parser.add_argument(
        "--trace",
        metavar="PATH",
        help="also write the coordinated burst as a timeline trace (JSON)",
    )
    parser.add_argument(
        "--svg", metavar="PATH", help="also draw the coordinated burst as an SVG timeline"
    )
    _policies_argument(parser)


def run_demo(args: argparse.Namespace) -> int:
    """Two bursts on one cold key, coordinated and not; the table or the JSON summary."""
    path, policies = _policies(args)
    dataset = (policies or {}).get(demo.DEMO_DATASET)
    if dataset is None or dataset.cache_fill is None:
        where = path.as_posix() if policies is None else f"{demo.DEMO_DATASET} in {path.as_posix()}"
        print(f"memofill: no {where}; using the built-in demo policy", file=sys.stderr)
        dataset = demo.FALLBACK_POLICY
    settings = demo.Settings(args.procs, args.threads, args.origin_ms, dataset)
    try:
        report = demo.run_demo(settings, demo.redis_url_from_env())
    except redis.RedisError as exc:
        raise CommandError(f"Redis failed during the demo: {exc}") from None
    if args.trace:
        Path(args.trace).write_bytes(orjson.dumps(demo.trace(report), option=orjson.OPT_INDENT_2))
    if args.svg:
        Path(args.svg).write_text(timeline.render_svg(demo.trace(report)), encoding="utf-8")
    if args.json:
        print(orjson.dumps(demo.summary(report)).decode())
    else:
        print(demo.format_table(report))
    return 0


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "key",
        metavar="KEY",
        help="registry key, such as 'market:quotes:{symbol}', or a final key as logged",
    )
    parser.add_argument(
        "fields",
        metavar="ARG",
        nargs="*",
        help="field values (str), in order or as name=value; other types as name:TYPE=value, "
        "such as page:int=42 (TYPE: " + ", ".join(inspection.TYPED_WORDS) + ")",
    )
    parser.add_argument(
        "--url", help="Redis URL (default: $REDIS_URL, else url in [tool.memofill])"
    )
    parser.add_argument(
        "--prefix",
        help="the key prefix the application configures (default: prefix in [tool.memofill])",
    )
    parser.add_argument("--value", action="store_true", help="also print the stored value, decoded")
    _policies_argument(parser)


def _redis_target(args: argparse.Namespace) -> tuple[str, str]:
    """The URL and prefix to inspect: the flag, else (URL only) ``REDIS_URL``, else pyproject."""
    settings: dict[str, str] = {}
    if args.url is None or args.prefix is None:
        settings = tool_settings(find_pyproject(Path.cwd()))
    url = args.url or demo.redis_url_from_env() or settings.get("url")
    if not url:
        raise CommandError(
            "no Redis to inspect: pass --url, set REDIS_URL, or set url in [tool.memofill]"
        )
    if args.prefix is not None:
        prefix, source = args.prefix, "--prefix"
    else:
        prefix, source = settings.get("prefix", ""), "[tool.memofill] prefix"
    problem = prefix_problem(prefix)
    if problem:
        raise CommandError(f"{source} {prefix!r}: {problem}")
    return url, prefix


def run_inspect(args: argparse.Namespace) -> int:
    """Print one entry's policy, keys, TTLs, payload and lock holder; only reads.

    KEY is a registry key followed by field values, or a final key as the logs
    print it (prefix included), which is matched against every dataset.
    """
    url, prefix = _redis_target(args)
    path, policies = _policies(args)
    if policies is None:
        raise CommandError(f"{path.as_posix()}: no such file; run 'memofill gen' first")
    dataset = policies.get(args.key)
    if dataset is not None:
        values = inspection.field_values(dataset, args.fields)
        final = prefix + dataset.template.render(values)
    else:
        dataset = inspection.match_final_key(policies, prefix, args.key)
        if dataset is not None and args.fields:
            raise CommandError(
                f"{args.key!r} is a final key of {dataset.key!r}: give no field values with it"
            )
        if dataset is None:
            known = ", ".join(sorted(policies)) or "none"
            hint = inspection.prefix_hint(policies, prefix, args.key)
            raise CommandError(
                f"no dataset {args.key!r} in {path.as_posix()}, and no final key of one"
                f"{hint} (known: {known})"
            )
        final = args.key
    try:
        lines, value = inspection.inspect_entry(
            url, dataset, final, prefix=prefix, show_value=args.value
        )
    except redis.RedisError as exc:
        raise CommandError(f"cannot read from Redis at {demo.redact(url)}: {exc}") from None
    width = max(len(label) for label, _ in lines) + 1
    for label, text in lines:
        print(f"{label + ':':{width}} {text}")
    if value is not None:
        print(value)
    return 0


def _positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number > 0")
    return number


def _non_negative_float(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        number = -1.0
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return number


def _dataset_command_arguments(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """DATASET, and where its Redis is: what ``purge`` and ``invalidate`` share."""
    parser.add_argument(
        "dataset",
        metavar="DATASET",
        nargs="?" if optional else None,
        help="registry key, such as 'q:{symbol}'",
    )
    parser.add_argument(
        "--url", help="Redis URL (default: $REDIS_URL, else url in [tool.memofill])"
    )
    parser.add_argument(
        "--prefix",
        help="the key prefix the application configures (default: prefix in [tool.memofill])",
    )
    parser.add_argument(
        "--cluster", action="store_true", help="the URL names a node of a Redis Cluster"
    )
    _policies_argument(parser)


def _purge_arguments(parser: argparse.ArgumentParser) -> None:
    _dataset_command_arguments(parser)
    parser.add_argument(
        "--batch", type=_positive_int, default=1000, help="keys per SCAN step and UNLINK"
    )
    parser.add_argument(
        "--pause-ms",
        type=_non_negative_float,
        default=10.0,
        help="pause between two UNLINK batches (default 10)",
    )


def _dataset_target(args: argparse.Namespace) -> tuple[str, str, Dataset]:
    """The URL, prefix and dataset a ``purge`` or ``invalidate`` acts on."""
    url, prefix = _redis_target(args)
    path, policies = _policies(args)
    if policies is None:
        raise CommandError(f"{path.as_posix()}: no such file; run 'memofill gen' first")
    dataset = policies.get(args.dataset)
    if dataset is None:
        known = ", ".join(sorted(policies)) or "none"
        raise CommandError(f"no dataset {args.dataset!r} in {path.as_posix()} (known: {known})")
    return url, prefix, dataset


def _connect(url: str, cluster: bool) -> Any:
    kind = redis.cluster.RedisCluster if cluster else redis.Redis
    try:
        return kind.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    except ValueError as exc:  # the URL is not quoted: it may hold a password
        raise CommandError(f"bad Redis URL: {exc}") from None
    except REDIS_ERRORS as exc:
        raise CommandError(f"cannot reach Redis at {demo.redact(url)}: {exc}") from None


def _invalidate_arguments(parser: argparse.ArgumentParser) -> None:
    _dataset_command_arguments(parser, optional=True)
    parser.add_argument(
        "--tag", help="invalidate one tag, such as 'user:42', in every dataset bearing it"
    )
    parser.add_argument(
        "--soft",
        action="store_true",
        help="serve old values while one caller refreshes (datasets with stale_s; else as hard)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="invalidate even when no value of the dataset lives under the prefix",
    )


def run_invalidate(args: argparse.Namespace) -> int:
    """Make every value of one dataset fetched until now unservable, in every process: O(1).

    Refused, unless ``--force``, when no key of the dataset lives under the
    prefix: a mistyped or missing ``--prefix`` would otherwise report success
    and change nothing the application sees. With ``--tag``, see :func:`run_invalidate_tag`.
    """
    if (args.dataset is None) == (args.tag is None):
        raise CommandError("name one DATASET, or one tag with --tag")
    if args.tag is not None:
        return run_invalidate_tag(args)
    url, prefix, dataset = _dataset_target(args)
    client = _connect(url, args.cluster)
    try:
        if not args.force:
            _refuse_empty_prefix(client, url, prefix, [dataset], f"dataset {dataset.key!r}")
        mark = Commands(client).invalidate_dataset(
            meta_key(prefix), mark_field(dataset.key, args.soft)
        )
    except REDIS_ERRORS as exc:
        raise CommandError(f"cannot invalidate at {demo.redact(url)}: {exc}") from None
    finally:
        client.close()
    print(
        f"invalidated {dataset.key} under prefix {prefix!r} at "
        f"{inspection.stamp_text(int(mark))} (values fetched before it are no longer "
        "served; each process hears of it within its meta_check_ms)"
    )
    return 0


def _refuse_empty_prefix(
    client: Any, url: str, prefix: str, datasets: list[Dataset], what: str
) -> None:
    """Refuse to invalidate ``what`` where no value of ``datasets`` lives under ``prefix``."""
    if all(purge.first_key(client, prefix, dataset) is None for dataset in datasets):
        raise CommandError(
            f"no value of {what} lives under prefix {prefix!r} at {demo.redact(url)}, so "
            "invalidating it there would change nothing the application sees; check --prefix "
            "(and --url), or pass --force to invalidate anyway"
        )


def run_invalidate_tag(args: argparse.Namespace) -> int:
    """Make every value bearing one tag fetched until now unservable, in every process: O(1).

    Refused when no dataset's templates can produce the tag, and, unless
    ``--force``, when no value of a dataset bearing it lives under the prefix.
    """
    url, prefix = _redis_target(args)
    path, policies = _policies(args)
    if policies is None:
        raise CommandError(f"{path.as_posix()}: no such file; run 'memofill gen' first")
    index = tag_index(policies.values(), TOMB_MS)
    try:
        keep_ms = index.keep_ms(args.tag)
    except UnknownTagError as exc:
        raise CommandError(f"{path.as_posix()}: {exc}") from None
    bearers = [policies[key] for key, _ in index.bearers(args.tag)]
    names = ", ".join(dataset.key for dataset in bearers)
    client = _connect(url, args.cluster)
    try:
        if not args.force:
            what = f"a dataset bearing tag {args.tag!r} ({names})"
            _refuse_empty_prefix(client, url, prefix, bearers, what)
        mark = Commands(client).invalidate_tag(tags_key(prefix), args.tag, args.soft, keep_ms)
    except REDIS_ERRORS as exc:
        raise CommandError(f"cannot invalidate at {demo.redact(url)}: {exc}") from None
    finally:
        client.close()
    print(
        f"invalidated tag {args.tag} under prefix {prefix!r} at {inspection.stamp_text(int(mark))}"
        f" (datasets bearing it: {names}; their values bearing it fetched before it are no "
        "longer served)"
    )
    return 0


def run_purge(args: argparse.Namespace) -> int:
    """Remove one dataset's keys under the prefix (SCAN + UNLINK in batches) to free memory."""
    url, prefix, dataset = _dataset_target(args)
    client = _connect(url, args.cluster)
    try:
        done = purge.purge(client, prefix, dataset, batch=args.batch, pause_s=args.pause_ms / 1000)
    except REDIS_ERRORS as exc:
        raise CommandError(f"cannot purge at {demo.redact(url)}: {exc}") from None
    finally:
        client.close()
    print(
        f"purged {done.removed} keys of {dataset.key} under prefix {prefix!r} "
        f"({done.scanned} scanned)"
    )
    return 0


#: Subcommand name -> its parser setup and handler. A new subcommand is one entry.
COMMANDS: dict[str, Command] = {
    "gen": Command("write the generated policy module from the registry", _path_arguments, run_gen),
    "check": Command(
        "exit 0 if the generated module matches the registry, 1 with a diff if not",
        _path_arguments,
        run_check,
    ),
    "demo": Command(
        "a real stampede on a cold dataset, coordinated and then plain cache-aside",
        _demo_arguments,
        run_demo,
    ),
    "inspect": Command(
        "one dataset entry as Redis holds it now: keys, TTLs, payload, lock holder",
        _inspect_arguments,
        run_inspect,
    ),
    "invalidate": Command(
        "make every value of one dataset, or bearing one tag, fetched until now unservable, "
        "in every process (O(1))",
        _invalidate_arguments,
        run_invalidate,
    ),
    "purge": Command(
        "free the memory of one dataset's keys under the prefix (SCAN + UNLINK, in batches)",
        _purge_arguments,
        run_purge,
    ),
}


def _parser() -> _Parser:
    parser = _Parser(prog="memofill", description="Redis cache fills, once per miss.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.arguments(sub)
    return parser


def _error(message: str) -> None:
    """One error line; any password in a URL it quotes is blanked out first."""
    print(f"memofill: error: {' '.join(demo.redact(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status (0 ok, 1 drift, 2 error)."""
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command].run(args)
    except RegistryError as exc:
        count = len(exc.problems)
        _error(f"{exc.source} is invalid ({count} problem{'s' if count > 1 else ''}):")
        for problem in exc.problems:
            _error(f"{exc.source}: {problem}")
        return 2
    except MemofillError as exc:
        _error(str(exc))
        return 2
    except OSError as exc:  # e.g. the output directory cannot be written
        _error(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
