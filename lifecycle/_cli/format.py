"""The CLI's text formatting, in one place: durations and plain-text tables.

Used by the demo summaries, the progress lines and ``audit show``. Standard library only.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence


def ms(value: object) -> str:
    """A duration given in milliseconds, for people: ``"12.3 ms"``, ``"1.23 s"``; ``"?"`` when
    it is not a number (a field missing from an audit event)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "?"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.1f} ms"


def widths(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[int]:
    """The width of each column: the longest cell, header included."""
    found = [len(header) for header in headers]
    for row in rows:
        for index, cell in enumerate(row):
            found[index] = max(found[index], len(cell))
    return found


def row_line(cells: Sequence[str], column_widths: Sequence[int], *, right: Collection[int] = (),
             indent: str = "") -> str:
    """One table line: cells padded to ``column_widths``, the columns in ``right`` right-aligned."""
    padded = [
        cell.rjust(width) if index in right else cell.ljust(width)
        for index, (cell, width) in enumerate(zip(cells, column_widths, strict=True))
    ]
    return (indent + "  ".join(padded)).rstrip()


def table_lines(headers: Sequence[str], rows: Iterable[Sequence[str]], column_widths: Sequence[int], *,
                right: Collection[int] = (), indent: str = "") -> Iterator[str]:
    """The lines of a table whose widths are known (rows may be streamed): header, rule, rows."""
    yield row_line(headers, column_widths, right=right, indent=indent)
    yield (indent + "  ".join("-" * width for width in column_widths)).rstrip()
    for row in rows:
        yield row_line(row, column_widths, right=right, indent=indent)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Collection[int] = (),
          indent: str = "") -> str:
    """A plain text table: a header, a rule, one line per row (cells shown with ``str``)."""
    cells = [[str(cell) for cell in row] for row in rows]
    return "\n".join(table_lines(headers, cells, widths(headers, cells), right=right, indent=indent))


__all__ = ["ms", "row_line", "table", "table_lines", "widths"]
