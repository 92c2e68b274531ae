"""DataFrames as Markdown and HTML tables (no extra dependency: pandas' to_markdown needs tabulate)."""

from __future__ import annotations

import html

import pandas as pd


def markdown_table(frame: pd.DataFrame, align: dict[str, str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (values as they are, ``|`` and newlines escaped)."""
    align = align or {}
    header = "| " + " | ".join(_md(c) for c in frame.columns) + " |"
    rule = "|" + "|".join(_rule(align.get(c, "left")) for c in frame.columns) + "|"
    body = ["| " + " | ".join(_md(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def html_table(frame: pd.DataFrame, css_class: str = "table", numeric: tuple[str, ...] = ()) -> str:
    """An HTML ``<table>`` of ``frame`` with escaped cells; columns in ``numeric`` right-aligned (with any
    "± error" on a line of its own)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for row in frame.itertuples(index=False):
        cells = "".join(
            f'<td class="num">{_number_html(v)}</td>' if c in numeric else f"<td>{_html(v)}</td>"
            for c, v in zip(frame.columns, row, strict=True)
        )
        rows.append(f"<tr>{cells}</tr>")
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _md(value) -> str:
    text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    return text.replace("|", "\\|").replace("\n", "<br>")


def _html(value) -> str:
    text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    return html.escape(text).replace("\n", "<br>")


def _number_html(value) -> str:
    """A numeric cell; "value ± error" puts the error on a second, smaller line (a narrower table)."""
    value, sep, error = _html(value).partition(" ± ")
    return f'{value}<span class="se">± {error}</span>' if sep else value


def _rule(side: str) -> str:
    return "---:" if side == "right" else ":---:" if side == "center" else "---"
