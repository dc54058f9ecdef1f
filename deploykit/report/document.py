"""A report as a list of plain blocks, so the Markdown and HTML renderers share one description of it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    filename: str  # a PNG beside the report
    alt: str


Block = Heading | Paragraph | Bullets | Table | Image
