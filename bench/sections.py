"""BENCHMARKS.md is written by several scripts: each owns a section between `<!-- name:start -->` and
`<!-- name:end -->` markers and replaces only that, and run_benchmarks.py keeps every marked section it does not own."""

from __future__ import annotations

import re
from pathlib import Path

from deploykit.files import atomic_write_text

_SECTION = re.compile(r"<!-- (?P<name>[\w-]+):start -->.*?<!-- (?P=name):end -->", re.S)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def marked_sections(text: str) -> list[str]:
    """Every marked section of `text`, markers included, in order."""
    return [m.group(0) for m in _SECTION.finditer(text)]


def write_section(path: Path, name: str, body: str) -> None:
    """Replace section `name` of `path` with `body` (markers added), or append it; the rest stays as it was."""
    start, end = markers(name)
    section = f"{start}\n{body.strip()}\n\n{end}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)
