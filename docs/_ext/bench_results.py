"""``.. bench-results::``: show bench/results.md, the benchmark report, as tables and text.

The report is markdown, written by ``python -m bench`` and also read on its own
in the repository. This directive renders the subset that report uses, without
a markdown dependency and without handing its text to the reStructuredText
parser (a stray ``_`` or ``*`` in a figure must not break a ``-W`` build):

* ``#`` headings become rubrics, pipe tables become tables, ``-`` items become
  a bullet list, fenced code becomes a literal block, and every other block
  becomes a paragraph;
* inline ``code`` is kept as literal text, ``**bold**`` as strong text; links
  and anything else stay as they are written.

Until a run has written the file, the page shows a "results pending" note and
the build still passes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results.md"
_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*")


def inline(text: str) -> list[nodes.Node]:
    """Text with ``code`` and **bold** spans as literal and strong nodes."""
    out: list[nodes.Node] = []
    position = 0
    for match in _INLINE.finditer(text):
        if match.start() > position:
            out.append(nodes.Text(text[position : match.start()]))
        code, bold = match.groups()
        out.append(nodes.literal(code, code) if code is not None else nodes.strong(bold, bold))
        position = match.end()
    if position < len(text):
        out.append(nodes.Text(text[position:]))
    return out


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table(lines: list[str]) -> nodes.table:
    """A pipe table (header, alignment row, body rows) as a docutils table."""
    header, body = _cells(lines[0]), [_cells(line) for line in lines[2:]]
    width = len(header)
    group = nodes.tgroup(cols=width)
    for _ in range(width):
        group += nodes.colspec(colwidth=1)

    def row(cells: list[str]) -> nodes.row:
        result = nodes.row()
        for cell in (cells + [""] * width)[:width]:
            entry = nodes.entry()
            paragraph = nodes.paragraph()
            paragraph.extend(inline(cell))
            entry += paragraph
            result += entry
        return result

    thead, tbody = nodes.thead(), nodes.tbody()
    thead += row(header)
    for cells in body:
        tbody += row(cells)
    group += thead
    group += tbody
    result = nodes.table(classes=["bench-results"])
    result += group
    return result


_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def render(text: str) -> list[nodes.Node]:
    """The report as docutils nodes: fenced code as literal blocks, the rest block by block."""
    out: list[nodes.Node] = []
    position = 0
    for fence in _FENCE.finditer(text):
        out += _blocks(text[position : fence.start()])
        code = fence.group(1).rstrip("\n")
        out.append(nodes.literal_block(code, code))
        position = fence.end()
    return out + _blocks(text[position:])


def _blocks(text: str) -> list[nodes.Node]:
    """Blocks separated by blank lines: headings, pipe tables, lists, paragraphs."""
    out: list[nodes.Node] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line.rstrip() for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if lines[0].startswith("#"):
            title = lines[0].lstrip("#").strip()
            rubric = nodes.rubric()
            rubric.extend(inline(title))
            out.append(rubric)
            lines = lines[1:]
            if not lines:
                continue
        if len(lines) >= 2 and lines[0].startswith("|") and set(lines[1]) <= set("|:- "):
            out.append(table(lines))
        elif all(line.startswith(("- ", "* ")) for line in lines):
            items = nodes.bullet_list()
            for line in lines:
                paragraph = nodes.paragraph()
                paragraph.extend(inline(line[2:]))
                item = nodes.list_item()
                item += paragraph
                items += item
            out.append(items)
        else:
            paragraph = nodes.paragraph()
            paragraph.extend(inline(" ".join(line.strip() for line in lines)))
            out.append(paragraph)
    return out


class BenchResults(SphinxDirective):
    """Render bench/results.md, or say that no run has written it yet."""

    def run(self) -> list[nodes.Node]:
        if not RESULTS.is_file():
            note = nodes.note()
            note += nodes.paragraph(
                text="Results pending: bench/results.md has not been written yet. "
                "Run the command above to produce it."
            )
            return [note]
        self.env.note_dependency(str(RESULTS))
        return render(RESULTS.read_text(encoding="utf-8"))


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("bench-results", BenchResults)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
