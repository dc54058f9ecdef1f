"""The run report: Markdown and self-contained HTML from the same blocks, plus its plots."""

from deploykit.report.html import render_html
from deploykit.report.markdown import render_markdown

__all__ = ["render_html", "render_markdown"]
