"""Render one run's results as a markdown document: targets, one table per scenario, notes.

Everything a reader needs to reproduce or doubt a number is in the document:
the exact command, the machine, the versions, and how each row was configured
and each figure counted.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

from bench import expiry, fill, many, miss_cost, near, near_peers, registry
from bench.libraries import BY_SLUG, LIBRARIES, STALE_S, Library

FAMILIES = list(dict.fromkeys(library.family for library in LIBRARIES))
RAW_LABELS = {"raw-sync": "raw `SET`/`GET` (sync)", "raw-async": "raw `SET`/`GET` (asyncio)"}
NA = "n/a"


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    return f"{value:,.{digits}f}"


def _count(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _table(header: list[str], rows: Iterable[list[str]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _row(family: str, is_async: bool) -> Library | None:
    return next(
        (
            library
            for library in LIBRARIES
            if library.family == family and library.is_async == is_async
        ),
        None,
    )


def _hit_typed(typed: dict[str, Any]) -> list[str]:
    rows = [
        [
            name,
            _num(data["median_us"]),
            _num(data["p99_us"]),
            data.get("reference", ""),
            _num(data.get("ratio"), 2),
        ]
        for name, data in typed["rows"].items()
    ]
    return [
        "",
        "### Typed values (sync)",
        "",
        f"{typed['iterations']:,} timed calls per row, interleaved in {typed['rounds']} rounds. "
        "Each memofill row is divided by its reference: `GET` + `orjson.loads` for a plain dict, "
        "`GET` + cattrs `structure(orjson.loads(b))` for a dataclass, `GET` + pydantic "
        "`TypeAdapter.validate_json(b)` for a model.",
        "",
        *_table(["row", "median µs", "p99 µs", "reference", "× reference"], rows),
    ]


def _hit_header(header: dict[str, Any]) -> list[str]:
    labels = {
        "floor": "raw floor: `GET` + `orjson.loads` of the bare JSON",
        "memofill-fresh": "memofill, fresh hit (header read, value fresh)",
        "memofill-stale": "memofill, stale hit (`stale_s`, another process refreshing)",
        "memofill-tagged": "memofill, tagged hit (two tags, their marks read with the value)",
    }
    rows = [
        [labels[name], _num(data["median_us"]), _num(data["p99_us"]), _num(data["ratio"], 2)]
        for name, data in header["rows"].items()
    ]
    return [
        "",
        "### Fresh and stale hits (sync)",
        "",
        f"{header['iterations']:,} timed calls per row, interleaved in {header['rounds']} rounds. "
        "memofill's stored value starts with a 42-byte header (when the fetch started, until "
        "when the value is fresh, how long the fetch took); a fresh hit reads it, a stale hit "
        "also finds the value past its freshness and checks whether a refresh is due (here "
        "another process holds the refresh lock, so nothing is handed off).",
        "",
        *_table(["row", "median µs", "p99 µs", "× floor"], rows),
    ]


def _hit(hit: dict[str, Any]) -> list[str]:
    rows = []
    for family in FAMILIES:
        if not any(lib.slug in hit["rows"] for lib in LIBRARIES if lib.family == family):
            continue  # not selected for this run
        cells = [family]
        for is_async in (False, True):
            library = _row(family, is_async)
            data = hit["rows"].get(library.slug) if library else None
            if data is None:
                cells += [NA, NA, NA]
            else:
                digits = 3 if data["ratio"] < 0.1 else 2  # a near hit's ratio needs the third
                cells += [
                    _num(data["median_us"]),
                    _num(data["p99_us"]),
                    _num(data["ratio"], digits),
                ]
        rows.append(cells)
    header = [
        "library",
        "sync median µs",
        "sync p99 µs",
        "sync × floor",
        "asyncio median µs",
        "asyncio p99 µs",
        "asyncio × floor",
    ]
    return [
        "## 1. Hit latency",
        "",
        f"{hit['iterations']:,} timed calls per row after {hit['warmup']:,} warm-up calls, "
        f"interleaved in {hit['rounds']} rounds (new random row order each round). "
        "× floor: the row's median over the floor's median of the same mode, same run.",
        "",
        *_table(header, rows),
    ]


def _median_worst(summary: dict[str, Any], metric: str, digits: int | None = None) -> str:
    pair = summary[metric]
    show = _count if digits is None else (lambda v: _num(v, digits))
    return f"{show(pair['median'])} / {show(pair['worst'])}"


def _stampede(stampede: dict[str, Any]) -> list[str]:
    any_result = next(iter(stampede.values()))
    processes, threads = any_result["processes"], any_result["threads"]
    repeats = len(any_result["runs"])
    rows = []
    outcome_lines = []
    command_lines = []
    for slug, result in stampede.items():
        library = next(lib for lib in LIBRARIES if lib.slug == slug)
        summary = result["summary"]
        rows.append(
            [
                library.label,
                _median_worst(summary, "origin_calls"),
                "yes" if summary["origin_once_every_run"] else "**no**",
                _median_worst(summary, "p50_ms", 0),
                _median_worst(summary, "p99_ms", 0),
                _median_worst(summary, "max_ms", 0),
                _median_worst(summary, "round_trips"),
                _median_worst(summary, "server_commands"),
                _count(
                    summary["errors"]["worst"]
                    + summary["wrong_values"]["worst"]
                    + summary["hung"]["worst"]
                ),
            ]
        )
        sent = result["runs"][-1]["round_trips_by_command"]
        command_lines.append(
            f"- {library.label}: " + ", ".join(f"`{name}` {count}" for name, count in sent.items())
        )
        outcomes = result["runs"][-1]["outcomes"]
        if outcomes:
            text = ", ".join(f"{name} {count}" for name, count in outcomes.items())
            outcome_lines.append(f"- {library.label}: {text}")
    header = [
        "row",
        "origin calls",
        "once every run",
        "caller p50 ms",
        "caller p99 ms",
        "caller max ms",
        "round trips",
        "server commands",
        "errors",
    ]
    return [
        "## 2. Stampede on a cold key",
        "",
        f"{processes} processes × {threads} callers = {processes * threads} callers released "
        f"together; origin {any_result['origin_ms']:.0f} ms; {repeats} runs per row, each on a "
        "new key. Cells: median / worst over the runs.",
        "",
        *_table(header, rows),
        "Round trips by command, last run:",
        "",
        *command_lines,
        "",
        *(
            ["memofill outcomes (one per caller), last run:", "", *outcome_lines, ""]
            if outcome_lines
            else []
        ),
    ]


def _growth(growth: dict[str, Any]) -> list[str]:
    levels = list(next(iter(growth.values()))["levels"])
    processes = next(iter(growth.values()))["processes"]
    repeats = len(next(iter(growth.values()))["levels"][levels[0]]["runs"])
    header = ["row"]
    for level in levels:
        header += [f"{level}: round trips", f"{level}: p99 ms", f"{level}: origin calls"]
    rows = []
    for slug, result in growth.items():
        library = next(lib for lib in LIBRARIES if lib.slug == slug)
        cells = [library.label]
        for level in levels:
            summary = result["levels"][level]["summary"]
            cells += [
                _count(summary["round_trips"]["median"]),
                _num(summary["p99_ms"]["median"], 0),
                _count(summary["origin_calls"]["worst"]),
            ]
        rows.append(cells)
    return [
        "## 3. Growth: 10 → 100 → 1000 callers",
        "",
        f"Callers spread over {processes} processes; {repeats} run(s) per level. Round trips "
        "and p99: median over the runs; origin calls: worst run.",
        "",
        *_table(header, rows),
    ]


def _payload(payload: dict[str, Any]) -> list[str]:
    lines = ["## 4. Large payloads", ""]
    lines.append(
        f"Time: median of {payload['rounds']} fills (cold calls, each on a new key) and "
        f"{payload['rounds'] * payload['hits_per_round']} hits per row, rows interleaved with "
        "the raw references in one process. Raw fill: `orjson.dumps` + `SET`; raw hit: `GET` + "
        "`orjson.loads`. Peak: growth of the peak resident set over the resident set just "
        "before the one large call, in a fresh process per figure, as a multiple of the "
        "payload's size (a hit's peak includes the decoded value itself)."
    )
    lines.append("")
    held = []
    for size, data in payload["sizes"].items():
        megabytes = data["payload_bytes"] / 1e6
        raw_memory = data["rows"]["raw-sync"]["memory"]
        held.append(
            f"{megabytes:.1f} MB: "
            f"{raw_memory['hit']['held_kb'] * 1024 / data['payload_bytes']:.1f} ×"
        )
        rows = []
        for entry, row in data["rows"].items():
            label = RAW_LABELS.get(entry) or next(
                lib.label for lib in LIBRARIES if lib.slug == entry
            )
            rows.append(
                [
                    label,
                    _num(row["fill_ms"]),
                    _num(row["fill_ratio"], 2),
                    _num(row["hit_ms"]),
                    _num(row["hit_ratio"], 2),
                    _num(row["fill_peak_x"], 1),
                    _num(row["hit_peak_x"], 1),
                ]
            )
        header = [
            "row",
            "fill ms",
            "fill × raw",
            "hit ms",
            "hit × raw",
            "fill peak × payload",
            "hit peak × payload",
        ]
        lines += [
            f"### {megabytes:.1f} MB payload ({data['payload_bytes']:,} bytes, "
            f"requested {int(size):,})",
            "",
            *_table(header, rows),
        ]
    lines += [
        "The value is a list of dicts, each with a 160-character text. What a raw hit leaves "
        "resident, the decoded value, is already several times the payload ("
        + ", ".join(held)
        + "): a floor under every hit's peak. redis-py with hiredis packs "
        "a `SET` into one buffer (`hiredis.pack_command`), so even the raw fill peaks well "
        "above the payload. Each row's × raw is against the raw reference of its own mode.",
        "",
    ]
    return lines


def _per_expiry(runs: list[list[int]]) -> str:
    """Origin calls per expiry, each run: ``1,1,1 / 1,2,1``."""
    return " / ".join(",".join(map(str, run)) for run in runs)


def _expiry(results: dict[str, Any]) -> list[str]:
    done = {slug: result for slug, result in results.items() if "failed" not in result}
    failed = [
        f"- {BY_SLUG[slug].label}: could not run ({result['failed']})"
        for slug, result in results.items()
        if "failed" in result
    ]
    any_result = next(iter(done.values()), None)
    lines = ["## 5. Expiry under load", ""]
    if any_result is None:
        return [*lines, *failed, ""]
    repeats = len(any_result["runs"])
    lines += [
        f"{any_result['processes']} processes × {any_result['callers']} callers call one key, "
        f"each pausing {expiry.PAUSE_S[0] * 1000:.0f}–{expiry.PAUSE_S[1] * 1000:.0f} ms between "
        f"calls; origin {any_result['origin_ms']:.0f} ms; a warm fill, then callers run until "
        f"{expiry.EXPIRIES} expiries have passed; {repeats} run(s) per row, each on a new key "
        "and a `redis-server` of the row's own. *At expiry*: calls that started while a "
        "refresh (or the fill after a miss) was calling the origin; *hit p99*: every other "
        f"call of the same run. *Slow*: calls over {expiry.SLOW_MS:.0f} ms, worst run. *Oldest "
        "past freshness*: the largest age of a value served (from the start of the origin call "
        "that made it) minus the row's freshness, over all runs. *Extra round trips*: requests "
        "beyond each call's own read, per expiry, median run; *lock attempts*: `SET ... NX` "
        "requests per expiry, median run.",
        "",
    ]
    header = [
        "row",
        "fresh / stale s",
        "origin calls per expiry, each run",
        "one per expiry",
        "slow calls",
        "at expiry p50 / p99 ms",
        "hit p99 ms",
        "oldest past freshness ms",
        "extra round trips per expiry",
        "lock attempts per expiry",
        "errors",
    ]
    rows, commands, outcomes = [], [], []
    for slug, result in done.items():
        library, summary = BY_SLUG[slug], result["summary"]
        if slug.startswith("memofill-early"):
            continue
        stale = "–" if slug.startswith("memofill-ttl") else f"{STALE_S:g}"
        rows.append(
            [
                library.label,
                f"{result['fresh_s']:g} / {stale}",
                _per_expiry(summary["origin_per_expiry"]),
                "yes" if summary["origin_once_every_expiry"] else "**no**",
                _count(summary["slow_calls"]),
                f"{_num(summary['at_expiry_p50_ms'])} / {_num(summary['at_expiry_p99_ms'])}",
                _num(summary["hit_p99_ms"]),
                _num(summary["oldest_past_fresh_ms"], 0),
                _num(summary["extra_round_trips_per_expiry"]),
                _num(summary["lock_attempts_per_expiry"]),
                _count(summary["errors"]),
            ]
        )
    early_rows = []
    for slug, result in done.items():
        library, summary = BY_SLUG[slug], result["summary"]
        last = result["runs"][-1]
        commands.append(
            f"- {library.label}: "
            + ", ".join(
                f"`{name}` {count}" for name, count in last["round_trips_by_command"].items()
            )
        )
        if last["outcomes"]:
            text = ", ".join(f"{name} {count}" for name, count in last["outcomes"].items())
            outcomes.append(f"- {library.label}: {text}")
        if slug.startswith("memofill-early"):
            early_rows.append(
                [
                    library.label,
                    f"{result['fresh_s']:g} s",
                    _count(summary["expiries"]),
                    f"{summary['early_share'] * 100:.0f} %",
                    _num(summary["lock_attempts_mean"]),
                    _per_expiry(summary["origin_per_expiry"]),
                    _count(summary["slow_calls"]),
                    _count(summary["errors"]),
                ]
            )
    lines += _table(header, rows)
    if early_rows:
        lines += [
            "Early refresh: the same load on a key fresh for longer (at these read rates the "
            "XFetch rule's lead time, δβ(ln(rδβ) + 0.577), is about 1.2 s). *Refreshed early*: "
            "cycles whose origin call started before the previous value's freshness ran out; "
            "*lock attempts*: `SET ... NX` requests per cycle over all runs.",
            "",
            *_table(
                [
                    "row",
                    "fresh",
                    "cycles",
                    "refreshed early",
                    "lock attempts per cycle",
                    "origin calls per cycle, each run",
                    "slow calls",
                    "errors",
                ],
                early_rows,
            ),
        ]
    lines += ["Round trips by command, last run:", "", *commands, ""]
    if outcomes:
        lines += ["memofill outcomes, last run:", "", *outcomes, ""]
    if failed:
        lines += [*failed, ""]
    return lines


def _expiry_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for slug, result in results.items():
        if "failed" in result or not slug.startswith(("memofill-stale", "memofill-early")):
            continue
        mode = BY_SLUG[slug].mode
        summary = result["summary"]
        if slug.startswith("memofill-early"):
            share = summary["early_share"]
            checks.append(
                {
                    "target": f"≥ 99 % of cycles refreshed early, β = 1 ({mode})",
                    "measured": f"{share * 100:.0f} % of {summary['expiries']} cycles",
                    "ok": share >= 0.99,
                }
            )
            attempts = summary["lock_attempts_mean"]
            checks.append(
                {
                    "target": f"≤ 3.2 lock attempts per cycle, β = 1 ({mode})",
                    "measured": f"{attempts:.1f}",
                    "ok": attempts <= 3.2,
                }
            )
            continue
        limit = result["processes"] + 2
        over = summary["p99_over_hit_ms"]
        checks += [
            {
                "target": f"0 calls > 100 ms across expiries, stale_s ({mode})",
                "measured": f"{summary['slow_calls']} (worst run)",
                "ok": summary["slow_calls"] == 0,
            },
            {
                "target": f"1 origin call per expiry in every run, stale_s ({mode})",
                "measured": _per_expiry(summary["origin_per_expiry"]),
                "ok": summary["origin_once_every_expiry"],
            },
            {
                "target": f"p99 at expiry ≤ hit p99 + 1 ms ({mode})",
                "measured": f"{over:+.1f} ms (worst run)",
                "ok": over <= 1.0,
            },
            {
                "target": f"no value served past freshness + stale_s ({mode})",
                "measured": f"{summary['oldest_past_fresh_ms']:.0f} ms past freshness "
                f"(stale_s {STALE_S * 1000:.0f} ms)",
                "ok": summary["oldest_past_fresh_ms"] <= STALE_S * 1000,
            },
            {
                "target": f"extra round trips per refresh ≤ processes + 2 = {limit} ({mode})",
                "measured": f"{summary['extra_round_trips_worst']:.1f} (worst run)",
                "ok": summary["extra_round_trips_worst"] <= limit,
            },
        ]
    return checks


def _check(ok: bool | None) -> str:
    return NA if ok is None else ("met" if ok else "**missed**")


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """memofill's promises checked against this run: what was measured, and whether it holds."""
    checks: list[dict[str, Any]] = []
    hit = results.get("hit")
    stampede = results.get("stampede")
    payload = results.get("payload")
    for slug, mode in (("memofill-near-sync", "sync"), ("memofill-near-async", "asyncio")):
        if hit and slug in hit["rows"]:
            ratio = hit["rows"][slug]["ratio"]
            checks.append(
                {
                    "target": f"near hit ≤ 0.02 × floor ({mode})",
                    "measured": f"{ratio:.3f} ×",
                    "ok": ratio <= 0.02,
                }
            )
    lag = results.get("near")
    for key, label, most in (("idle", "idle", 2.0), ("busy", "with a CPU-bound thread", 20.0)):
        if lag:
            p99 = lag[key]["p99_ms"]
            checks.append(
                {
                    "target": f"near invalidation lag p99 ≤ {most:g} ms ({label})",
                    "measured": f"{p99:.2f} ms",
                    "ok": p99 <= most,
                }
            )
    if hit and "memofill-exported" in hit["rows"]:
        ratio = hit["rows"]["memofill-exported"]["ratio"]
        checks.append(
            {
                "target": "hit ≤ 1.05 × floor (sync, both exporters scraped)",
                "measured": f"{ratio:.2f} ×",
                "ok": ratio <= 1.05,
            }
        )
    if "miss_cost" in results:
        extra = results["miss_cost"]["rows"]["core + hook"]["extra_us"]
        checks.append(
            {
                "target": f"metrics' extra per miss ≤ {miss_cost.TARGET_US:.0f} µs (core + hook)",
                "measured": f"{extra:.1f} µs",
                "ok": extra <= miss_cost.TARGET_US,
            }
        )
    for slug, mode in (("memofill-sync", "sync"), ("memofill-async", "asyncio")):
        if hit and slug in hit["rows"]:
            ratio = hit["rows"][slug]["ratio"]
            checks.append(
                {
                    "target": f"hit ≤ 1.05 × floor ({mode})",
                    "measured": f"{ratio:.2f} ×",
                    "ok": ratio <= 1.05,
                }
            )
        if stampede and slug in stampede:
            result = stampede[slug]
            summary = result["summary"]
            calls = summary["origin_calls_per_run"]
            checks.append(
                {
                    "target": f"origin called once in every stampede run ({mode})",
                    "measured": ", ".join(map(str, calls)),
                    "ok": summary["origin_once_every_run"],
                }
            )
            callers = result["processes"] * result["threads"]
            worst = summary["round_trips"]["worst"]
            checks.append(
                {
                    "target": f"≤ 150 round trips per 100-caller stampede ({mode})",
                    "measured": f"{worst:.0f} (worst run, {callers} callers)",
                    "ok": worst <= 150 if callers == 100 else None,
                }
            )
            limit = result["origin_ms"] + 25
            p99 = summary["p99_ms"]
            checks.append(
                {
                    "target": f"caller p99 ≤ origin + 25 ms = {limit:.0f} ms ({mode})",
                    "measured": (
                        f"{p99['median']:.0f} ms median run, {p99['worst']:.0f} ms worst run"
                    ),
                    "ok": p99["median"] <= limit,
                }
            )
        if payload:
            for data in payload["sizes"].values():
                row = data["rows"].get(slug)
                if row is None:
                    continue
                size = f"{data['payload_bytes'] / 1e6:.1f} MB, {mode}"
                checks.append(
                    {
                        "target": f"fill ≤ 1.2 × raw ({size})",
                        "measured": f"{row['fill_ratio']:.2f} ×",
                        "ok": row["fill_ratio"] <= 1.2,
                    }
                )
                checks.append(
                    {
                        "target": f"hit ≤ 1.1 × raw ({size})",
                        "measured": f"{row['hit_ratio']:.2f} ×",
                        "ok": row["hit_ratio"] <= 1.1,
                    }
                )
                peak = max(row["fill_peak_x"], row["hit_peak_x"])
                raw = data["rows"]["raw-async" if slug.endswith("async") else "raw-sync"]
                checks.append(
                    {
                        "target": f"peak RSS ≤ 3 × payload ({size})",
                        "measured": (
                            f"fill {row['fill_peak_x']:.1f} ×, hit {row['hit_peak_x']:.1f} × "
                            f"(raw: {raw['fill_peak_x']:.1f} ×, {raw['hit_peak_x']:.1f} ×)"
                        ),
                        "ok": peak <= 3,
                    }
                )
    header = results.get("hit_header")
    if header:
        limits = (("memofill-fresh", 1.05), ("memofill-stale", 1.1), ("memofill-tagged", 1.1))
        for name, limit in limits:
            if name not in header["rows"]:
                continue
            ratio = header["rows"][name]["ratio"]
            kind = name.removeprefix("memofill-")
            checks.append(
                {
                    "target": f"{kind} hit with the header ≤ {limit:g} × floor (sync)",
                    "measured": f"{ratio:.2f} ×",
                    "ok": ratio <= limit,
                }
            )
    if results.get("expiry"):
        checks += _expiry_targets(results["expiry"])
    data = results.get("registry")
    if data and data["datasets"] >= 5_000:
        for step, limit_s in (("load", 0.5), ("generate", 2.0)):
            cpu = statistics.median(cpu for _, cpu in data["seconds"][step])
            checks.append(
                {
                    "target": f"{step} {data['datasets']:,} datasets < {limit_s:g} s (CPU)",
                    "measured": f"{cpu:.2f} s",
                    "ok": cpu < limit_s,
                }
            )
    return checks


def _notes(results: dict[str, Any]) -> list[str]:
    used = set(results["meta"]["libraries"])
    lines = ["## Notes", ""]
    if any(name in results for name in ("hit", "stampede", "growth", "payload")):
        lines += [
            "How each row is configured (same server, same client options: "
            "redis-py with RESP3 and the hiredis parser; values kept 60 s):",
            "",
        ]
        lines += [
            f"- **{library.label}**: {library.setup}"
            for library in LIBRARIES
            if library.slug in used or not library.fills
        ]
    if results.get("expiry"):
        lines += [
            "",
            "Expiry rows (section 5), each on a `redis-server` of its own, same client options:",
            "",
        ]
        lines += [
            f"- **{BY_SLUG[slug].label}**: {BY_SLUG[slug].setup}" for slug in results["expiry"]
        ]
    lines += [
        "",
        "- *n/a*: dogpile.cache has no asyncio API; cashews and aiocache have no blocking API; "
        "the raw floor does not fill, so it has no stampede or payload rows.",
        "- *Round trips* are counted in each worker process: every request redis-py writes to "
        "a socket, so a Lua script or a pipeline is one round trip. *Server commands* come "
        "from `INFO commandstats` before and after each run and also count the commands a Lua "
        "script runs inside Redis (a token-safe release adds `EVALSHA` plus its `GET`, `DEL`...).",
        "- Both counts leave out connection set-up and the harness's own commands: `HELLO`, "
        "`CLIENT`, `AUTH`, `SELECT`, `INFO`, `CONFIG`, `COMMAND`, and the origin's `INCR`. "
        "`PING` is kept, because cashews sends one after every failed lock attempt; on the "
        "client side redis-py's own health-check `PING`s are told apart and left out.",
        "- Each worker warms up before every run (one fill on a key of its own, then as many "
        "concurrent hits as it has callers), so connections and scripts are in place.",
        "- Latencies use `time.perf_counter_ns`; a caller's latency runs from its call to its "
        "return. Stampede workers are separate processes started with `spawn`, released "
        "together by a `multiprocessing.Barrier`; callers within a worker are threads "
        "(asyncio tasks for asyncio rows).",
    ]
    return [*lines, ""]


def render(results: dict[str, Any]) -> str:
    """The whole markdown document for one run."""
    meta = results["meta"]
    lines = [
        "# memofill benchmarks",
        "",
        "Reproduce from the repository root:",
        "",
        "```sh",
        meta["command"],
        "```",
        "",
        f"Measured {meta['date']} on {meta['cpus']} CPUs ({meta['platform']}), Python "
        f"{meta['python']}, redis-server {meta['redis_server']}; load average "
        f"{meta['load_before']} before, {meta['load_after']} after. Versions: "
        + ", ".join(f"{name} {version}" for name, version in meta["versions"].items())
        + f". Commit {meta['commit']}.",
        "",
    ]
    if meta.get("quick"):
        lines += ["**Quick smoke run** (`--quick`): small scale, not for publication.", ""]
    checks = targets(results)
    if checks:
        lines += ["## memofill against its targets", ""]
        lines += _table(
            ["target", "this run", "verdict"],
            ([c["target"], c["measured"], _check(c["ok"])] for c in checks),
            "llc",
        )
    if "hit" in results:
        lines += _hit(results["hit"])
    if "hit_header" in results:
        lines += _hit_header(results["hit_header"])
    if "hit_typed" in results:
        lines += _hit_typed(results["hit_typed"])
    if "near_peers" in results:
        lines += near_peers.render(results["near_peers"])
    if "near" in results:
        lines += near.render(results["near"])
    if "miss_cost" in results:
        lines += miss_cost.render(results["miss_cost"])
    if "fill" in results:
        lines += fill.render(results["fill"])
    if "many" in results:
        lines += many.render(results["many"])
    if "stampede" in results:
        lines += _stampede(results["stampede"])
    if "growth" in results:
        lines += _growth(results["growth"])
    if "payload" in results:
        lines += _payload(results["payload"])
    if "expiry" in results:
        lines += _expiry(results["expiry"])
    if "registry" in results:
        data = results["registry"]
        lines += [
            "",
            "## A large registry: generate and load",
            "",
            "No Redis: `memofill gen` of a registry shaped like a real one, run as the command "
            "(`python -m memofill gen`, so the interpreter's start-up is included, and shown "
            "on its own row), and loading (validating) the module it wrote, as every process "
            "does at start-up. On a busy machine the CPU time is the steadier figure.",
            "",
            registry.render(data["datasets"], data["seconds"]),
            "",
        ]
    lines += _notes(results)
    return "\n".join(lines).rstrip() + "\n"
