"""The stampede timeline: a well-formed SVG with one bar per caller, a legend and a title."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from memofill.timeline import OUTCOME_COLOURS, render_svg

SVG = "{http://www.w3.org/2000/svg}"
TRACE_FILE = Path(__file__).resolve().parent.parent / "docs" / "_static" / "stampede-trace.json"


def trace() -> dict[str, Any]:
    """Two processes of three threads: one leader, its local joiners, a follower and its joiners."""
    rows = [
        (0, 0, 0.4, 203.1, "leader_fill", True),
        (0, 1, 0.6, 203.4, "local_join", False),
        (0, 2, 0.9, 203.5, "local_join", False),
        (1, 0, 0.5, 205.0, "follower_hit", False),
        (1, 1, 0.7, 205.2, "local_join", False),
        (1, 2, 1.1, 3200.0, "follower_timeout", True),
    ]
    names = ("proc", "thread", "start_ms", "end_ms", "outcome", "led")
    callers = [dict(zip(names, row, strict=True)) for row in rows]
    return {"origin_ms": 200, "origin_calls": 2, "callers": callers}


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # our own output, not untrusted input


def bars(root: ET.Element) -> list[ET.Element]:
    return [r for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]


def legend(root: ET.Element) -> list[str]:
    return [
        g.get("data-outcome", "") for g in root.iter(f"{SVG}g") if g.get("class") == "legend-entry"
    ]


def texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def test_it_is_well_formed_svg() -> None:
    root = parse(render_svg(trace()))
    assert root.tag == f"{SVG}svg"
    assert float(root.get("width", "0")) > 0
    assert float(root.get("height", "0")) > 0


def test_one_bar_per_caller_coloured_by_outcome() -> None:
    data = trace()
    found = bars(parse(render_svg(data)))
    assert len(found) == len(data["callers"])
    assert sorted(b.get("data-outcome", "") for b in found) == sorted(
        c["outcome"] for c in data["callers"]
    )
    for bar in found:
        assert bar.get("fill") == OUTCOME_COLOURS[bar.get("data-outcome", "")]


def test_callers_that_led_are_outlined() -> None:
    found = bars(parse(render_svg(trace())))
    led = [b.get("data-outcome", "") for b in found if b.get("stroke")]
    assert sorted(led) == ["follower_timeout", "leader_fill"]


def test_bars_run_from_start_to_end_on_one_scale() -> None:
    found = {b.get("data-outcome"): b for b in bars(parse(render_svg(trace())))}
    leader, timeout = found["leader_fill"], found["follower_timeout"]
    assert float(leader.get("width", "0")) < float(timeout.get("width", "0"))
    ratio = float(timeout.get("width", "0")) / float(leader.get("width", "0"))
    assert ratio == pytest.approx((3200.0 - 1.1) / (203.1 - 0.4), rel=0.01)


def test_the_legend_lists_every_outcome_present_and_no_other() -> None:
    root = parse(render_svg(trace()))
    assert legend(root) == ["leader_fill", "follower_hit", "local_join", "follower_timeout"]
    assert any("led a fill" in text for text in texts(root))


def test_an_outcome_outside_the_vocabulary_still_gets_a_bar_and_a_legend_entry() -> None:
    data = trace()
    data["callers"][2]["outcome"] = "something_new"
    root = parse(render_svg(data))
    assert len(bars(root)) == len(data["callers"])
    assert legend(root)[-1] == "something_new"


def test_the_title_counts_callers_processes_and_origin_calls() -> None:
    root = parse(render_svg(trace()))
    title = root.find(f"{SVG}title")
    assert title is not None
    assert title.text == "6 callers in 2 processes, 2 origin calls"
    assert "6 callers in 2 processes, 2 origin calls" in texts(root)


def test_a_line_marks_the_moment_the_value_landed() -> None:
    root = parse(render_svg(trace()))
    assert "value landed at 203.1 ms" in texts(root)
    data = trace()
    data["landed_ms"] = 202.5
    assert "value landed at 202.5 ms" in texts(parse(render_svg(data)))


def test_the_axis_is_in_milliseconds() -> None:
    labels = texts(parse(render_svg(trace())))
    assert "0" in labels
    assert any("ms after" in label for label in labels)


def test_the_same_trace_gives_the_same_bytes_whatever_the_caller_order() -> None:
    data = trace()
    shuffled = copy.deepcopy(data)
    shuffled["callers"].reverse()
    assert render_svg(data) == render_svg(data) == render_svg(shuffled)


def test_text_is_escaped() -> None:
    data = trace()
    data["callers"][0]["outcome"] = '<&">'
    root = parse(render_svg(data))
    assert '<&">' in texts(root)


def test_many_callers_still_fit() -> None:
    joiner = {"start_ms": 0.0, "end_ms": 210.0, "outcome": "local_join", "led": False}
    callers = [{"proc": p, "thread": t, **joiner} for p in range(4) for t in range(25)]
    root = parse(render_svg({"origin_ms": 200, "origin_calls": 1, "callers": callers}))
    assert len(bars(root)) == 100
    assert float(root.get("height", "0")) < 1000


def expiry_trace() -> dict[str, Any]:
    """One process, two callers calling again and again while one refresh runs in a third row."""
    calls: list[dict[str, Any]] = [
        {"proc": 0, "thread": t, "start_ms": start, "end_ms": start + 0.5, "outcome": outcome}
        for t in (0, 1)
        for start, outcome in ((-30.0, "hit"), (5.0, "stale_hit"), (120.0, "stale_hit"))
    ]
    refresh: dict[str, Any] = {
        "start_ms": 5.2,
        "end_ms": 205.0,
        "outcome": "refresh_fill",
        "led": True,
    }
    calls.append({"proc": 0, "thread": 2, **refresh})
    return {
        "origin_ms": 200,
        "origin_calls": 1,
        "landed_ms": 205.0,
        "callers": calls,
        "title": "Two callers at an expiry, one refresh",
        "description": "Timeline of an expiry",
        "axis_label": "ms after the value went stale",
    }


def test_the_calls_of_one_caller_share_its_row() -> None:
    root = parse(render_svg(expiry_trace()))
    found = bars(root)
    assert len(found) == 7
    rows = {b.get("y") for b in found}
    assert len(rows) == 3  # two callers and the refresh
    assert [t for t in texts(root) if t in {"t0", "t1", "t2"}] == ["t0", "t1", "t2"]


def test_an_expiry_trace_names_itself_and_its_axis() -> None:
    root = parse(render_svg(expiry_trace()))
    title, desc = root.find(f"{SVG}title"), root.find(f"{SVG}desc")
    assert title is not None
    assert title.text == "Two callers at an expiry, one refresh"
    assert desc is not None
    assert (desc.text or "").startswith("Timeline of an expiry: ")
    assert "ms after the value went stale" in texts(root)
    assert legend(root) == ["hit", "stale_hit", "refresh_fill"]


def test_an_empty_trace_still_renders() -> None:
    root = parse(render_svg({"callers": []}))
    assert bars(root) == []


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"callers": "not a list"},
        {"callers": [{"start_ms": "soon", "end_ms": 1}]},
        {"callers": [{"start_ms": float("nan"), "end_ms": 1}]},
        {"callers": [42]},
    ],
)
def test_a_malformed_trace_is_a_value_error(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="trace"):
        render_svg(data)


def test_the_docs_picture_is_the_render_of_the_docs_trace() -> None:
    data = json.loads(TRACE_FILE.read_text())
    assert render_svg(data) == TRACE_FILE.with_name("stampede.svg").read_text()


def test_the_serve_stale_picture_is_the_render_of_its_trace() -> None:
    stale = TRACE_FILE.with_name("serve-stale-trace.json")
    data = json.loads(stale.read_text())
    assert render_svg(data) == stale.with_name("serve-stale.svg").read_text()
    assert {"hit", "stale_hit", "refresh_fill"} <= {c["outcome"] for c in data["callers"]}
