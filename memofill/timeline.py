"""A stampede trace drawn as an SVG timeline: one row per caller, a bar per call, by outcome.

Pure standard library: nothing in the library imports this module; the
command line uses it to draw ``memofill demo --trace``, and the docs use it for
their picture of a real stampede. The trace is plain JSON data::

    {
      "origin_ms": 200,          # how long one upstream call takes
      "origin_calls": 1,         # how many upstream calls the stampede made
      "landed_ms": 203.0,        # optional: when the value reached Redis
      "callers": [
        {"proc": 0, "thread": 3, "start_ms": 0.4, "end_ms": 203.1,
         "outcome": "leader_fill", "led": true},
        ...
      ]
    }

Times are milliseconds relative to the moment every caller was released at
once. Without ``landed_ms``, the value is taken to have landed when the first
leader's call ended.

A caller may make several calls: records with the same ``proc`` and ``thread``
share one row, a bar each. That is how a hot key's expiry is drawn: each caller
calls again and again, and ``0`` is the moment the value went stale. Such a
trace says so in three optional strings: ``title`` (instead of the counts of
callers and origin calls), ``description`` (what the picture shows, for screen
readers) and ``axis_label`` (what the times are counted from).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple
from xml.sax.saxutils import escape, quoteattr

__all__ = ["OUTCOME_COLOURS", "render_svg"]

#: Bar colour per outcome, in legend order; Okabe-Ito and Tol colours, told apart when colour-blind.
OUTCOME_COLOURS: dict[str, str] = {
    "leader_fill": "#D55E00",
    "leader_recheck_hit": "#E69F00",
    "follower_hit": "#0072B2",
    "local_join": "#56B4E9",
    "follower_timeout": "#CC79A7",
    "lock_error": "#332288",
    "fetch_error": "#882255",
    "negative": "#009E73",
    "legacy": "#999933",
    "hit": "#AAAAAA",
    "fallback_hit": "#DDCC77",
    "stale_hit": "#44AA99",
    "stale_on_error": "#661100",
    "refresh_fill": "#117733",
    "refresh_recheck_hit": "#88CCEE",
    "refresh_error": "#AA4499",
}
_OTHER_COLOUR = "#666666"

_WIDTH = 960
_LEFT = 96  # room for the process and thread labels
_RIGHT = 24
_TOP = 64  # title and subtitle
_LEGEND_ROW = 20
_AXIS = 40  # tick labels and the axis title
_GROUP_GAP = 6
_FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"


class _Caller(NamedTuple):
    proc: int
    thread: int
    start_ms: float
    end_ms: float
    outcome: str
    led: bool


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"trace: {name} must be a finite number, not {value!r}")
    return float(value)


def _callers(trace: Mapping[str, Any]) -> list[_Caller]:
    raw = trace.get("callers")
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise ValueError("trace: 'callers' must be a list of caller records")
    callers = []
    for index, caller in enumerate(raw):
        if not isinstance(caller, Mapping):
            raise ValueError(f"trace: callers[{index}] must be an object")
        start = _number(caller.get("start_ms"), f"callers[{index}].start_ms")
        end = _number(caller.get("end_ms"), f"callers[{index}].end_ms")
        callers.append(
            _Caller(
                proc=int(_number(caller.get("proc", 0), f"callers[{index}].proc")),
                thread=int(_number(caller.get("thread", index), f"callers[{index}].thread")),
                start_ms=start,
                end_ms=max(start, end),
                outcome=str(caller.get("outcome", "unknown")),
                led=bool(caller.get("led", False)),
            )
        )
    callers.sort(key=lambda c: (c.proc, c.thread, c.start_ms))
    return callers


def _tick_step(span_ms: float) -> float:
    """A 1-2-5 step that puts about six ticks on the axis."""
    raw = span_ms / 6
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return float(factor * magnitude)
    return float(10 * magnitude)  # pragma: no cover - the loop always returns


def _fmt(value: float) -> str:
    """Coordinates with at most one decimal, so the same trace always gives the same bytes."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _landed_ms(trace: Mapping[str, Any], callers: list[_Caller]) -> float | None:
    if trace.get("landed_ms") is not None:
        return _number(trace["landed_ms"], "landed_ms")
    ends = [c.end_ms for c in callers if c.led and c.outcome == "leader_fill"]
    return min(ends) if ends else None


def render_svg(trace: Mapping[str, Any]) -> str:
    """Draw a stampede trace (see the module docstring) as a self-contained SVG document.

    One row per caller, grouped by process; a bar from each caller's start to
    its end, coloured by outcome (:data:`OUTCOME_COLOURS`), outlined when the
    caller led a fill; a dashed line where the value landed; an axis in
    milliseconds; a legend of the outcomes present; and a title with the number
    of callers and of origin calls. The same trace always renders to the same
    text.

    Args:
        trace: The trace as plain data (``json.load`` of a trace file).

    Returns:
        The SVG document, starting with ``<svg``.

    Raises:
        ValueError: The trace has no ``callers`` list, or a caller's times are
            not finite numbers.
    """
    callers = _callers(trace)
    chart = _Chart(callers, _landed_ms(trace, callers))
    counts: dict[str, int] = {}
    for caller in callers:
        counts[caller.outcome] = counts.get(caller.outcome, 0) + 1
    legend = [name for name in OUTCOME_COLOURS if name in counts]
    legend += sorted(name for name in counts if name not in OUTCOME_COLOURS)

    processes = chart.processes
    noun = "process" if len(processes) == 1 else "processes"
    title = f"{chart.rows} callers in {len(processes)} {noun}"
    origin_calls = trace.get("origin_calls")
    if origin_calls is not None:
        title += f", {origin_calls} origin call{'' if origin_calls == 1 else 's'}"
    title = str(trace.get("title") or title)
    description = str(trace.get("description") or "Timeline of a cache stampede")
    axis_label = str(trace.get("axis_label") or "ms after every caller was released at once")
    subtitle = ", ".join(f"{counts[name]} {name}" for name in legend)
    if trace.get("origin_ms") is not None:
        origin_ms = _number(trace["origin_ms"], "origin_ms")
        subtitle = f"the origin takes {_fmt(origin_ms)} ms; " + subtitle

    height = _fmt(chart.height)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" font-family={quoteattr(_FONT)} font-size="12" '
        'role="img" aria-labelledby="title desc">',
        f'<title id="title">{escape(title)}</title>',
        f'<desc id="desc">{escape(description + ": " + subtitle)}</desc>',
        f'<rect width="{_WIDTH}" height="{height}" fill="#ffffff"/>',
        f'<text x="{_LEFT}" y="24" font-size="16" font-weight="bold" fill="#222222">'
        f"{escape(title)}</text>",
        f'<text x="{_LEFT}" y="44" fill="#555555">{escape(subtitle)}</text>',
    ]
    out += _legend(legend, any(c.led for c in callers))
    out += chart.backgrounds()
    out += chart.grid(axis_label)
    out += chart.bars()
    out += chart.markers()
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _legend(names: list[str], any_led: bool) -> list[str]:
    out = ['<g class="legend">']
    x, y = float(_LEFT), _TOP + 4
    for name in names:
        colour = OUTCOME_COLOURS.get(name, _OTHER_COLOUR)
        out.append(
            f'<g class="legend-entry" data-outcome={quoteattr(name)}>'
            f'<rect x="{_fmt(x)}" y="{y}" width="12" height="12" fill="{colour}"/>'
            f'<text x="{_fmt(x + 16)}" y="{y + 10}" fill="#222222">{escape(name)}</text></g>'
        )
        x += 16 + 7.2 * len(name) + 20
    if any_led:
        out.append(
            f'<g class="legend-led"><rect x="{_fmt(x)}" y="{y}" width="12" height="12" '
            'fill="#ffffff" stroke="#000000" stroke-width="1.5"/>'
            f'<text x="{_fmt(x + 16)}" y="{y + 10}" fill="#222222">outline: led a fill</text></g>'
        )
    out.append("</g>")
    return out


class _Chart:
    """Where everything goes: rows grouped by process, and the ms-to-x scale."""

    def __init__(self, callers: list[_Caller], landed: float | None) -> None:
        self.callers = callers
        self.landed = landed
        self.processes = sorted({c.proc for c in callers})
        #: Rows: one per caller (process and thread), whatever the number of its calls.
        self.rows = len({(c.proc, c.thread) for c in callers})
        self.row = 14.0 if self.rows <= 48 else max(4.0, 672 / self.rows)
        self.bar = max(2.0, self.row * 0.7)
        self.top = float(_TOP + _LEGEND_ROW + 12)
        gaps = _GROUP_GAP * max(0, len(self.processes) - 1)
        self.bottom = self.top + self.row * self.rows + gaps
        self.height = self.bottom + _AXIS + 8
        self.width = float(_WIDTH - _LEFT - _RIGHT)
        end = max([c.end_ms for c in callers] + [landed or 0.0, 1.0])
        self.step = _tick_step(end)
        self.end = math.ceil(end / self.step) * self.step
        self.start = min([0.0] + [c.start_ms for c in callers])

    def x(self, ms: float) -> float:
        return _LEFT + (ms - self.start) / (self.end - self.start) * self.width

    def groups(self) -> list[tuple[int, float, list[list[_Caller]]]]:
        """``(proc, top y, rows)`` per process, top to bottom; a row holds one thread's calls."""
        groups, y = [], self.top
        for proc in self.processes:
            threads: dict[int, list[_Caller]] = {}
            for caller in self.callers:
                if caller.proc == proc:
                    threads.setdefault(caller.thread, []).append(caller)
            rows = [threads[thread] for thread in sorted(threads)]
            groups.append((proc, y, rows))
            y += self.row * len(rows) + _GROUP_GAP
        return groups

    def backgrounds(self) -> list[str]:
        out = ['<g class="processes">']
        for index, (proc, y, rows) in enumerate(self.groups()):
            shade = "#f2f2f2" if index % 2 == 0 else "#fafafa"
            out.append(
                f'<rect x="0" y="{_fmt(y)}" width="{_WIDTH}" '
                f'height="{_fmt(self.row * len(rows))}" fill="{shade}"/>'
                f'<text x="8" y="{_fmt(y + min(self.row, 14) - 3)}" font-weight="bold" '
                f'fill="#222222">process {proc}</text>'
            )
            if self.row * len(rows) >= 32:
                noun = "caller" if len(rows) == 1 else "callers"
                out.append(
                    f'<text x="8" y="{_fmt(y + min(self.row, 14) + 11)}" fill="#777777">'
                    f"{len(rows)} {noun}</text>"
                )
        out.append("</g>")
        return out

    def grid(self, axis_label: str) -> list[str]:
        ticks, value = [], math.floor(self.start / self.step) * self.step
        while value <= self.end + self.step / 1000:
            if value >= self.start:
                ticks.append(value)
            value += self.step
        out = ['<g class="grid" stroke="#d0d0d0">']
        for tick in ticks:
            x = _fmt(self.x(tick))
            out.append(f'<line x1="{x}" y1="{_fmt(self.top)}" x2="{x}" y2="{_fmt(self.bottom)}"/>')
        out.append("</g>")
        out.append('<g class="axis" fill="#555555" text-anchor="middle">')
        for tick in ticks:
            out.append(
                f'<text x="{_fmt(self.x(tick))}" y="{_fmt(self.bottom + 16)}">{_fmt(tick)}</text>'
            )
        out.append(
            f'<text x="{_fmt(_LEFT + self.width / 2)}" y="{_fmt(self.bottom + 34)}">'
            f"{escape(axis_label)}</text>"
        )
        out.append("</g>")
        return out

    def bars(self) -> list[str]:
        out = []
        for proc, y, rows in self.groups():
            out.append(f'<g class="process" data-proc="{proc}">')
            for position, calls in enumerate(rows):
                top = y + position * self.row + (self.row - self.bar) / 2
                if self.row >= 10:
                    out.append(
                        f'<text x="{_LEFT - 6}" y="{_fmt(top + self.bar - 1)}" '
                        f'font-size="{_fmt(self.bar)}" text-anchor="end" fill="#777777">'
                        f"t{calls[0].thread}</text>"
                    )
                out += [self._bar(proc, caller, top) for caller in calls]
            out.append("</g>")
        return out

    def _bar(self, proc: int, caller: _Caller, top: float) -> str:
        colour = OUTCOME_COLOURS.get(caller.outcome, _OTHER_COLOUR)
        left = self.x(caller.start_ms)
        width = max(1.0, self.x(caller.end_ms) - left)
        outline = ' stroke="#000000" stroke-width="1.5"' if caller.led else ""
        tip = (
            f"process {proc} thread {caller.thread}: {caller.outcome}"
            f"{' (led)' if caller.led else ''}, "
            f"{_fmt(caller.start_ms)} to {_fmt(caller.end_ms)} ms"
        )
        return (
            f'<rect class="bar" data-outcome={quoteattr(caller.outcome)} '
            f'x="{_fmt(left)}" y="{_fmt(top)}" width="{_fmt(width)}" '
            f'height="{_fmt(self.bar)}" fill="{colour}"{outline}>'
            f"<title>{escape(tip)}</title></rect>"
        )

    def markers(self) -> list[str]:
        """The release moment (0 ms) and, dashed, the moment the value landed."""
        top, bottom = _fmt(self.top - 4), _fmt(self.bottom)
        x0 = _fmt(self.x(0))
        out = [f'<line x1="{x0}" y1="{top}" x2="{x0}" y2="{bottom}" stroke="#222222"/>']
        if self.landed is not None:
            x = self.x(self.landed)
            label = f"value landed at {_fmt(self.landed)} ms"
            end = x > _LEFT + self.width * 0.75
            anchor = "end" if end else "start"
            out.append(
                f'<g class="landed"><line x1="{_fmt(x)}" y1="{top}" x2="{_fmt(x)}" y2="{bottom}" '
                'stroke="#222222" stroke-width="1.5" stroke-dasharray="5 3"/>'
                f'<text x="{_fmt(x - 4 if end else x + 4)}" y="{_fmt(self.top - 6)}" '
                f'text-anchor="{anchor}" fill="#222222">{escape(label)}</text></g>'
            )
        return out
