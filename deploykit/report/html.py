"""Render report blocks as one self-contained HTML5 page: inline CSS, plots embedded as data URIs.

Every string is escaped: pipeline names, descriptions and metrics come from users' files.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from html import escape

from deploykit.report.document import Block, Bullets, Heading, Image, Paragraph, Table

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
td.pass { color: #176f2c; font-weight: bold; }
td.fail { color: #b00020; font-weight: bold; }
img { max-width: 100%; }
"""
_VERDICT_CLASS = {"PASS": "pass", "FAIL": "fail"}


def _td(text: str) -> str:
    css = _VERDICT_CLASS.get(text)
    return f'<td class="{css}">{escape(text)}</td>' if css else f"<td>{escape(text)}</td>"


def _block(block: Block, images: Mapping[str, bytes]) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{escape(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{escape(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        head = "".join(f"<th>{escape(h)}</th>" for h in block.headers)
        body = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Image):
        data = base64.b64encode(images[block.filename]).decode("ascii")
        return f'<img src="data:image/png;base64,{data}" alt="{escape(block.alt)}">'
    raise TypeError(f"unknown report block {block!r}")


def render_html(title: str, blocks: Sequence[Block], images: Mapping[str, bytes]) -> str:
    """The page; `images` maps each Image block's filename to its PNG bytes."""
    body = "\n".join(_block(b, images) for b in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
