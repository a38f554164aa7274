"""A report as a list of blocks (headings, text, tables, figures), rendered once as Markdown and once as HTML.

Inline markup in text and table cells: ```code```, ``**bold**`` and ``[text](#anchor)``. The HTML page is
self-contained: figures are embedded as base64 data URIs and the style sheet is inline.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    """A section heading; ``anchor`` is the id links point at."""

    level: int
    text: str
    anchor: str = ""


@dataclass
class Text:
    """A paragraph (or a bulleted list when ``bullets`` is set)."""

    text: str = ""
    bullets: list[str] = field(default_factory=list)
    small: bool = False


@dataclass
class Table:
    """A table; ``bold[r][c]`` marks cells to emphasise, ``numeric`` the right-aligned columns."""

    header: list[str]
    rows: list[list[str]]
    bold: list[list[bool]] | None = None
    numeric: list[bool] | None = None
    caption: str = ""


@dataclass
class Figure:
    """An image file (PNG) shown with a caption; ``path`` is relative to the report's folder."""

    path: str
    caption: str


@dataclass
class Details:
    """Blocks shown collapsed in HTML (a <details> element) and as a plain section in Markdown."""

    summary: str
    blocks: list = field(default_factory=list)


Block = Heading | Text | Table | Figure | Details

_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def anchor(text: str) -> str:
    """Returns a GitHub-style anchor for a heading text."""
    return re.sub(r"[^a-z0-9_-]", "", re.sub(r"\s+", "-", text.strip().lower()))


def inline_html(text: str) -> str:
    """Returns ``text`` with its inline markup turned into HTML (everything else escaped)."""
    out = html.escape(text, quote=False)
    out = _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", out)
    out = _BOLD.sub(lambda m: f"<strong>{m.group(1)}</strong>", out)
    return _LINK.sub(lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', out)


def _md_cell(text: str, bold: bool) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"**{text}**" if bold and text and text != "–" else text


def to_markdown(blocks: list[Block]) -> str:
    """Returns the blocks as GitHub-flavoured Markdown."""
    parts: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            lines = ([block.text] if block.text else []) + [f"- {b}" for b in block.bullets]
            parts.append("\n".join(lines))
        elif isinstance(block, Table):
            bold = block.bold or [[False] * len(r) for r in block.rows]
            numeric = block.numeric or [False] * len(block.header)
            lines = ["| " + " | ".join(_md_cell(h, False) for h in block.header) + " |",
                     "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
            lines += ["| " + " | ".join(_md_cell(c, b) for c, b in zip(row, flags)) + " |"
                      for row, flags in zip(block.rows, bold)]
            if block.caption:
                lines.append(f"\n{block.caption}")
            parts.append("\n".join(lines))
        elif isinstance(block, Figure):
            parts.append(f"![{block.caption}]({block.path})\n\n*{block.caption}*")
        elif isinstance(block, Details):
            parts.append(f"**{block.summary}**")
            parts.append(to_markdown(block.blocks).rstrip("\n"))
    return "\n\n".join(parts) + "\n"


STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1280px; padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2.5rem; }
h3 { margin-top: 1.8rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .88rem; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: .25rem .55rem; white-space: nowrap; }
th { background: #f6f8fa; position: sticky; top: 0; }
tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #eff1f3; padding: .05rem .3rem; border-radius: 4px; font-size: .85em; }
figure { margin: 1rem 0 1.5rem; }
figure img { max-width: 100%; border: 1px solid #d0d7de; border-radius: 6px; }
figcaption { font-size: .85rem; color: #57606a; }
p.small, ul.small { font-size: .85rem; color: #57606a; }
details { margin: .6rem 0 1rem; }
summary { cursor: pointer; font-weight: 600; }
"""


def _html_blocks(blocks: list[Block], folder: Path) -> list[str]:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            ident = block.anchor or anchor(block.text)
            out.append(f'<h{block.level} id="{html.escape(ident)}">{inline_html(block.text)}</h{block.level}>')
        elif isinstance(block, Text):
            css = ' class="small"' if block.small else ""
            if block.text:
                out.append(f"<p{css}>{inline_html(block.text)}</p>")
            if block.bullets:
                items = "".join(f"<li>{inline_html(b)}</li>" for b in block.bullets)
                out.append(f"<ul{css}>{items}</ul>")
        elif isinstance(block, Table):
            bold = block.bold or [[False] * len(r) for r in block.rows]
            numeric = block.numeric or [False] * len(block.header)
            head = "".join(f"<th>{inline_html(h)}</th>" for h in block.header)
            body = []
            for row, flags in zip(block.rows, bold):
                cells = []
                for cell, flag, num in zip(row, flags, numeric):
                    content = inline_html(cell)
                    if flag and cell and cell != "–":
                        content = f"<strong>{content}</strong>"
                    cells.append(f'<td class="num">{content}</td>' if num else f"<td>{content}</td>")
                body.append("<tr>" + "".join(cells) + "</tr>")
            caption = f'<p class="small">{inline_html(block.caption)}</p>' if block.caption else ""
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{caption}")
        elif isinstance(block, Figure):
            data = base64.b64encode((folder / block.path).read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{inline_html(block.caption)}</figcaption></figure>")
        elif isinstance(block, Details):
            inner = "\n".join(_html_blocks(block.blocks, folder))
            out.append(f"<details><summary>{inline_html(block.summary)}</summary>\n{inner}\n</details>")
    return out


def to_html(blocks: list[Block], folder: Path, title: str) -> str:
    """Returns the blocks as one self-contained HTML page (figures read from ``folder`` and embedded)."""
    body = "\n".join(_html_blocks(blocks, folder))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n"
            f'<p class="small">Written by zsadbench on {stamp}.</p>\n</body>\n</html>\n')
