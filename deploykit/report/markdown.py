"""Render report blocks as GitHub-flavoured Markdown; images are linked beside the file."""

from __future__ import annotations

from collections.abc import Sequence

from deploykit.report.document import Block, Bullets, Heading, Image, Paragraph, Table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; pipes and newlines inside cells are neutralised."""
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Table):
        return table(block.headers, block.rows)
    if isinstance(block, Image):
        return f"![{block.alt}]({block.filename})"
    raise TypeError(f"unknown report block {block!r}")


def render_markdown(blocks: Sequence[Block]) -> str:
    return "\n\n".join(_block(b) for b in blocks) + "\n"
