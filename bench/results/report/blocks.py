"""The report as a list of blocks (headings, paragraphs, tables, images), rendered both to Markdown
(index.md) and to self-contained HTML (index.html)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _markdown() -> Any:
    """The renderer of the blocks' Markdown (code, emphasis, links) for index.html; raw HTML in text is escaped."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "breaks": True})


@dataclass
class Doc:
    """A report as a list of blocks, rendered both to Markdown and to self-contained HTML."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append((f"h{level}", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def markdown(self, base: Path) -> str:
        out = []
        for kind, x in self.blocks:
            if kind.startswith("h"):
                out.append("#" * int(kind[1]) + " " + x)
            elif kind == "p":
                out.append(x)
            elif kind == "table":
                header, rows = x
                esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
                out.append("\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
                                     + ["| " + " | ".join(r) + " |" for r in esc[1:]]))
            elif kind == "img":
                path, alt = x
                out.append(f"![{alt}]({path.relative_to(base).as_posix()})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
               "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
               "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>"]
        md = _markdown()
        for kind, x in self.blocks:
            if kind.startswith("h"):
                out.append(f"<{kind}>{md.renderInline(x)}</{kind}>")
            elif kind == "p":
                out.append(md.render(x).strip())
            elif kind == "table":
                header, rows = x
                out.append("<table><tr>" + "".join(f"<th>{md.renderInline(c)}</th>" for c in header) + "</tr>"
                           + "".join("<tr>" + "".join(f"<td>{md.renderInline(c)}</td>" for c in r) + "</tr>"
                                     for r in rows) + "</table>")
            elif kind == "img":
                path, alt = x
                data = base64.b64encode(path.read_bytes()).decode()
                out.append(f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>")
        out.append("</body></html>")
        return "\n".join(out)


# ---------------------------------------------------------------- figures
